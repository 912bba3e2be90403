"""Every command a user runs with `--backend mlx`, through the real CLI (typer's CliRunner) and a real
loopback server, on the tiny random Llama in float32, next to the same command on the Hugging Face
engine: greedy tokens equal (generate, steer with a plan and `--when`, chat, serve, the eval
tables), readings close (monitor, readout train, condition fit, eval --proxy, the chat's live
readout), and the settings MLX has no use for refused before anything loads."""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest
import torch

pytest.importorskip("mlx.core", reason="MLX cannot be installed here: pip install 'personactl[mlx]'")
pytest.importorskip("mlx_lm", reason="mlx-lm cannot be installed here: pip install 'personactl[mlx]'")

import mlx.core as mx  # noqa: E402

from personactl.backends import open_model  # noqa: E402
from personactl.settings import Settings  # noqa: E402
from personactl.store.workspace import Workspace  # noqa: E402
from tests.test_cli import expect_error, invoke, isolated_extraction  # noqa: E402

BACKENDS = ("hf", "mlx")
PROMPTS = ("hello world", "why is the sky blue?")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_factory):
    """(model, workspace, vector path): the tiny Llama with `optimistic` generated and extracted on HF
    (a vector file from one engine steers on any other)."""
    return isolated_extraction(tmp_path_factory.mktemp("mlx-commands"), str(tiny_factory("llama")))


def run_json(*args, code: int = 0) -> list[dict]:
    """The command's JSON lines (one document or a stream), after checking its exit code."""
    result = invoke(*args)
    assert result.exit_code == code, result.output
    text = result.stdout.strip()
    if text.startswith("{\n"):
        return [json.loads(text)]
    return [json.loads(line) for line in text.splitlines()]


def on_both(*args) -> dict[str, list[dict]]:
    """The same command on each engine: backend → its JSON lines."""
    return {b: run_json(*args, "--backend", b) for b in BACKENDS}


# ---------------------------------------------------------------- generate and steer


def common_args(model, ws) -> list:
    return ["--model", model, "-w", ws, "--dtype", "float32"]


def test_generate_greedy_equals_the_hf_engine(isolated_env, setup, tmp_path):
    model, _, _ = setup
    tables = {}
    for backend in BACKENDS:
        args = ["--questions", "2", "--max-new-tokens", "6", "--temperature", "0", "--json", "--backend", backend]
        (doc,) = run_json("generate", "--trait", "optimistic", *common_args(model, tmp_path / backend), *args)
        assert doc["rows"] == 20 and not doc["skipped"]
        tables[backend] = pl.read_parquet(doc["artifact"])
    columns = ["question", "system_prompt", "response", "response_token_ids", "finish_reason"]
    assert tables["mlx"].select(columns).equals(tables["hf"].select(columns))
    assert tables["mlx"]["response"].n_unique() > 1  # not one degenerate answer everywhere


def test_generate_sampled_is_reproducible_from_its_seed(isolated_env, setup, tmp_path):
    """MLX's own random numbers: the same seed gives the same table, each sample its own draw."""
    model, _, _ = setup
    args = ["--questions", "2", "--samples", "2", "--max-new-tokens", "6", "--temperature", "1", "--top-p", "0.9"]
    generate = ["generate", "--trait", "optimistic", *common_args(model, tmp_path), *args, "--backend", "mlx"]
    tables = [pl.read_parquet(run_json(*generate, "--json", "--force")[0]["artifact"]) for _ in range(2)]
    columns = ["question", "system_prompt", "sample_index", "response"]
    assert tables[0].select(columns).equals(tables[1].select(columns))
    pairs = tables[0].group_by("question", "system_prompt").agg(pl.col("response").n_unique().alias("n"))
    assert pairs["n"].max() == 2  # two samples of one prompt are two draws


def steer_args(model, ws, *args) -> list:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return ["steer", *prompts, *args, *common_args(model, ws), "--max-new-tokens", "6", "--json"]


STEERING = [
    "--vector", "optimistic", "--layers", "2", "--coefficients=-8,8",
    "--steer", "optimistic:1:8", "--steer", "optimistic:2:0:ablate", "--steer", "optimistic:3:0.5:cap",
]  # fmt: skip


