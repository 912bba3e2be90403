"""The CLI: fast help, JSON output, and one line + hint + exit code 2 for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from personactl.cli.app import app

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


def test_help_does_not_import_heavy_packages():
    code = (
        "import sys; from personactl.cli.app import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'transformers', 'vllm', 'openai', 'polars', 'pydantic')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_help_lists_only_built_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("generate", "extract", "traits", "config", "ls"):
        assert command in result.output


def test_config_shows_sources_and_masks_secrets(isolated_env, monkeypatch):
    monkeypatch.setenv("PERSONACTL_HF_TOKEN", "hf_topsecret")
    monkeypatch.setenv("PERSONACTL_SEED", "5")
    result = invoke("config", "--json", "--model", "my/model")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["seed"] == {"value": 5, "source": "env"}
    assert doc["model"] == {"value": "my/model", "source": "cli"}
    assert doc["hf_token"]["value"] == "****" and "hf_topsecret" not in result.output
    table = invoke("config")
    assert "hf_topsecret" not in table.output and "seed" in table.output


def test_traits_commands(isolated_env, tmp_path):
    listed = json.loads(invoke("traits", "list", "--json").stdout)
    assert {"evil", "optimistic"} <= {t["name"] for t in listed["traits"]}
    shown = json.loads(invoke("traits", "show", "evil", "--json").stdout)
    assert shown["name"] == "evil" and len(shown["sha256"]) == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [")
    result = invoke("traits", "validate", bad)
    assert result.exit_code == 2 and "malformed YAML" in result.output


def expect_error(result, needle):
    assert result.exit_code == 2, result.output
    assert needle in result.output, result.output
    assert "Traceback" not in result.output
    assert "hint:" in result.output or "Usage:" in result.output or "Invalid value" in result.output


def test_bad_inputs_exit_2_with_one_line(isolated_env, tmp_path, tiny_factory):
    ws = tmp_path / "ws"
    model = tiny_factory("llama")
    (tmp_path / "broken.yaml").write_text("name: x\n  bad: [indent")
    expect_error(invoke("generate", "--trait", tmp_path / "broken.yaml", "-w", ws), "malformed YAML")
    expect_error(invoke("generate", "--trait", "no-such-trait", "-w", ws), "unknown trait")
    expect_error(invoke("generate", "--trait", "evil", "--model", "./no/such/model", "-w", ws), "unknown model")
    expect_error(invoke("generate", "--trait", "evil", "--config", tmp_path / "missing.toml"), "config file not found")
    expect_error(invoke("generate", "--trait", "evil", "--temperature", "hot"), "--temperature")
    expect_error(invoke("generate", "--trait", "evil", "--max-new-tokens", "1.5"), "--max-new-tokens")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    expect_error(invoke("generate", "--trait", "evil", "-w", not_a_dir / "ws"), "not writable")
    expect_error(invoke("extract", "--trait", "evil", "--model", model, "-w", ws), "no responses for trait evil")
    expect_error(invoke("extract", "--trait", "evil", "--layers", "1-x", "-w", ws), "bad layer list")
    expect_error(invoke("extract", "-w", ws), "exactly one of --trait or --pairs")
    assert not list(ws.rglob("*.parquet")) and not list(ws.rglob("*.safetensors"))


def generate_small(ws, model, *extra):
    return invoke(
        "generate",
        "--trait",
        "optimistic",
        "--model",
        model,
        "-w",
        ws,
        "--questions",
        "2",
        "--max-new-tokens",
        "6",
        "--dtype",
        "float32",
        *extra,
    )


def test_generate_extract_round_trip_and_errors_on_artifacts(isolated_env, tmp_path, tiny_factory):
    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    first = generate_small(ws, model, "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["rows"] == 20 and summary["skipped"] is False
    again = generate_small(ws, model, "--json")
    assert json.loads(again.stdout)["skipped"] is True
    changed = generate_small(ws, model, "--seed", "3")
    expect_error(changed, "different inputs (seed)")

    expect_error(
        invoke("extract", "--trait", "optimistic", "--model", model, "-w", ws, "--layers", "2,9"), "out of range"
    )
    ok = invoke(
        "extract",
        "--trait",
        "optimistic",
        "--model",
        model,
        "-w",
        ws,
        "--layers",
        "0-3",
        "--json",
        "--dtype",
        "float32",
    )
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert [row["layer"] for row in doc["layers"]] == [0, 1, 2, 3] and doc["n_pairs"] == 10
    vector_path = doc["artifact"]
    skipped = invoke(
        "extract",
        "--trait",
        "optimistic",
        "--model",
        model,
        "-w",
        ws,
        "--layers",
        "0-3",
        "--json",
        "--dtype",
        "float32",
    )
    assert json.loads(skipped.stdout)["skipped"] is True

    with open(vector_path, "r+b") as f:  # corrupt the vector file in place
        f.write(b"\xff" * 16)
    expect_error(
        invoke("extract", "--trait", "optimistic", "--model", model, "-w", ws, "--layers", "0-3", "--dtype", "float32"),
        "not a readable safetensors",
    )

    listing = json.loads(invoke("ls", "-w", ws, "--json").stdout)
    assert {a["kind"] for a in listing["artifacts"]} == {"responses", "vectors"}


def test_empty_responses_table_is_a_clear_error(isolated_env, tmp_path, tiny_factory):
    import polars as pl

    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    assert generate_small(ws, model).exit_code == 0
    table_path = next(ws.rglob("responses-model.parquet"))
    table = pl.read_parquet(table_path)
    table.head(0).write_parquet(table_path)
    expect_error(invoke("extract", "--trait", "optimistic", "--model", model, "-w", ws), "no complete pairs")


def test_pairs_file_extraction(isolated_env, tmp_path, tiny_factory):
    model = str(tiny_factory("llama"))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "\n".join(json.dumps({"positive": f"happy day {i}", "negative": f"sad day {i}"}) for i in range(4))
    )
    ok = invoke("extract", "--pairs", plain, "--model", model, "-w", tmp_path / "ws", "--json", "--dtype", "float32")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["positions"] == ["response_start", "response_avg"]  # no prompt: response only
    expect_error(
        invoke("extract", "--pairs", plain, "--model", model, "-w", tmp_path / "ws2", "--positions", "prompt_end"),
        "cannot be computed",
    )
    ok = invoke(
        "extract",
        "--pairs",
        plain,
        "--model",
        model,
        "-w",
        tmp_path / "ws3",
        "--positions",
        "response_avg,response_start",
        "--json",
        "--dtype",
        "float32",
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["positions"] == ["response_avg", "response_start"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "How is it?", "positive": "Great!", "negative": "Awful."}) + "\n")
    ok = invoke("extract", "--pairs", chat, "--model", model, "-w", tmp_path / "ws", "--json", "--dtype", "float32")
    assert json.loads(ok.stdout)["positions"] == ["prompt_end", "response_start", "response_avg", "prompt_avg"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"positive": "x"}\n')
    expect_error(
        invoke("extract", "--pairs", broken, "--model", model, "-w", tmp_path / "ws"), "broken.jsonl:1: bad pair"
    )


def test_error_text_is_printed_literally(isolated_env, tmp_path):
    weird = tmp_path / "[run1]" / "[bold]bad.yaml"
    weird.parent.mkdir()
    weird.write_text("name: [")
    result = invoke("traits", "show", weird)
    expect_error(result, "[run1]/[bold]bad.yaml")


def test_bad_device_is_a_clear_error(isolated_env, tmp_path, tiny_factory):
    (tmp_path / "p.jsonl").write_text('{"positive": "a", "negative": "b"}\n')
    result = invoke(
        "extract",
        "--pairs",
        tmp_path / "p.jsonl",
        "--model",
        tiny_factory("llama"),
        "--device",
        "gpu",
        "-w",
        tmp_path / "ws",
    )
    expect_error(result, "unknown device 'gpu'")


def test_real_subprocess_exit_code_and_stderr(isolated_env):
    env = {**os.environ, "PERSONACTL_DEBUG": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "personactl", "traits", "show", "no-such-trait"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: unknown trait 'no-such-trait'")
    assert len(result.stderr.strip().splitlines()) == 2  # the error line and the hint


def extracted_workspace(tmp_path, model):
    ws = tmp_path / "ws"
    assert generate_small(ws, model).exit_code == 0
    ok = invoke("extract", "--trait", "optimistic", "--model", model, "-w", ws, "--dtype", "float32", "--json")
    assert ok.exit_code == 0, ok.output
    return ws, json.loads(ok.stdout)["artifact"]


def isolated_extraction(tmp_path, model):
    """`extracted_workspace` for a module-scoped fixture: no PERSONACTL_* from outside, cwd in
    `tmp_path` while it runs (as `isolated_env` gives each test); (model, workspace, vector path)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("PERSONACTL_") and k != "PERSONACTL_CACHE_DIR"]:
            mp.delenv(key)
        mp.chdir(tmp_path)
        ws, vector_path = extracted_workspace(tmp_path, model)
    return model, ws, vector_path


