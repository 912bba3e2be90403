"""`personactl serve --when` and a request's `when`: each request's prompt projection on a condition
vector is read before it joins a batch; below the threshold the request is an unsteered row, above
it a steered one, on a real loopback server over the tiny model (float32, greedy), checked exactly
against `Steerer` + `generate`; a gated-out and a steered request batched together each get the
reply they get alone; bad conditions are 400s naming `when`, or exit 2 before the model loads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from test_chat_plans import reference, write_vector
from test_serve import no_hooks, running, user
from test_serve_plans import BatchSpy, client_model, make_engine, post
from typer.testing import CliRunner

from personactl.chat.server import APIError, ServeDefaults, SteeredEngine
from personactl.cli.app import app
from personactl.errors import InputError
from personactl.model.chat_format import encode_prompt
from personactl.model.loading import load_model
from personactl.steps.condition import prompt_projections, resolve_condition
from personactl.store.vectors import PersonaVector
from personactl.store.workspace import Workspace

PROMPTS = ("hello world", "tell me about your plans")
STEER = ["tinymood:1-2:2", "othermood:2:0:ablate"]
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_factory):
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


@pytest.fixture(scope="module")
def projections(lm, ws) -> dict[str, float]:
    """Each prompt's projection on othermood at layer 2, read by hand as the gate reads it."""
    condition = resolve_condition("othermood:2:0", workspace=ws, lm=lm, position="response_avg", aggregator="mean_diff")
    ids = [encode_prompt(lm.tokenizer, user(prompt)) for prompt in PROMPTS]
    values = [prompt_projections(lm, [one], {2: condition.unit})[2][0] for one in ids]
    assert values[0] != values[1]
    return dict(zip(PROMPTS, values, strict=True))


