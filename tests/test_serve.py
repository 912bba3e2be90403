"""`personactl serve`: a real HTTP server on a free loopback port, driven by the real `openai` client.

Replies are checked exactly against `Steerer` + `model.generate`, concurrent requests with mixed α
against the same requests run alone, and the CLI is run as a subprocess (start-up JSON, Ctrl-C)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from typer.testing import CliRunner

from personactl.backends.hf import stop_token_ids
from personactl.chat.server import APIError, ServeDefaults, SteeredEngine, SteeredHTTPServer, is_loopback
from personactl.cli.app import app
from personactl.model.chat_format import encode_prompt
from personactl.model.loading import load_model
from personactl.model.steering import Steerer
from personactl.store.vectors import PersonaVector
from personactl.store.workspace import Workspace

NEW_TOKENS = 12
PROMPTS = ["hello world", "what do you think about the weather today?", "tell me about your plans"]


@pytest.fixture(scope="module")
def model_dir(tiny_factory) -> Path:
    return tiny_factory("llama")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu", log=lambda m: None)


def write_vector(path: Path, lm, spec: str, hidden: int | None = None, seed: int = 0, scale: float = 0.005) -> Path:
    """A vector file as `extract` writes it: random directions (the tiny model is random too), small
    next to the tiny model's residual stream (norm ≈ 0.1), so each α gives its own, non-degenerate reply."""
    hidden = hidden or lm.hidden_size
    gen = torch.Generator().manual_seed(seed)
    rows = lm.num_layers + 1
    PersonaVector(
        {
            "mean_diff.response_avg": torch.randn(rows, hidden, generator=gen) * scale,
            "stream_norm": torch.full((rows,), 5.0),
        },
        {
            "model": spec,
            "model_fingerprint": lm.fingerprint if hidden == lm.hidden_size else "sha256:other",
            "num_layers": lm.num_layers,
            "hidden_size": hidden,
            "rows": list(range(rows)),
            "positions": ["response_avg"],
            "aggregators": ["mean_diff"],
            "trait": "tinymood",
        },
    ).save(path)
    return path


@pytest.fixture(scope="module")
def vector_path(tmp_path_factory, lm, model_dir) -> Path:
    return write_vector(tmp_path_factory.mktemp("vec") / "tinymood.safetensors", lm, str(model_dir))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, lm, model_dir) -> Workspace:
    """A workspace holding a second trait, `othermood`, extracted for the tiny model."""
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    path = ws.vectors_path(lm.source.slug, "othermood", "model")
    path.parent.mkdir(parents=True)
    write_vector(path, lm, str(model_dir), seed=1)
    return ws


def make_engine(lm, workspace, vector_path, **kwargs) -> SteeredEngine:
    defaults = ServeDefaults(vector=str(vector_path), layers=[2], alpha=1.0, max_alpha=3.0, max_tokens=NEW_TOKENS)
    return SteeredEngine(lm, workspace, defaults, **kwargs)