def test_steer_and_compare_through_the_cli(isolated_env, tmp_path, tiny_factory):
    model = str(tiny_factory("llama"))
    ws, vector_path = extracted_workspace(tmp_path, model)
    common = ["--model", model, "-w", ws, "--dtype", "float32", "--max-new-tokens", "5"]
    result = invoke(
        "steer",
        "--vector",
        "optimistic",
        "--prompt",
        "hello world",
        "--prompt",
        "why?",
        "--layers",
        "1-2",
        "--coefficients=-2,0,2",
        "--norm",
        "stream",
        "--json",
        *common,
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 * (1 + 2 * 2)
    assert sum(r["baseline"] for r in lines) == 2
    stream = [r for r in lines if not r["baseline"]]
    assert {(r["layer"], r["coefficient"]) for r in stream} == {(1, -2.0), (1, 2.0), (2, -2.0), (2, 2.0)}
    assert all(r["norm_mode"] == "stream" for r in stream)
    assert all(r["effective_norm"] == pytest.approx(2 * r["vector_norm"]) for r in stream)
    table = invoke("steer", "--vector", vector_path, "--prompt", "hello world", "--layers", "2", *common)
    assert table.exit_code == 0 and "baseline" in table.stdout
    one = ["steer", "--vector", "optimistic", "--prompt", "hi", "--layers", "2", "--coefficients=1", "--json", *common]
    renamed = invoke(*one, "--steer-positions", "prompt")
    assert renamed.exit_code == 0, renamed.output
    assert {json.loads(line)["positions"] for line in renamed.stdout.splitlines()} == {"prompt"}
    assert "deprecated" not in renamed.stderr
    old_spelling = invoke(*one, "--positions", "response")  # the steering mode's old name: still works, with a note
    assert old_spelling.exit_code == 0, old_spelling.output
    assert {json.loads(line)["positions"] for line in old_spelling.stdout.splitlines()} == {"response"}
    assert "--positions is deprecated here" in old_spelling.stderr and "--steer-positions" in old_spelling.stderr
    assert {a["kind"] for a in json.loads(invoke("ls", "-w", ws, "--json").stdout)["artifacts"]} >= {"steer"}

    same = json.loads(
        invoke("compare", "optimistic", "optimistic@response_avg/pca", "--model", model, "-w", ws, "--json").stdout
    )
    pair = same["pairs"][0]
    assert same["layers"] == [0, 1, 2, 3] and len(pair["cosine"]) == 4
    assert all(-1.0001 <= c <= 1.0001 for c in pair["cosine"])
    ends = json.loads(
        invoke(
            "compare", "optimistic@prompt_end/pca", "optimistic@prompt_end", "--model", model, "-w", ws, "--json"
        ).stdout
    )
    assert ends["skipped_layers"] == [0] and ends["layers"] == [1, 2, 3]  # same last prompt token: no direction
    self_cmp = json.loads(invoke("compare", "optimistic", vector_path, "--model", model, "-w", ws, "--json").stdout)
    assert self_cmp["pairs"][0]["cosine"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert self_cmp["pairs"][0]["agree_layers"] == [0, 1, 2, 3]


def test_steer_and_compare_bad_inputs(isolated_env, tmp_path, tiny_factory):
    import torch

    from personactl.store.vectors import PersonaVector

    model, other = str(tiny_factory("llama")), str(tiny_factory("gpt2"))
    ws, vector_path = extracted_workspace(tmp_path, model)
    base = ["--model", model, "-w", ws, "--max-new-tokens", "3", "--prompt", "hi"]
    expect_error(invoke("steer", "--vector", "optimistic", "--layers", "9", *base), "out of range")
    expect_error(invoke("steer", "--vector", "optimistic", "--layers", "0", *base), "layer 0 is the embeddings")
    expect_error(invoke("steer", "--vector", "optimistic", "--coefficients", "1,x", *base), "bad coefficient list")
    expect_error(invoke("steer", "--vector", "optimistic", "--coefficients=1,inf", *base), "not finite")
    expect_error(invoke("steer", "--vector", "optimistic", "--model", model, "-w", ws, "--prompt", " "), "empty prompt")
    expect_error(invoke("steer", "--vector", "optimistic", "--model", model, "-w", ws), "no prompt given")
    expect_error(invoke("steer", "--vector", "nosuchtrait", *base), "no vectors for 'nosuchtrait'")
    expect_error(invoke("steer", "--vector", "optimistic", "--norm", "huge", *base), "'huge' is not one of")

    wide = PersonaVector.load(vector_path)
    wide.tensors = {k: torch.zeros(v.shape[0], 48) if v.dim() == 2 else v for k, v in wide.tensors.items()}
    wide.metadata = {**wide.metadata, "hidden_size": 48, "model": "some/other-model"}
    wide.save(tmp_path / "wide.safetensors")
    expect_error(invoke("steer", "--vector", tmp_path / "wide.safetensors", *base), "does not fit")
    expect_error(invoke("compare", vector_path, tmp_path / "wide.safetensors", "-w", ws), "of the same model")

    nan = PersonaVector.load(vector_path)
    nan.tensors["mean_diff.response_avg"][2] = float("nan")
    nan.save(tmp_path / "nan.safetensors")
    expect_error(invoke("steer", "--vector", tmp_path / "nan.safetensors", "--layers", "2", *base), "not finite")
    same_shape = invoke(
        "steer", "--vector", vector_path, "--model", other, "-w", ws, "--prompt", "hi", "--max-new-tokens", "2"
    )
    assert same_shape.exit_code == 0 and "warning: the vector was extracted from" in same_shape.output
    expect_error(invoke("compare", vector_path, "-w", ws), "at least two vectors")


def test_public_api_is_importable_lazily():
    import personactl

    for name in ("load_model", "extract_vectors", "PersonaVector", "PairExample", "Steerer", "load_trait", "Settings"):
        assert getattr(personactl, name) is not None
    with pytest.raises(AttributeError):
        personactl.not_a_thing  # noqa: B018


def test_global_config_applies_to_the_command_and_not_to_the_next_call(isolated_env, tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text("seed = 7\nmax_new_tokens = 9\n")
    doc = json.loads(invoke("--config", toml, "config", "--json").stdout)
    assert doc["seed"] == {"value": 7, "source": str(toml)} and doc["max_new_tokens"]["value"] == 9
    own = tmp_path / "own.toml"
    own.write_text("seed = 3\n")
    assert json.loads(invoke("--config", toml, "config", "--json", "--config", own).stdout)["seed"]["value"] == 3
    assert json.loads(invoke("config", "--json").stdout)["seed"]["source"] == "default"
    expect_error(invoke("--config", tmp_path / "missing.toml", "show", "x"), "config file not found")


def test_missing_vector_names_the_workspace_that_has_it(isolated_env):
    demo = isolated_env / "demo-workspace" / "smollm2-135m" / "optimistic"
    demo.mkdir(parents=True)
    (demo / "vectors-model.safetensors").write_bytes(b"")
    result = invoke("show", "optimistic")
    expect_error(result, "no vectors for 'optimistic'")
    assert "--workspace demo-workspace" in result.output
    other = isolated_env / "personactl-workspace" / "other-model" / "optimistic"
    other.mkdir(parents=True)
    (other / "vectors-model.safetensors").write_bytes(b"")
    result = invoke("show", "optimistic", "-w", "demo-workspace", "--model", "tiny/llama")
    expect_error(result, "no vectors for 'optimistic'")
    assert "another model (smollm2-135m): pass it with --model" in result.output
    assert "--workspace personactl-workspace" not in invoke("show", "nothing").output
