"""The CLI: fast help, JSON output, and one line + hint + exit code 2 for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    expect_error(invoke("extract", "--pairs", plain, "--model", model, "-w", tmp_path / "ws"), "cannot be computed")
    ok = invoke(
        "extract",
        "--pairs",
        plain,
        "--model",
        model,
        "-w",
        tmp_path / "ws",
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


def test_real_subprocess_exit_code_and_stderr(isolated_env):
    env = {**os.environ, "PERSONACTL_DEBUG": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "personactl", "traits", "show", "no-such-trait"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: unknown trait 'no-such-trait'")
    assert len(result.stderr.strip().splitlines()) == 2  # the error line and the hint