def fields(rows: list[dict], *keys: str) -> list[list]:
    return [[row.get(key) for key in keys] for row in rows]


def test_steer_with_a_plan_equals_the_hf_engine(isolated_env, setup):
    model, ws, _ = setup
    rows = on_both(*steer_args(model, ws, *STEERING))
    keys = ("prompt_index", "layer", "coefficient", "baseline", "plan", "text", "n_tokens")
    assert fields(rows["mlx"], *keys) == fields(rows["hf"], *keys)
    baseline = {r["prompt_index"]: r["text"] for r in rows["mlx"] if r["baseline"]}
    assert any(r["text"] != baseline[r["prompt_index"]] for r in rows["mlx"] if not r["baseline"])


def test_steer_when_reads_the_prompts_in_process_as_the_hf_engine_does(isolated_env, setup):
    model, ws, _ = setup
    everyone = on_both(*steer_args(model, ws, *STEERING, "--when", "optimistic:2:-1e9"))
    projections = {r["prompt_index"]: r["condition_projection"] for r in everyone["hf"]}
    mine = {r["prompt_index"]: r["condition_projection"] for r in everyone["mlx"]}
    assert mine == pytest.approx(projections, rel=1e-4, abs=1e-4)
    low, high = sorted(projections, key=projections.get)
    threshold = (projections[low] + projections[high]) / 2
    gated = on_both(*steer_args(model, ws, *STEERING, "--when", f"optimistic:2:{threshold!r}"))
    keys = ("prompt_index", "layer", "coefficient", "condition_passed", "text", "n_tokens")
    assert fields(gated["mlx"], *keys) == fields(gated["hf"], *keys)
    assert {r["condition_passed"] for r in gated["mlx"] if not r["baseline"]} == {True, False}
    baseline = {r["prompt_index"]: r["text"] for r in gated["mlx"] if r["baseline"]}
    for row in gated["mlx"]:
        if not row["condition_passed"]:
            assert row["text"] == baseline[row["prompt_index"]]  # gated out: its unsteered answer


# ---------------------------------------------------------------- eval


def eval_args(model, ws, *args) -> list:
    common = ["--trait", "optimistic", *common_args(model, ws), "--temperature", "0", "--no-plots", "--json"]
    return ["eval", *common, "--questions", "3", "--max-new-tokens", "5", *args]


def test_eval_proxy_equals_the_hf_engine(isolated_env, setup):
    """Judge-free: the held-out answers are read back on the same engine and projected on the vector."""
    model, ws, _ = setup
    summaries = on_both(*eval_args(model, ws, "--proxy", "--force"))
    (hf,), (mlx,) = summaries["hf"], summaries["mlx"]
    assert [r["layer"] for r in mlx["layers"]] == [r["layer"] for r in hf["layers"]] == [1, 2, 3]
    for mine, theirs in zip(mlx["layers"], hf["layers"], strict=True):
        assert (mine["n_pos"], mine["n_neg"]) == (theirs["n_pos"], theirs["n_neg"]) == (3, 3)
        assert mine["cohens_d"] == pytest.approx(theirs["cohens_d"], rel=1e-3, abs=1e-4)
    assert mlx["best_layer"] == hf["best_layer"]


def test_judged_eval_equals_the_hf_engine(isolated_env, setup):
    """The judged grid (baselines, steered and random rows) with the loopback judge: the same answers
    in float32 greedy, so the same scores and cells; the neutral-text KL is measured with the Hugging
    Face model on either engine."""
    from tests.judge_server import JudgeServer
    from tests.test_eval import hash_scorer

    model, ws, _ = setup
    grid = ["--layers", "1,2", "--coefficients=-8,8", "--random-seeds", "1", "--samples", "1", "--force"]
    with JudgeServer(scorer=hash_scorer) as server:
        judge = ["--judge-base-url", server.base_url, "--judge", "fake-judge"]
        summaries = on_both(*eval_args(model, ws, *judge, *grid))
    keys = ["condition", "layer", "coefficient", "random_seed", "question_index", "sample_index"]
    mine, theirs = (
        pl.read_parquet(summaries[b][0]["files"]["samples"]).sort(keys, nulls_last=True) for b in BACKENDS[::-1]
    )
    exact = [*keys, "text", "n_tokens", "finish_reason", "trait_score", "coherence_score"]
    assert mine.select(exact).equals(theirs.select(exact))
    assert mine.filter(pl.col("condition") == "steered").height == 2 * 2 * 3
    assert mine["text"].n_unique() > 3
    np.testing.assert_allclose(mine["kl_neutral"].to_numpy(), theirs["kl_neutral"].to_numpy(), rtol=1e-3, atol=1e-5)
    assert mine.filter(pl.col("condition") == "steered")["kl_neutral"].min() > 0
    cells = {b: pl.read_parquet(doc[0]["files"]["cells"]) for b, doc in summaries.items()}
    scores = [c for c in cells["hf"].columns if "kl" not in c]
    assert cells["mlx"].select(scores).equals(cells["hf"].select(scores))