@pytest.fixture(scope="module")
def served(lm, ws):
    engine = make_engine(lm, ws)
    spy = BatchSpy(engine)
    with running(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        yield server, client, spy


def ask(client, prompt, **extra):
    reply = client.chat.completions.create(model=client_model(client), messages=user(prompt), extra_body=extra)
    return reply.choices[0].message.content, reply.model_extra["personactl"]


def above(p: float) -> str:
    return f"othermood:2:{p - 1e-3!r}"  # p passes


def below(p: float) -> str:
    return f"othermood:2:{p + 1e-3!r}"  # p does not


# ---------------------------------------------------------------- exact replies


def test_a_request_below_the_threshold_is_unsteered_above_it_steered(served, lm, ws, projections):
    _, client, _ = served
    prompt, p = PROMPTS[0], projections[PROMPTS[0]]
    steered, unsteered = reference(lm, ws, STEER, message=prompt), reference(lm, ws, message=prompt)
    assert steered != unsteered
    text, meta = ask(client, prompt, alpha=0, steer=STEER, when=below(p))
    assert text == unsteered and meta["when"] == {"spec": below(p), "projection": p, "steered": False}
    assert meta["plan"] == ["tinymood:1-2:2:add", "othermood:2:0:ablate"]  # the settings stay; the gate decides
    text, meta = ask(client, prompt, alpha=0, steer=STEER, when=above(p))
    assert text == steered and meta["when"] == {"spec": above(p), "projection": p, "steered": True}
    text, meta = ask(client, prompt, alpha=0, steer=STEER)
    assert text == steered and meta["when"] is None
    chunks = list(
        client.chat.completions.create(
            model=client_model(client),
            messages=user(prompt),
            stream=True,
            extra_body={"alpha": 0, "steer": STEER, "when": below(p)},
        )
    )
    assert chunks[0].model_extra["personactl"]["when"]["steered"] is False
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == unsteered
    assert no_hooks(lm)


def test_a_gated_out_and_a_steered_request_batch_together_and_equal_their_replies_alone(served, lm, ws, projections):
    _, client, spy = served
    low, high = sorted(PROMPTS, key=projections.get)
    when = f"othermood:2:{(projections[low] + projections[high]) / 2!r}"
    bodies = [(low, dict(alpha=0, steer=STEER, when=when)), (high, dict(alpha=0, steer=STEER, when=when))]
    alone = [ask(client, prompt, **body) for prompt, body in bodies]
    assert [meta["when"]["steered"] for _, meta in alone] == [False, True]
    assert alone[0][0] == reference(lm, ws, message=low) and alone[1][0] == reference(lm, ws, STEER, message=high)
    spy.sizes.clear()
    barrier = threading.Barrier(len(bodies))

    def run(item):
        barrier.wait()
        return ask(client, item[0], **item[1])

    for _ in range(3):
        with ThreadPoolExecutor(len(bodies)) as pool:
            assert list(pool.map(run, bodies)) == alone
        if max(spy.sizes) > 1:
            break
        spy.sizes.clear()  # the two arrived too far apart to share a batch: once more
    assert max(spy.sizes) > 1  # a gated-out row and a steered row ran in one batch
    assert no_hooks(lm)


def test_the_default_condition_and_null_dropping_it(lm, ws, projections):
    prompt, p = PROMPTS[0], projections[PROMPTS[0]]
    defaults = ServeDefaults(vector=None, layers=[2], max_alpha=3.0, max_tokens=10, plan=tuple(STEER), when=below(p))
    engine = SteeredEngine(lm, ws, defaults)
    with running(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        card = client.models.list().data[0].model_extra["personactl"]
        assert card["when"] == {"spec": below(p)}
        text, meta = ask(client, prompt)
        assert text == reference(lm, ws, message=prompt) and meta["when"]["steered"] is False
        text, meta = ask(client, prompt, when=None)  # null drops the default
        assert text == reference(lm, ws, STEER, message=prompt) and meta["when"] is None
        text, meta = ask(client, prompt, when=above(p))  # a request's own condition replaces it
        assert text == reference(lm, ws, STEER, message=prompt) and meta["when"]["steered"] is True
    assert no_hooks(lm)


# ---------------------------------------------------------------- errors


def other_model_vector(path, lm, model_dir):
    """A vector file made for another model (hidden size 48)."""
    vector = PersonaVector.load(write_vector(path, lm, str(model_dir), "wide", 0))
    vector.tensors = {k: torch.zeros(v.shape[0], 48) if v.dim() == 2 else v for k, v in vector.tensors.items()}
    vector.metadata = {**vector.metadata, "hidden_size": 48, "model": "some/other-model"}
    vector.save(path)
    return path


def test_bad_conditions_are_400s_naming_when(served, lm, ws, projections, tmp_path, model_dir):
    server, client, _ = served
    wide = other_model_vector(tmp_path / "wide.safetensors", lm, model_dir)
    for when, needle in [
        ("othermood:x:1", "bad layer 'x' in --when 'othermood:x:1'"),
        ("othermood:2:abc", "bad threshold 'abc'"),
        ("othermood:9:1", "when 'othermood:9:1': "),
        ("nosuchtrait:2:1", "when 'nosuchtrait:2:1': no vectors for 'nosuchtrait'"),
        (f"{wide}:2:0", "does not fit"),
        (5, "when must be a string"),
        (["othermood:2:1"], "when must be a string"),
    ]:
        status, body = post(server, {"steer": STEER, "when": when})
        assert status == 400 and needle in body["error"]["message"], (when, body)
        assert body["error"]["param"] == "when" and "\n" not in body["error"]["message"]
    p = projections[PROMPTS[0]]
    assert ask(client, PROMPTS[0], alpha=0, steer=STEER, when=below(p))[0] == reference(lm, ws, message=PROMPTS[0])


def test_an_exposed_server_reads_condition_files_from_its_workspace_only(lm, ws, tmp_path, model_dir):
    outside = write_vector(tmp_path / "outside.safetensors", lm, str(model_dir), "outside", 3)
    engine = make_engine(lm, ws, exposed=True)
    try:
        with pytest.raises(APIError) as info:
            engine.start({"messages": user(PROMPTS[0]), "when": f"{outside}:2:0"})
        assert info.value.status == 400 and info.value.param == "when"
        assert "does not read vector files outside its workspace" in info.value.message
        engine.complete(engine.start({"messages": user(PROMPTS[0]), "when": "othermood:2:0"}))  # a workspace trait
    finally:
        engine.shutdown()


def serve_args(model_dir, ws, *extra):
    return ["serve", "--model", str(model_dir), "-w", str(ws.root), "--port", "0", "--steer", "tinymood:2:1", *extra]


@pytest.mark.parametrize(
    ("when", "needle"), [("othermood:x:1", "bad layer 'x'"), ("othermood:2", "bad --when 'othermood:2'")]
)
def test_serve_refuses_a_bad_condition_before_loading(isolated_env, model_dir, ws, monkeypatch, when, needle):
    import personactl.backends as backends

    started = []
    monkeypatch.setattr(backends, "open_model", lambda *a, **k: started.append(1))
    result = runner.invoke(app, serve_args(model_dir, ws, "--when", when))
    assert result.exit_code == 2 and needle in result.output and not started, result.output


def test_vllm_refuses_when_before_starting(isolated_env, model_dir, ws, monkeypatch):
    import personactl.backends as backends

    started = []
    monkeypatch.setattr(backends, "open_model", lambda *a, **k: started.append(1))
    result = runner.invoke(app, serve_args(model_dir, ws, "--when", "othermood:2:0", "--backend", "vllm"))
    assert result.exit_code == 2 and "--when reads each prompt's activations" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 2 and not started  # one line + hint, no engine


def test_a_default_condition_for_another_model_is_refused_at_start_up(lm, ws, tmp_path, model_dir):
    wide = other_model_vector(tmp_path / "wide.safetensors", lm, model_dir)
    defaults = ServeDefaults(vector="tinymood", layers=[2], max_tokens=10, when=f"{wide}:2:0")
    with pytest.raises(InputError, match="does not fit"):
        SteeredEngine(lm, ws, defaults)
