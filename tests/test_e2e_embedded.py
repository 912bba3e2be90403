"""End to end on the embedded SmolLM2-135M-Instruct, through the CLI as a user runs it."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.models import builtin_gguf_path, load_model
from personactl.vectors import PersonaVector

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_generate_then_extract_on_embedded_model(isolated_env, tmp_path):
    ws = tmp_path / "ws"
    gen = runner.invoke(
        app,
        ["generate", "--trait", "optimistic", "-w", str(ws), "--questions", "2", "--max-new-tokens", "24", "--json"],
        catch_exceptions=False,
    )
    assert gen.exit_code == 0, gen.output
    summary = json.loads(gen.stdout)
    assert summary["rows"] == 20 and summary["pairs"] == 10
    table = pl.read_parquet(summary["artifact"])
    assert table["response"].str.len_chars().min() > 0

    ext = runner.invoke(app, ["extract", "--trait", "optimistic", "-w", str(ws), "--json"], catch_exceptions=False)
    assert ext.exit_code == 0, ext.output
    doc = json.loads(ext.stdout)
    assert len(doc["layers"]) == 31
    vector = PersonaVector.load(doc["artifact"])
    meta = vector.metadata
    assert meta["model"] == "smollm2-135m" and meta["num_layers"] == 30 and meta["hidden_size"] == 576
    assert meta["architecture"] == "LlamaForCausalLM" and meta["trait"] == "optimistic"
    assert meta["layer_convention"].startswith("row l = residual stream after decoder block l")
    for position in ("prompt_end", "response_start", "response_avg", "prompt_avg"):
        for aggregator in ("mean_diff", "pca"):
            t = vector.get(position, aggregator)
            assert t.shape == (31, 576) and torch.isfinite(t).all()
        torch.testing.assert_close(
            vector.get(position, "mean_diff"),
            vector.tensors[f"pos_mean.{position}"] - vector.tensors[f"neg_mean.{position}"],
        )
    # the system prompts differ, so the last prompt token differs clearly between pos and neg
    assert float(vector.norms("prompt_end")[15]) > 0.1
    assert (vector.tensors["stream_norm"][1:] > 0).all()


def test_gguf_file_loads_directly_and_matches_cached_checkpoint():
    """--model path/to/file.gguf works; the bf16 cache holds the same network."""
    gguf = builtin_gguf_path("smollm2-135m")
    from_gguf = load_model(str(gguf), dtype="float32", device="cpu", log=lambda m: None)
    cached = load_model("smollm2-135m", dtype="float32", device="cpu", log=lambda m: None)
    assert from_gguf.num_layers == cached.num_layers == 30
    ids = torch.tensor([from_gguf.tokenizer("Hello there, how are you?")["input_ids"]])
    assert ids.tolist() == [cached.tokenizer("Hello there, how are you?")["input_ids"]]
    with torch.no_grad():
        a = from_gguf.model(ids).logits[0, -1]
        b = cached.model(ids).logits[0, -1]
    assert a.argmax() == b.argmax()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999  # bf16 rounding of the weights only