# ---------------------------------------------------------------- chat (line mode)


def chat_on_both(model, ws, lines: list[str], *args) -> dict[str, list[dict]]:
    """`chat` in line mode (piped input, --json) on each engine, greedy: backend → its records."""
    chat = ["chat", "--vector", "optimistic", "--layers", "2", "--alpha", "4", "--max-alpha", "10", *args]
    chat += [*common_args(model, ws), "--max-new-tokens", "8", "--temperature", "0", "--json"]
    out = {}
    for backend in BACKENDS:
        result = invoke(*chat, "--backend", backend, input="\n".join([*lines, ""]))
        assert result.exit_code == 0, result.output
        out[backend] = [json.loads(line) for line in result.stdout.splitlines()]
    return out


def test_chat_with_steer_and_a_live_readout_equals_the_hf_engine(isolated_env, setup):
    """Replies steered by α·v, then by a plan grown with /steer (an add and a cap), each with the live
    readout on the vector read in this process."""
    model, ws, _ = setup
    lines = ["hello world", "/steer optimistic:1:2", "/steer optimistic:3:0.5:cap", "/reset", "hello world"]
    lines += ["/alpha 0", "/reset", "hello world", "/unsteer 1", "/unsteer 1", "/reset", "hello world"]
    out = chat_on_both(model, ws, lines, "--readout", "vector")
    replies = {b: [o for o in records if "reply" in o] for b, records in out.items()}
    assert len(replies["mlx"]) == 4
    keys = ("reply", "alpha", "layers", "plan", "finish_reason", "n_prompt_tokens")
    assert fields(replies["mlx"], *keys) == fields(replies["hf"], *keys)
    assert replies["mlx"][1]["plan"] == ["optimistic:1:2:add", "optimistic:3:0.5:cap"]
    texts = [r["reply"] for r in replies["mlx"]]
    assert texts[0] != texts[3] and texts[1] != texts[2]  # α·v and the plan each change the reply
    for mine, theirs in zip(replies["mlx"], replies["hf"], strict=True):
        assert mine["readout"]["source"] == "vector" and mine["readout"]["layers"] == [2]
        for position in ("prompt_end", "response_avg"):
            assert mine["readout"][position] == pytest.approx(theirs["readout"][position], rel=1e-3, abs=2e-4)


def test_chat_when_and_compare_equal_the_hf_engine(isolated_env, setup):
    """--when reads each prompt's projection in this process; /when moves the gate, /compare follows it."""
    model, ws, _ = setup
    lines = ["hello world", "/compare -4,0,4", "/when optimistic:2:1e9", "why?", "/compare 4", "/when off", "why?"]
    out = chat_on_both(model, ws, lines, "--when", "optimistic:2:-1e9")
    assert [o.get("ok") for o in out["mlx"]] == [True] * 7
    for mine, theirs in zip(out["mlx"], out["hf"], strict=True):
        if "when" in mine and isinstance(mine["when"], dict):
            assert mine["when"]["steered"] is theirs["when"]["steered"]
            assert mine["when"]["projection"] == pytest.approx(theirs["when"]["projection"], rel=1e-4, abs=1e-5)
    keys = ("message", "command", "reply", "rows", "n_prompt_tokens")
    assert fields(out["mlx"], *keys) == fields(out["hf"], *keys)
    first, _, _, gated, _, _, free = out["mlx"]
    assert (first["when"]["steered"], gated["when"]["steered"], "when" in free) == (True, False, False)
    assert gated["reply"] != free["reply"]  # the same history and message: the gate is the difference
    assert len({row["reply"] for row in out["mlx"][1]["rows"]}) == 3