@contextlib.contextmanager
def running(engine, api_key=None):
    server = SteeredHTTPServer(engine, "127.0.0.1", 0, api_key=api_key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def server(lm, workspace, vector_path):
    with running(make_engine(lm, workspace, vector_path)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    client.served = server.engine.model_id  # the model id requests name
    return client


def reference(lm, messages, steering=None, max_new_tokens=NEW_TOKENS):
    """Greedy `model.generate` on the templated messages, optionally under a Steerer: the ground truth."""
    from transformers import GenerationConfig

    assert no_hooks(lm)  # the server's last batch is over: its hooks would steer this run too
    prompt = encode_prompt(lm.tokenizer, messages)
    ids = torch.tensor([prompt])
    stops = stop_token_ids(lm.model, lm.tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=lm.tokenizer.pad_token_id
    )
    with torch.no_grad(), Steerer(lm.model, **steering) if steering else contextlib.nullcontext():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return {
        "text": lm.tokenizer.decode(tokens[:cut], skip_special_tokens=True),
        "prompt_tokens": len(prompt),
        "completion_tokens": cut,
        "finish_reason": "stop" if cut < len(tokens) else "length",
    }


def steering_for(vector_path, alpha, layers=(2,), positions="all", norm="raw"):
    vector = PersonaVector.load(vector_path)
    return dict(vector={k: vector.direction(k, norm=norm) for k in layers}, coefficient=alpha, positions=positions)


def user(text):
    return [{"role": "user", "content": text}]


def raw(url, data=None):
    """A plain HTTP request (no client library): the status and the JSON body."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data)) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def no_hooks(lm, within=10.0):
    """No steering hook left on the model. A reply ends as soon as its own row does, and the batch's
    hooks come off when the whole batch ends, so wait (bounded) for that."""
    deadline = time.monotonic() + within
    while lm.model._forward_pre_hooks or any(b._forward_hooks for b in lm.layers):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def ask(client, messages, **extra):
    reply = client.chat.completions.create(model=client.served, messages=messages, extra_body=extra or None)
    choice = reply.choices[0]
    return {
        "text": choice.message.content,
        "prompt_tokens": reply.usage.prompt_tokens,
        "completion_tokens": reply.usage.completion_tokens,
        "finish_reason": choice.finish_reason,
    }


# ---------------------------------------------------------------- exact replies


def test_models_list(client, server, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(model_dir)] == [server.engine.model_id]
    card = models[0].model_extra["personactl"]
    assert card["persona"] == "tinymood" and card["alpha"] == 1.0 and card["layers"] == [2]
    assert card["max_alpha"] == 3.0 and card["num_layers"] == 3


def test_alpha_zero_equals_unsteered_greedy_generation(client, lm):
    for prompt in PROMPTS:
        assert ask(client, user(prompt), alpha=0) == reference(lm, user(prompt))
    messages = [
        {"role": "system", "content": "You are cheerful."},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "tell me about your plans"},
    ]
    assert ask(client, messages, alpha=0) == reference(lm, messages)  # the whole conversation goes through the template
    assert no_hooks(lm)


@pytest.mark.parametrize(("positions", "norm", "layers"), [("all", "raw", [1, 3]), ("response", "unit", [2])])
def test_steered_reply_equals_steerer_plus_generate(client, lm, vector_path, positions, norm, layers):
    alpha = 1.5 if norm == "raw" else 0.05  # a unit vector is ten times the tiny model's stream
    extra = dict(persona=str(vector_path), alpha=alpha, layers=layers, positions=positions, norm=norm)
    steered = ask(client, user(PROMPTS[1]), **extra)
    expected = reference(lm, user(PROMPTS[1]), steering_for(vector_path, alpha, layers, positions, norm))
    assert steered == expected
    assert steered["text"] != reference(lm, user(PROMPTS[1]))["text"]  # the steering changed the reply
    assert no_hooks(lm)


def test_command_line_defaults_apply_and_personas_resolve_by_trait_name(client, lm, vector_path, workspace):
    assert ask(client, user(PROMPTS[0])) == reference(lm, user(PROMPTS[0]), steering_for(vector_path, 1.0))
    other = workspace.vectors_path(lm.source.slug, "othermood", "model")
    by_name = ask(client, user(PROMPTS[0]), persona="othermood", layers="1-2", response_format={"type": "text"})
    assert by_name == reference(lm, user(PROMPTS[0]), steering_for(other, 1.0, layers=(1, 2)))
    assert by_name["text"] != ask(client, user(PROMPTS[0]), layers="1-2")["text"]


def test_streaming_gives_the_same_reply_in_pieces(client, lm, vector_path):
    whole = ask(client, user(PROMPTS[2]), alpha=-1.0, max_tokens=30)
    chunks = list(
        client.chat.completions.create(
            model=client.served,
            messages=user(PROMPTS[2]),
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"alpha": -1.0},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["personactl"]["alpha"] == -1.0
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == whole["prompt_tokens"]
    assert len({c.id for c in chunks}) == 1
    assert no_hooks(lm)


def test_finish_reason_stop_and_length(client, lm):
    long = ask(client, user(PROMPTS[0]), alpha=0, max_tokens=200)
    assert long == reference(lm, user(PROMPTS[0]), max_new_tokens=200)
    short = ask(client, user(PROMPTS[0]), alpha=0, max_tokens=3)
    assert short["finish_reason"] == "length" and short["completion_tokens"] == 3


def test_concurrent_requests_with_mixed_alpha_get_their_own_replies(client, server, lm):
    alphas = (-2.0, 0.0, 2.0)
    alone = {(p, a): ask(client, user(p), alpha=a, max_tokens=24) for p in PROMPTS[:2] for a in alphas}
    for prompt in PROMPTS[:2]:
        assert len({alone[prompt, a]["text"] for a in alphas}) == 3  # a leak would show
    jobs = [(PROMPTS[i % 2], alphas[i % 3], i % 4 == 3) for i in range(16)]
    barrier = threading.Barrier(8)

    def run(job):
        prompt, alpha, stream = job
        barrier.wait()  # the first eight set off together
        if not stream:
            return ask(client, user(prompt), alpha=alpha, max_tokens=24)["text"]
        chunks = client.chat.completions.create(
            model=client.served, messages=user(prompt), max_tokens=24, stream=True, extra_body={"alpha": alpha}
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, jobs[:8]))
        barrier.reset()
        got += list(pool.map(run, jobs[8:]))
    assert got == [alone[p, a]["text"] for p, a, _ in jobs]
    assert no_hooks(lm)


# ---------------------------------------------------------------- errors and access


def bad(client, messages=None, model=None, **extra):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=model or client.served, messages=messages or user("hello"), extra_body=extra or None
        )
    return info.value


def test_bad_requests_are_openai_errors_with_clear_messages(client, lm, tmp_path, model_dir):
    cases = [
        (dict(alpha=5), "outside the allowed range ±3"),
        (dict(alpha=-3.5, stream=True), "outside the allowed range ±3"),
        (dict(persona="nosuchtrait"), "no vectors for 'nosuchtrait'"),
        (dict(persona=str(tmp_path / "missing.safetensors")), "vector file not found"),
        (dict(layers=[99]), "layer 99 out of range"),
        (dict(layers=[0]), "layer 0 is the embeddings"),
        (dict(layers="x"), "bad layer list"),
        (dict(layers=[1.5]), "layers must be"),
        (dict(positions="middle"), "unknown positions 'middle'"),
        (dict(norm="huge"), "unknown norm 'huge'"),
        (dict(alpha="high"), "alpha must be a number"),
        (dict(max_tokens=0), "max_tokens must be a positive integer"),
        (dict(n=2), "only n = 1"),
        (dict(response_format={"type": "json_object"}), "only text replies"),
    ]
    other = write_vector(tmp_path / "other.safetensors", lm, "some/other-model", hidden=16)
    cases.append((dict(persona=str(other)), "does not fit"))
    for extra, message in cases:
        error = bad(client, **extra)
        assert error.status_code == 400, extra
        assert message in error.body["message"], (extra, error.body)
        assert error.body["type"] == "invalid_request_error"
    error = bad(client, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}])
    assert error.status_code == 400 and "last message must be the user's" in error.body["message"]
    error = bad(client, messages=user("word " * 2000))  # refused before it is queued: it cannot fail a batch
    assert error.status_code == 400 and "exceeds the model's context" in error.body["message"]
    error = bad(client, model="gpt-4o")
    assert error.status_code == 404 and error.body["code"] == "model_not_found"
    status, body = raw(str(client.base_url) + "chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert ask(client, user("hello"), alpha=3)["text"]  # the edge of the range is allowed; the server went on
    assert no_hooks(lm)


def test_unknown_request_keys_are_refused_by_name(client, server):
    error = bad(client, alpah=1.0)  # a typo must not pass silently as "no steering"
    assert error.status_code == 400 and "unknown request field 'alpah'" in error.body["message"]
    body = json.dumps({"messages": user("hi"), "extra_body": {"alpha": 1}, "temprature": 0}).encode()
    status, answer = raw(server.url + "/chat/completions", body)
    assert status == 400 and "unknown request fields 'extra_body', 'temprature'" in answer["error"]["message"]
    assert "top level" in answer["error"]["hint"]
    for name, value in (("frequency_penalty", 0.5), ("tool_choice", "auto"), ("logit_bias", {"1": 2})):
        error = bad(client, **{name: value})
        assert error.status_code == 400 and f"'{name}' is not supported" in error.body["message"]
    assert ask(client, user("hello"), alpha=0, user="someone", frequency_penalty=0)["text"] is not None


def test_a_full_queue_answers_429_with_retry_after(lm, workspace, vector_path):
    engine = make_engine(lm, workspace, vector_path, max_batch=1, max_queue=1)
    body = json.dumps({"messages": user("hello"), "max_tokens": 4}).encode()
    with running(engine) as server, ThreadPoolExecutor(2) as pool:
        url = server.url + "/chat/completions"
        with engine.backend._busy:  # hold the model: the scheduler takes a batch, then waits for it
            first = pool.submit(raw, url, body)
            wait_for(lambda: engine.backend.queued == 0 and engine._running)  # taken, waiting to run
            second = pool.submit(raw, url, body)
            wait_for(lambda: engine.backend.queued == 1)  # the queue is full
            request = urllib.request.Request(url, data=body)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request)
            assert info.value.code == 429 and int(info.value.headers["Retry-After"]) >= 1
            error = json.loads(info.value.read())["error"]
            assert error["type"] == "rate_limit_error" and "busy" in error["message"]
        assert first.result(timeout=60)[0] == 200 and second.result(timeout=60)[0] == 200


def test_the_queue_admits_more_waiting_requests_than_the_default_worker_threads(lm, workspace, vector_path):
    """A request waiting for its reply holds one of the server's worker threads (40 by default):
    the server makes room for every request its queue admits, so they reach the queue."""
    engine = make_engine(lm, workspace, vector_path, max_batch=1, max_queue=48)
    body = json.dumps({"messages": user("hello"), "max_tokens": 2}).encode()
    with running(engine) as server, ThreadPoolExecutor(49) as pool:
        url = server.url + "/chat/completions"
        with engine.backend._busy:  # hold the model: every request but the first waits in the queue
            replies = [pool.submit(raw, url, body) for _ in range(49)]
            wait_for(lambda: engine.backend.queued == 48, within=30)
        assert all(reply.result(timeout=120)[0] == 200 for reply in replies)


def wait_for(condition, within=10.0):
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_api_key_is_enforced(lm, workspace, vector_path):
    with running(make_engine(lm, workspace, vector_path), api_key="s3cret") as server:
        keyless = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            keyless.chat.completions.create(model=server.engine.model_id, messages=user("hello"))
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            keyless.models.list()
        assert raw(server.url + "/models")[0] == 401
        keyed = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(model=server.engine.model_id, messages=user("hello")).choices
        assert raw(server.url.removesuffix("/v1") + "/health") == (200, {"status": "ok"})


def test_exposed_server_reads_only_workspace_and_start_up_files(lm, workspace, vector_path, tmp_path, model_dir):
    engine = make_engine(lm, workspace, vector_path, exposed=True)
    outside = write_vector(tmp_path / "elsewhere.safetensors", lm, str(model_dir), seed=3)
    with pytest.raises(APIError, match="does not read vector files outside its workspace"):
        engine.start({"messages": user("hello"), "persona": str(outside)})
    for persona in ("othermood", str(vector_path)):  # a trait in the workspace; the --vector file
        completion = engine.start({"messages": user("hello"), "persona": persona})
        assert engine.complete(completion)["choices"][0]["message"]["content"] is not None
    assert make_engine(lm, workspace, vector_path).start({"messages": user("hi"), "persona": str(outside)})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


# ---------------------------------------------------------------- the command


def test_cli_refuses_an_exposed_host_without_a_key(isolated_env, vector_path):
    result = CliRunner().invoke(app, ["serve", "--vector", str(vector_path), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without an API key" in result.output
    args = ["serve", "--vector", str(vector_path), "--backend", "vllm", "--positions", "response"]
    result = CliRunner().invoke(app, args)  # refused before minutes of vLLM start-up
    assert result.exit_code == 2 and "not supported by the vllm backend" in result.output


def test_cli_serves_prints_its_url_and_stops_on_ctrl_c(isolated_env, model_dir, vector_path, lm):
    env = {**os.environ, "PERSONACTL_SERVE_API_KEY": "k3y"}
    command = [sys.executable, "-m", "personactl", "serve", "--model", str(model_dir), "--vector", str(vector_path)]
    command += ["--layers", "2", "--alpha", "0", "--port", "0", "--json", "--dtype", "float32", "--device", "cpu"]
    command += ["--max-new-tokens", str(NEW_TOKENS)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        started = json.loads(proc.stdout.readline())
        assert started["url"].startswith("http://127.0.0.1:") and started["alpha"] == 0.0
        served = openai.OpenAI(base_url=started["url"], api_key="k3y", max_retries=0)
        assert [m.id for m in served.models.list().data] == [started["model"]]
        reply = served.chat.completions.create(model=started["model"], messages=user(PROMPTS[1]))
        assert reply.choices[0].message.content == reference(lm, user(PROMPTS[1]))["text"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
