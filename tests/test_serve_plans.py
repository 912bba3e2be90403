"""`personactl serve` with steering plans: a request's `steer` list (and `--steer` defaults) on a real
loopback server over the tiny model in float32, checked exactly against `personactl steer --steer`
and `Steerer` + `generate` with the same resolved plan; requests with different plans batch
together and each gets its own reply; bad terms are 400s naming them; errors raised after a
request was queued are 400s too."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from test_chat_plans import reference, write_vector
from test_serve import no_hooks, running, user
from typer.testing import CliRunner

from personactl.chat.server import APIError, ServeDefaults, SteeredEngine
from personactl.cli.app import app
from personactl.errors import InputError
from personactl.model.loading import load_model
from personactl.store.workspace import Workspace

NEW_TOKENS = 10  # test_chat_plans' reference generates this many
PROMPT = "hello world"
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_factory) -> Path:
    return tiny_factory("llama")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, lm, model_dir) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    for seed, trait in enumerate(("tinymood", "othermood")):
        path = ws.vectors_path(lm.source.slug, trait, "model")
        path.parent.mkdir(parents=True)
        write_vector(path, lm, str(model_dir), trait, seed)
    return ws


def make_engine(lm, ws, vector="tinymood", plan=(), **kwargs) -> SteeredEngine:
    defaults = ServeDefaults(
        vector=vector, layers=[2], alpha=1.0, max_alpha=3.0, max_tokens=NEW_TOKENS, plan=tuple(plan)
    )
    return SteeredEngine(lm, ws, defaults, **kwargs)


class BatchSpy:
    """Records the size of every mixed batch the engine runs (and runs it)."""

    def __init__(self, engine: SteeredEngine):
        self.inner = engine.backend.engine
        self.sizes: list[int] = []
        self.fail_next: Exception | None = None
        engine.backend.engine.stream_batch = self.stream_batch

    def stream_batch(self, rows):
        self.sizes.append(len(rows))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return type(self.inner).stream_batch(self.inner, rows)


@pytest.fixture(scope="module")
def served(lm, ws):
    engine = make_engine(lm, ws)
    spy = BatchSpy(engine)
    with running(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        yield server, client, spy


def ask(client, **extra):
    reply = client.chat.completions.create(model=client_model(client), messages=user(PROMPT), extra_body=extra)
    return reply.choices[0].message.content, reply.model_extra["personactl"]


def client_model(client):
    return client.models.list().data[0].id


def post(server, body):
    """A raw request: (status, JSON body)."""
    import urllib.error
    import urllib.request

    data = json.dumps({"messages": user(PROMPT), **body}).encode()
    request = urllib.request.Request(server.url + "/chat/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---------------------------------------------------------------- exact replies


def test_a_plan_request_equals_steer_with_the_same_plan(served, lm, ws, model_dir, isolated_env):
    server, client, _ = served
    specs = ["othermood:2:0:ablate", "tinymood:1-2:2"]
    text, meta = ask(client, alpha=0, steer=specs)
    assert meta["plan"] == ["othermood:2:0:ablate", "tinymood:1-2:2:add"]
    assert meta["plan_applied"][1] == {"trait": "tinymood", "applied": {"1": 2.0, "2": 2.0}}
    assert text == reference(lm, ws, specs) != reference(lm, ws)

    args = ["steer", "--prompt", PROMPT, "--model", str(model_dir), "-w", str(ws.root), "--dtype", "float32"]
    args += ["--max-new-tokens", str(NEW_TOKENS), "--batch-size", "1", "--json"]
    result = runner.invoke(app, args + [arg for spec in specs for arg in ("--steer", spec)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows if r["plan"]] == [text]
    assert no_hooks(lm)


def test_a_plan_beside_the_persona_and_the_default_alpha(served, lm, ws):
    _, client, _ = served
    text, meta = ask(client, steer=["tinymood:2:0.5"])  # α = 1 of tinymood (the default) and the plan's 0.5
    assert meta["alpha"] == 1.0 and meta["persona"] == "tinymood"
    assert text == reference(lm, ws, ["tinymood:2:1.5"])
    assert ask(client, steer=[])[0] == reference(lm, ws, ["tinymood:2:1"])  # no plan: α·v alone


def test_concurrent_requests_with_different_plans_batch_together_and_equal_their_replies_alone(served, lm):
    _, client, spy = served
    plans = [
        dict(alpha=0, steer=["othermood:2:0:ablate"]),
        dict(alpha=0, steer=["tinymood:1-2:2"]),
        dict(alpha=0, steer=["othermood:1:-2", "othermood:2:0.01:cap"]),
        dict(alpha=0, steer=[]),
        dict(alpha=-1.5, steer=["othermood:2:0:ablate"]),
    ]
    alone = [ask(client, **body)[0] for body in plans]
    assert len(set(alone)) == len(plans)  # each plan gives its own reply: a leak would show
    spy.sizes.clear()
    barrier = threading.Barrier(len(plans))

    def run(body):
        barrier.wait()
        return ask(client, **body)[0]

    for _ in range(2):
        with ThreadPoolExecutor(len(plans)) as pool:
            assert list(pool.map(run, plans)) == alone
        if max(spy.sizes) > 1:
            break
        spy.sizes.clear()  # the burst arrived too spread out to share a batch: once more
    assert max(spy.sizes) > 1  # rows with different plans ran in one batch
    assert no_hooks(lm)


def test_plans_are_resolved_once_per_specs_and_file_version(lm, ws):
    engine = make_engine(lm, ws)
    try:
        first = engine.plan(["tinymood:2:1", "othermood:1:0:ablate"], "raw", "response_avg", "mean_diff")
        again = engine.plan(["tinymood:2:1", "othermood:1:0:ablate"], "raw", "response_avg", "mean_diff")
        assert all(a is b for a, b in zip(first, again, strict=True))
        assert engine.plan(["tinymood:2:1"], "unit", "response_avg", "mean_diff")[0] is not first[0]  # other units
        path = ws.vectors_path(lm.source.slug, "tinymood", "model")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version of the file
        fresh = engine.plan(["tinymood:2:1", "othermood:1:0:ablate"], "raw", "response_avg", "mean_diff")
        assert fresh[0] is not first[0] and fresh[1] is first[1]
    finally:
        engine.shutdown()


def test_the_default_plan_is_resolved_once_at_start_up(lm, ws, monkeypatch):
    import personactl.chat.server as server_module

    calls = []
    original = server_module.resolve_plan
    monkeypatch.setattr(server_module, "resolve_plan", lambda terms, **kw: calls.append(terms) or original(terms, **kw))
    engine = make_engine(lm, ws, vector=None, plan=["othermood:2:0:ablate", "tinymood:1:1"])
    try:
        assert len(calls) == 2  # one per term: the default session reuses what start-up resolved
        assert engine.default_session.plan_specs() == ["othermood:2:0:ablate", "tinymood:1:1:add"]
    finally:
        engine.shutdown()


def test_the_default_plan(lm, ws):
    engine = make_engine(lm, ws, vector=None, plan=["othermood:2:0:ablate"])
    with running(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        card = client.models.list().data[0].model_extra["personactl"]
        assert card["plan"] == ["othermood:2:0:ablate"] and card["persona"] is None and card["alpha"] == 0.0
        text, meta = ask(client)
        assert text == reference(lm, ws, ["othermood:2:0:ablate"]) and meta["plan"] == card["plan"]
        assert ask(client, steer=[])[0] == reference(lm, ws)  # `steer: []` drops the default plan
        status, body = post(server, {"alpha": 1})
        assert status == 400 and "no default persona" in body["error"]["message"]
        text, meta = ask(client, persona="tinymood", alpha=1)
        assert text == reference(lm, ws, ["tinymood:2:1", "othermood:2:0:ablate"])
    assert no_hooks(lm)


# ---------------------------------------------------------------- errors


def test_bad_terms_are_400s_naming_them_and_others_go_on(served, lm, ws):
    server, client, _ = served
    for steer, needle in [
        (["tinymood:2:1", "nosuchtrait:2:1"], "steer[1] 'nosuchtrait:2:1': no vectors for 'nosuchtrait'"),
        (["tinymood:9:1"], "steer[0] 'tinymood:9:1': "),
        (["tinymood:2:x"], "bad value 'x'"),
        (["tinymood:2:4:scale"], "unknown steering operation 'scale'"),
        (["tinymood:2:5"], "--steer tinymood:2:5:add: α = 5 is outside the allowed range ±3"),
        ("tinymood:2:1", "steer must be a list of strings"),
        ([3], "steer must be a list of strings"),
    ]:
        status, body = post(server, {"steer": steer})
        assert status == 400 and needle in body["error"]["message"], (steer, body)
        assert "\n" not in body["error"]["message"]
    assert ask(client, alpha=0, steer=["othermood:2:0:ablate"])[0] == reference(lm, ws, ["othermood:2:0:ablate"])


def test_an_exposed_server_reads_plan_files_from_its_workspace_only(lm, ws, tmp_path, model_dir):
    outside = write_vector(tmp_path / "outside.safetensors", lm, str(model_dir), "outside", 3)
    given = write_vector(tmp_path / "given.safetensors", lm, str(model_dir), "given", 4)
    engine = make_engine(lm, ws, plan=[f"{given}:2:0:ablate"], exposed=True)
    try:
        with pytest.raises(APIError) as info:
            engine.start({"messages": user(PROMPT), "steer": [f"{outside}:2:1"]})
        assert info.value.status == 400 and "does not read vector files outside its workspace" in info.value.message
        assert "steer[0]" in info.value.message
        completion = engine.start(
            {"messages": user(PROMPT), "alpha": 0, "steer": [f"{given}:2:0:ablate", "tinymood:2:1"]}
        )
        reply = engine.complete(completion)  # the file given at start-up, and the workspace's traits
        assert reply["personactl"]["plan"] == [f"{given}:2:0:ablate", "tinymood:2:1:add"]
    finally:
        engine.shutdown()


def test_an_error_after_queueing_is_a_400(served, lm, ws):
    """The engine refuses a row once it runs (on vLLM, e.g., a row the plugin cannot take): the request
    gets a 400 with the message, streamed or not, and the server goes on. (No request the HF engine
    refuses after queueing passes the server's checks, so the spy raises what an engine would.)"""
    server, client, spy = served
    spy.fail_next = InputError("the engine cannot steer this row", hint="try another plan")
    status, body = post(server, {"steer": ["tinymood:2:1"]})
    assert status == 400 and body["error"]["message"] == "the engine cannot steer this row"
    assert body["error"]["hint"] == "try another plan" and body["error"]["type"] == "invalid_request_error"
    spy.fail_next = InputError("the engine cannot steer this row")
    chunks = client.chat.completions.create(
        model=client_model(client), messages=user(PROMPT), stream=True, extra_body={"alpha": 0}
    )
    with pytest.raises(openai.APIError, match="the engine cannot steer this row"):
        list(chunks)
    assert ask(client, alpha=0, steer=[])[0] == reference(lm, ws)


def test_serve_command_refuses_bad_plans_before_loading(isolated_env, model_dir, ws):
    base = ["serve", "--model", str(model_dir), "-w", str(ws.root), "--port", "0"]
    for extra, needle in [
        ([], "nothing to steer with"),
        (["--steer", "tinymood:2:x"], "bad value 'x'"),
        (["--steer", "nosuchtrait:2:1"], "--steer nosuchtrait:2:1: no vectors for 'nosuchtrait'"),
    ]:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and needle in result.output, (extra, result.output)