# ---------------------------------------------------------------- serve


@contextlib.contextmanager
def serving(model, ws, backend, vector="optimistic"):
    """A loopback server (uvicorn) over `backend`'s engine and an OpenAI client for it, with a spy on
    the sizes of the mixed batches it runs."""
    import openai

    from personactl.chat.server import ServeDefaults, SteeredEngine
    from tests.test_serve import running

    lm = open_model(Settings(backend=backend, model=model, dtype="float32", device="cpu"))
    defaults = ServeDefaults(vector=vector, layers=[2], alpha=4.0, max_alpha=10.0, max_tokens=10)
    engine = SteeredEngine(lm, Workspace(ws), defaults)
    inner = engine.backend.engine
    sizes: list[int] = []

    def stream_batch(rows):
        sizes.append(len(rows))
        return type(inner).stream_batch(inner, rows)

    inner.stream_batch = stream_batch
    with running(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        client.served = engine.model_id
        client.batch_sizes = sizes
        yield client


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


REQUESTS = [
    {"messages": user(PROMPTS[0])},  # the default persona at α = 4
    {"messages": user(PROMPTS[1]), "alpha": 0},  # unsteered
    {"messages": user(PROMPTS[0]), "alpha": 0, "steer": ["optimistic:1:2", "optimistic:3:0.5:cap"]},
    {"messages": user(PROMPTS[0]), "steer": ["optimistic:2:0:ablate"], "when": "optimistic:2:-1e9"},
]


def ask(client, body) -> tuple[str, dict]:
    extra = {k: v for k, v in body.items() if k != "messages"}
    reply = client.chat.completions.create(model=client.served, messages=body["messages"], extra_body=extra or None)
    return reply.choices[0].message.content, reply.model_extra.get("personactl") or {}


@pytest.fixture(scope="module")
def hf_replies(setup):
    model, ws, _ = setup
    with serving(model, ws, "hf") as client:
        return [ask(client, body) for body in REQUESTS]


def test_serve_mixes_steered_and_unsteered_requests_each_as_alone_and_as_the_hf_engine(setup, hf_replies):
    model, ws, _ = setup
    theirs = [text for text, _ in hf_replies]
    assert len(set(theirs[:3])) == 3  # α·v, no steering and the plan each give their own reply
    with serving(model, ws, "mlx") as client:
        alone = [ask(client, body) for body in REQUESTS]
        assert [text for text, _ in alone] == theirs
        when, hf_when = alone[3][1]["when"], hf_replies[3][1]["when"]  # read in this process on either engine
        assert when["steered"] is hf_when["steered"] is True
        assert when["projection"] == pytest.approx(hf_when["projection"], rel=1e-4, abs=1e-5)
        chunks = client.chat.completions.create(
            model=client.served, messages=REQUESTS[0]["messages"], stream=True, max_tokens=10
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == theirs[0]
        burst = REQUESTS[:3]
        for _ in range(2):
            client.batch_sizes.clear()
            with ThreadPoolExecutor(len(burst)) as pool:
                assert list(pool.map(together(client, len(burst)), burst)) == theirs[:3]
            if max(client.batch_sizes) > 1:
                break  # else the burst arrived too spread out to share a batch: once more
        assert max(client.batch_sizes) > 1


def together(client, n: int):
    """`ask` for `n` threads that set off at once."""
    barrier = threading.Barrier(n)

    def run(body):
        barrier.wait()
        return ask(client, body)[0]

    return run


def test_the_serve_command_runs_the_mlx_engine(isolated_env, setup, hf_replies):
    """`personactl serve --backend mlx` as a process: the start-up line, replies equal to the HF
    engine's, Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys

    import openai

    model, ws, _ = setup
    command = [sys.executable, "-m", "personactl", "serve", "--backend", "mlx", "--vector", "optimistic"]
    command += ["--layers", "2", "--alpha", "4", "--max-alpha", "10", "--port", "0", "--json", "--device", "cpu"]
    command += [*map(str, common_args(model, ws)), "--max-new-tokens", "10"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        started = json.loads(proc.stdout.readline())
        client = openai.OpenAI(base_url=started["url"], api_key="unused", max_retries=0, timeout=120)
        client.served = started["model"]
        assert [ask(client, body)[0] for body in REQUESTS[:3]] == [text for text, _ in hf_replies[:3]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(model, workspace): a tiny Llama with Llama 3's RoPE scaling (mlx-lm's `Llama3RoPE` holds its
    frequencies as an array computed lazily when the model is built) and a random `tinymood` vector."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from personactl.model.loading import load_model
    from tests.conftest import build_tokenizer
    from tests.test_serve import write_vector

    directory = tmp_path_factory.mktemp("tiny-llama3")
    tokenizer = build_tokenizer()
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=4, pad_token_id=0,
        rope_scaling={**rope, "original_max_position_embeddings": 64},
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    lm = load_model(str(directory), dtype="float32", device="cpu", log=lambda m: None)
    ws = Workspace(tmp_path_factory.mktemp("ws-llama3"))
    path = ws.vectors_path(lm.source.slug, "tinymood", "model")
    path.parent.mkdir(parents=True)
    write_vector(path, lm, str(directory), scale=0.05)
    return str(directory), ws.root


def test_chat_and_serve_generate_on_worker_threads(isolated_env, llama3):
    """Chat and serve generate on threads other than the one that loaded the model; MLX's streams
    belong to a thread, so every array the model holds is evaluated at load (Llama 3's RoPE
    frequencies included), and both give the HF engine's replies."""
    model, ws = llama3
    chat = ["chat", "--vector", "tinymood", "--layers", "2", "--alpha", "2", *common_args(model, ws)]
    chat += ["--max-new-tokens", "8", "--temperature", "0", "--json"]
    replies = {}
    for backend in BACKENDS:
        result = invoke(*chat, "--backend", backend, input="hello world\n/alpha 0\nwhy?\n")
        assert result.exit_code == 0, result.output
        replies[backend] = [json.loads(line).get("reply") for line in result.stdout.splitlines()]
    assert replies["mlx"] == replies["hf"] and len(replies["mlx"]) == 3
    served = {}
    for backend in BACKENDS:
        with serving(model, ws, backend, vector="tinymood") as client:
            served[backend] = [ask(client, body)[0] for body in REQUESTS[:2]]
    assert served["mlx"] == served["hf"]


# ---------------------------------------------------------------- the commands that read activations


def nan(values) -> np.ndarray:
    """JSON numbers with None (a sink, no reply) as NaN."""
    return np.array(values, dtype=float)


def close(mine, theirs) -> bool:
    return np.allclose(nan(mine), nan(theirs), rtol=1e-3, atol=2e-4, equal_nan=True)


def test_monitor_reads_as_the_hf_engine(isolated_env, setup):
    model, ws, _ = setup
    common = ["--vector", "optimistic", *common_args(model, ws), "--json"]
    docs = on_both("monitor", *common, "--text", "I am so happy", "--reply", "Great, me too!", "--tokens")
    (hf,), (mlx,) = docs["hf"], docs["mlx"]
    assert mlx["layers"] == hf["layers"] and mlx["labels"] == hf["labels"]
    (mine,), (theirs,) = mlx["items"], hf["items"]
    assert close(mine["prompt_end"], theirs["prompt_end"]) and close(mine["response_avg"], theirs["response_avg"])
    assert fields(mine["tokens"], "token", "sink", "response") == fields(theirs["tokens"], "token", "sink", "response")
    assert close([t["projection"] for t in mine["tokens"]], [t["projection"] for t in theirs["tokens"]])
    tables = on_both("monitor", *common, "--responses", "optimistic")
    (hf,), (mlx,) = tables["hf"], tables["mlx"]
    assert len(mlx["items"]) == len(hf["items"]) == 20
    for mine, theirs in zip(mlx["items"], hf["items"], strict=True):
        assert close(mine["response_avg"], theirs["response_avg"])


def test_readout_train_and_monitor_with_it_equal_the_hf_engine(isolated_env, setup, tmp_path):
    from pathlib import Path

    from personactl.store.readout_file import Readout

    model, ws, _ = setup
    data = Path(__file__).parent / "data" / "readout"
    common = [*common_args(model, ws), "--json"]
    for backend in BACKENDS:
        run_json("readout", "train", data, *common, "-o", tmp_path / f"{backend}.safetensors", "--backend", backend)
    mine, theirs = (Readout.load(tmp_path / f"{backend}.safetensors") for backend in ("mlx", "hf"))
    assert (mine.concepts, mine.rows) == (theirs.concepts, theirs.rows)
    assert (mine.concepts, mine.rows) == (["angry", "cheerful", "curious", "sleepy"], [0, 1, 2, 3])
    for row in mine.rows[1:]:
        cosine = torch.nn.functional.cosine_similarity(mine.vectors(row), theirs.vectors(row), dim=-1)
        assert float(cosine.min()) >= 0.9999, row
    assert mine.metadata["model_fingerprint"] == theirs.metadata["model_fingerprint"]
    docs = on_both("monitor", "--readout", tmp_path / "mlx.safetensors", "--text", "I am so happy", *common)
    assert close(docs["mlx"][0]["items"][0]["prompt_end"], docs["hf"][0]["items"][0]["prompt_end"])


def test_condition_fit_chooses_as_the_hf_engine(isolated_env, setup):
    model, ws, _ = setup
    fit = ["condition", "fit", "--vector", "optimistic", "--trait", "optimistic", *common_args(model, ws), "--json"]
    fits = on_both(*fit)
    (hf,), (mlx,) = fits["hf"], fits["mlx"]
    assert [r["layer"] for r in mlx["layers"]] == [r["layer"] for r in hf["layers"]] == [1, 2, 3]
    assert [r["f1"] for r in mlx["layers"]] == pytest.approx([r["f1"] for r in hf["layers"]], abs=1e-9)
    assert mlx["best"]["layer"] == hf["best"]["layer"] and mlx["best"]["f1"] == pytest.approx(hf["best"]["f1"])
    assert mlx["best"]["threshold"] == pytest.approx(hf["best"]["threshold"], rel=1e-3, abs=1e-4)
    assert (mlx["prompts"], mlx["baseline_f1"]) == (hf["prompts"], hf["baseline_f1"])
    rows = run_json(*steer_args(model, ws, "--steer", "optimistic:1:8", "--when", mlx["when"], "--backend", "mlx"))
    assert all(r["condition_passed"] is not None for r in rows)


# ---------------------------------------------------------------- refused


REFUSED = [
    (["--device-map", "auto"], "--device-map places a transformers model; the mlx backend has none"),
    (["--device-map", "auto", "--max-memory", "0=1GiB"], "--device-map places a transformers model"),
    (["--device", "cuda"], "--device cuda is not an MLX device"),
    (["--device", "cuda:0"], "--device cuda:0 is not an MLX device"),
    pytest.param(
        ["--device", "gpu"],
        "--device gpu: this MLX build has no GPU",
        marks=pytest.mark.skipif(mx.is_available(mx.gpu), reason="this MLX build has a GPU"),
    ),  # MLX's Linux CPU build
]


@pytest.mark.parametrize(("flags", "needle"), REFUSED)
def test_what_only_the_hf_engine_places_is_refused_with_one_line(isolated_env, setup, flags, needle):
    """Every kind of command (a generating step, a reading step, chat and serve) refuses before the
    model loads: exit 2, one line and a hint, nothing written."""
    model, ws, _ = setup
    common = ["--model", model, "-w", ws, "--backend", "mlx", *flags]
    commands = [
        ["generate", "--trait", "optimistic", "--force"],
        ["steer", "--vector", "optimistic", "--prompt", "hi", "--layers", "2"],
        ["eval", "--trait", "optimistic", "--proxy", "--force"],
        ["extract", "--trait", "optimistic", "--force"],
        ["monitor", "--vector", "optimistic", "--text", "hi"],
        ["condition", "fit", "--vector", "optimistic", "--trait", "optimistic"],
        ["chat", "--vector", "optimistic", "--json"],
        ["serve", "--vector", "optimistic", "--port", "0"],
    ]
    for command in commands:
        result = invoke(*command, *common, input="hi\n")
        expect_error(result, needle)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 2 and lines[1].startswith("hint:"), result.output
        assert result.stdout == ""
