"""End to end on the embedded SmolLM2-135M-Instruct, through the CLI as a user runs it."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.model.loading import builtin_gguf_path, load_model
from personactl.store.vectors import PersonaVector

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
            assert t.shape == (31, 576)
            # pos and neg prompts end in the same header token, so prompt_end has no direction at the
            # embeddings (row 0): mean_diff is exactly zero there and pca says so with NaN
            direction_rows = slice(1, None) if position == "prompt_end" else slice(None)
            assert torch.isfinite(t[direction_rows]).all()
        torch.testing.assert_close(
            vector.get(position, "mean_diff"),
            vector.tensors[f"pos_mean.{position}"] - vector.tensors[f"neg_mean.{position}"],
        )
    assert (vector.get("prompt_end")[0] == 0).all() and torch.isnan(vector.get("prompt_end", "pca")[0]).all()
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


POSITIVE_WORDS = "happy wonderful great love joy glad delighted excited fantastic amazing beautiful".split()
NEGATIVE_WORDS = "sad terrible awful hate miserable sorry angry depressed hopeless lonely bad".split()


def test_steering_moves_mood_in_the_expected_direction():
    """Measured without a judge: (1) the log-likelihood margin of a happy over a sad reply rises
    monotonically with α; (2) greedy replies to neutral questions use more positive than negative
    mood words at α=+1 than at α=-2 (a fixed lexicon)."""
    from pathlib import Path

    from personactl.backends import Sampling
    from personactl.backends.hf import HFBackend
    from personactl.model.activations import extract_vectors
    from personactl.model.chat_format import chat_messages, encode_example, encode_prompt
    from personactl.model.steering import Steerer
    from personactl.steps.extract import pairs_from_jsonl

    lm = load_model("smollm2-135m", log=lambda m: None)
    pairs, _ = pairs_from_jsonl(Path(__file__).parent / "data" / "mood_pairs.jsonl", lm.tokenizer)
    result = extract_vectors(
        lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, positions=["response_avg"], pca=False
    )
    vector = result.mean_diff["response_avg"]

    messages = chat_messages(None, "How do you feel right now?")
    happy = encode_example(lm.tokenizer, messages, "I feel wonderful and happy today.")
    sad = encode_example(lm.tokenizer, messages, "I feel terrible and sad today.")

    def loglik(example):
        ids = torch.tensor([example.input_ids])
        with torch.inference_mode():
            logprobs = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), -1)
        return logprobs.gather(1, ids[0, 1:, None])[example.prompt_len - 1 :].sum().item()

    margins = []
    for alpha in (-2, -1, 0, 1, 2):
        with Steerer(lm.model, vector, layers=[15], coefficient=alpha):
            margins.append(loglik(happy) - loglik(sad))
    print(f"SPREAD steering margins α=-2..2: {[round(m, 2) for m in margins]}")
    assert margins == sorted(margins) and margins[-1] - margins[0] > 10, margins

    questions = [
        "How was your day?",
        "What do you think about Mondays?",
        "Tell me about your family.",
        "How is the weather?",
        "What are your plans for tomorrow?",
        "How do you feel about your job?",
    ]
    prompts = [encode_prompt(lm.tokenizer, chat_messages(None, q)) for q in questions]
    backend = HFBackend(lm.model, lm.tokenizer)

    def mood_score(alpha):
        with Steerer(lm.model, vector, layers=[15], coefficient=alpha):
            text = " ".join(g.text.lower() for g in backend.generate(prompts, Sampling(40, 0.0), 0))
        return sum(text.count(w) for w in POSITIVE_WORDS) - sum(text.count(w) for w in NEGATIVE_WORDS)

    low, high = mood_score(-2), mood_score(1)
    print(f"SPREAD mood words α=-2: {low}, α=+1: {high}")
    assert high > low + 3, (low, high)


def test_score_with_the_local_judge_then_extract(isolated_env, tmp_path):
    """The whole pipeline offline: the embedded model generates and judges its own answers, the
    filter follows the stored judgements, and `extract` reads exactly the pairs it keeps.

    What this does not assert: that the 135M judge rates a pos answer above its neg twin. It does
    not, measurably: over these 5 pairs its optimism scores sit at 23-31 for both sides, and the
    pos-minus-neg gap changes sign between CPU kernels (default and AVX512_CORE_BF16: 2 of 5 pairs
    pos > neg; AVX2: 0 of 5, gaps -5.0..0.0; AVX512_CORE: 1 of 5). So the threshold is taken from
    the scores, and both outcomes of the filter (some pairs kept, none kept) are checked exactly."""
    ws = tmp_path / "ws"
    common = ["--trait", "optimistic", "-w", str(ws)]
    gen = runner.invoke(app, ["generate", *common, "--questions", "1", "--max-new-tokens", "24"])
    assert gen.exit_code == 0, gen.output
    judge = ["--judge", "local:smollm2-135m"]
    first = runner.invoke(app, ["score", *common, *judge, "--json"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "small local judge" in first.stderr
    summary = json.loads(first.stdout)
    assert summary["rows"] == 10 and summary["requests_sent"] == 20
    # the "Score: " stem makes even a 135M judge answer with a number: nothing is left unscored
    assert summary["missing_trait"] == 0 and summary["missing_coherence"] == 0
    scores = pl.read_parquet(summary["artifact"])
    assert scores["trait_score"].is_between(0, 100).all() and scores["coherence_score"].is_between(0, 100).all()

    def rescore(threshold: float) -> dict:
        again = runner.invoke(
            app,
            ["score", *common, *judge, "--trait-threshold", str(threshold), "--coherence-threshold", "0", "--json"],
            catch_exceptions=False,
        )
        assert again.exit_code == 0, again.output
        redo = json.loads(again.stdout)
        assert redo["requests_sent"] == 0 and redo["cache_hits"] == 20  # new thresholds, same judgements
        return redo

    # a threshold no neg score can be under keeps nothing, and extract says so instead of extracting
    assert rescore(0)["kept_pairs"] == 0
    refused = runner.invoke(app, ["extract", *common])
    assert refused.exit_code == 2 and "no pair passed the judge's filter" in refused.output, refused.output

    # the highest pos score: kept are the pairs whose pos reaches it and whose neg is below it
    wide = scores.pivot(on="polarity", index="pair_id", values="trait_score")
    threshold = wide["pos"].max()
    expected = wide.filter((pl.col("pos") >= threshold) & (pl.col("neg") < threshold))["pair_id"].to_list()
    assert rescore(threshold)["kept_pairs"] == len(expected)
    ext = runner.invoke(app, ["extract", *common, "--json"])
    if expected:
        assert ext.exit_code == 0, ext.output
        assert json.loads(ext.stdout)["n_pairs"] == len(expected)
    else:  # the pair with the top pos score has a neg at least as high
        assert ext.exit_code == 2 and "no pair passed the judge's filter" in ext.output, ext.output
