"""The `probe` aggregator: a logistic-regression direction per row (core/probe.py), its held-out
accuracy, and `extract --aggregators probe` end to end (steps/extract_probe.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.core import probe as probe_module
from personactl.core.directions import cosine, unit
from personactl.core.probe import direction, fit_probe, split_pairs
from personactl.store.vectors import PersonaVector

runner = CliRunner()
MOOD_PAIRS = Path(__file__).parent / "data" / "mood_pairs.jsonl"


def planted(n: int, hidden: int, rows: int = 2, *, shift: float = 6.0, sign: float = 1.0, seed: int = 0):
    """Pairs whose classes differ by `shift` along u (unit noise) and by as much along v, where the
    noise is ten times larger: the best linear separator is ≈ u, the mean difference is u + v
    (cosine ≈ 0.71 with u). Each pair shares a random content vector, as pairs share a prompt."""
    g = torch.Generator().manual_seed(seed)
    u = unit(torch.randn(rows, hidden, generator=g))
    v = torch.randn(rows, hidden, generator=g)
    v = unit(v - (v * u).sum(-1, keepdim=True) * u)
    content = torch.randn(n, rows, hidden, generator=g)

    def noise():
        return torch.randn(n, rows, hidden, generator=g) + 10 * torch.randn(n, rows, 1, generator=g) * v

    pos = content + noise() + (sign * shift * u + shift * v) / 2
    neg = content + noise() - (sign * shift * u + shift * v) / 2
    return pos, neg, sign * u


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_probe_recovers_a_planted_direction_that_the_mean_difference_misses(sign):
    pos, neg, u = planted(2000, 16, sign=sign)
    fit = fit_probe(pos, neg, seed=0)
    mean_diff = pos.mean(0) - neg.mean(0)
    assert (cosine(fit.directions, u) > 0.99).all(), cosine(fit.directions, u)
    assert (cosine(mean_diff, u) < 0.8).all()  # so the probe is not the mean difference renamed
    torch.testing.assert_close(torch.linalg.vector_norm(fit.directions, dim=-1), torch.ones(2))
    assert ((fit.directions * mean_diff).sum(-1) > 0).all()  # signed as the mean difference
    assert fit.directions.dtype == torch.float32
    assert (fit.train_pairs, fit.test_pairs) == (1600, 400)


def test_the_sign_follows_the_mean_difference_whatever_the_fit_returns(monkeypatch):
    """The sign rule is applied, not inherited: with the fitted weights negated, the direction is the same."""
    pos, neg, _ = planted(400, 16)
    before = direction(torch.cat([pos, neg]).transpose(0, 1), torch.cat([torch.ones(400), torch.zeros(400)]))
    fit_logistic = probe_module.fit_logistic
    monkeypatch.setattr(probe_module, "fit_logistic", lambda *a, **k: tuple(-t for t in fit_logistic(*a, **k)))
    after = direction(torch.cat([pos, neg]).transpose(0, 1), torch.cat([torch.ones(400), torch.zeros(400)]))
    assert torch.equal(before, after)


def test_held_out_accuracy_is_high_when_separable_and_near_chance_for_random_labels():
    pos, neg, _ = planted(200, 16, shift=20.0)
    separable = fit_probe(pos, neg, seed=0)
    assert (separable.accuracy == 1.0).all(), separable.accuracy
    # random labels, more hidden units than examples: a fit on the training pairs separates them,
    # so an accuracy computed on them would be ~1; held out, it is chance
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 8, 64, generator=g), torch.randn(40, 8, 64, generator=g)
    random = fit_probe(a, b, seed=0)
    assert random.test_pairs == 8 and random.accuracy.shape == (8,)
    assert 0.3 < float(random.accuracy.mean()) < 0.7, random.accuracy
    w, bias, frame = probe_module._fit(*probe_module._examples(a, b), probe_module.L2)
    x, labels = probe_module._examples(a, b)
    train_accuracy = (((torch.einsum("rmh,rh->rm", frame.apply(x), w) + bias[:, None]) > 0) == labels.bool()).double()
    assert float(train_accuracy.mean()) > 0.9  # what the held-out split protects against


def test_split_keeps_pairs_whole_and_follows_the_seed():
    train, test = split_pairs(50, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert sorted(torch.cat([train, test]).tolist()) == list(range(50))
    again = split_pairs(50, seed=3)
    assert torch.equal(again[1], test) and not torch.equal(split_pairs(50, seed=4)[1], test)
    assert len(split_pairs(1, 0)[1]) == 0 and len(split_pairs(2, 0)[1]) == 1 and len(split_pairs(3, 0)[0]) == 2
    # one pair: nothing to hold out, so no accuracy; a direction all the same
    one = fit_probe(*[t[:1] for t in planted(5, 8)[:2]], seed=0)
    assert one.test_pairs == 0 and torch.isnan(one.accuracy).all() and torch.isfinite(one.directions).all()


def test_the_fit_is_deterministic_and_the_seed_moves_only_the_split():
    pos, neg, _ = planted(300, 32, rows=3, shift=3.0)
    a, b = fit_probe(pos, neg, seed=0), fit_probe(pos, neg, seed=0)
    assert torch.equal(a.directions, b.directions) and torch.equal(a.accuracy, b.accuracy)
    other = fit_probe(pos, neg, seed=1)
    assert torch.equal(other.directions, a.directions)  # refitted on every pair: the seed does not matter
    assert not torch.equal(other.accuracy, a.accuracy)


def test_rows_without_a_direction_are_nan():
    pos, neg, _ = planted(20, 8, rows=3)
    pos[:, 0] = neg[:, 0] = 1.5  # every example the same at row 0
    neg[:, 1] = pos[:, 1]  # each pair's two sides the same at row 1 (a shared prompt's last token)
    fit = fit_probe(pos, neg, seed=0)
    assert torch.isnan(fit.directions[:2]).all() and torch.isnan(fit.accuracy[:2]).all()
    assert torch.isfinite(fit.directions[2]).all() and float(fit.accuracy[2]) >= 0.5


def test_readout_probe_is_one_vs_rest_unit_and_signed_to_its_concept():
    from personactl.steps.readout import one_vs_rest

    pos, neg, u = planted(500, 16, rows=2)
    values = torch.cat([pos, neg])  # concept 0: the positives; -1: a neutral pool
    vectors = one_vs_rest(values, [0] * 500 + [-1] * 500, 1, "probe")  # [R, 1, H]
    assert vectors.shape == (2, 1, 16)
    assert (cosine(vectors[:, 0], u) > 0.98).all(), cosine(vectors[:, 0], u)


def test_default_extraction_makes_no_second_pass(isolated_env, tiny_factory, monkeypatch, tmp_path):
    """probe is an aggregator, not a default: without it nothing reads the pairs per example."""
    import personactl.model.example_activations as example_activations

    def refuse(*args, **kwargs):
        raise AssertionError("read_examples ran without --aggregators probe")

    monkeypatch.setattr(example_activations, "read_examples", refuse)
    model = str(tiny_factory("llama"))
    common = ["--pairs", str(MOOD_PAIRS), "--model", model, "-w", str(tmp_path / "ws"), "--dtype", "float32", "--json"]
    result = runner.invoke(app, ["extract", *common])
    assert result.exit_code == 0, result.output
    vector = PersonaVector.load(json.loads(result.stdout)["artifact"])
    assert vector.aggregators == ["mean_diff", "pca"] and not any(k.startswith("probe.") for k in vector.tensors)
    assert "probe" not in vector.metadata
    asked = runner.invoke(app, ["extract", *common, "--aggregators", "mean_diff,probe", "--force"])
    assert asked.exit_code != 0 and "read_examples ran" in asked.stderr  # the patch does see a probe run


def test_probe_read_one_position_a_pass_and_fitted_row_by_row_is_the_same(tiny_factory, monkeypatch):
    """Past the memory budgets the readings come one position a pass and the fits a row at a time:
    the same directions (to L-BFGS's tolerance) and accuracies, and a note that says so."""
    from personactl.model.loading import load_model
    from personactl.steps import extract_probe
    from personactl.steps.extract import pairs_from_jsonl

    lm = load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)
    pairs, _ = pairs_from_jsonl(MOOD_PAIRS, lm.tokenizer)
    positions, rows = ["response_start", "response_avg"], [0, 1, 2, 3]
    whole, meta = extract_probe.probe_vectors(lm, pairs, positions, rows, seed=0, batch_tokens=4096)
    monkeypatch.setattr(extract_probe, "READ_BYTES", 1)
    monkeypatch.setattr(extract_probe, "FIT_BYTES", 1)
    notes = []
    split, split_meta = extract_probe.probe_vectors(
        lm, pairs, positions, rows, seed=0, batch_tokens=4096, note=notes.append
    )
    assert "read in 2 passes, one per position" in notes[0]
    assert split_meta["n_tokens"] == 2 * meta["n_tokens"]
    assert sorted(split) == ["probe.response_avg", "probe.response_start"]
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=0, atol=1e-5, equal_nan=True)
    assert split_meta["positions"] == meta["positions"]


def test_unknown_aggregator_is_refused_before_the_model_loads(isolated_env, tmp_path):
    """One line, exit 2, before anything else is checked or loaded (the model here does not exist)."""
    result = runner.invoke(
        app,
        [
            "extract",
            "--pairs",
            str(MOOD_PAIRS),
            "--model",
            "/no/such/model",
            "-w",
            str(tmp_path),
            "--aggregators",
            "svm",
        ],
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --aggregators 'svm' is not one of mean_diff, pca, probe")


@pytest.mark.slow
def test_extract_probe_on_the_embedded_model_then_steer_with_it(isolated_env, tmp_path):
    """`extract --aggregators probe` on SmolLM2: unit `probe.*` tensors signed as the mean difference,
    equal to a probe fitted on the pairs' own readings, the held-out accuracy per position and row
    in the metadata (and the table); `steer --aggregator probe` steers with the unit vector."""
    from personactl.model.example_activations import read_examples
    from personactl.model.loading import load_model
    from personactl.steps.extract import pairs_from_jsonl

    ws, rows, positions = tmp_path / "ws", list(range(10, 17)), ["prompt_end", "response_avg"]
    common = ["--model", "smollm2-135m", "-w", str(ws), "--dtype", "float32"]
    args = ["extract", "--pairs", str(MOOD_PAIRS), "--layers", "10-16", "--positions", ",".join(positions)]
    result = runner.invoke(app, [*args, "--aggregators", "mean_diff,probe", *common, "--json"])
    assert result.exit_code == 0, result.output
    assert "second forward pass over the 8 pairs" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["aggregators"] == ["mean_diff", "probe"] and "probe_seconds" in doc
    assert [r["layer"] for r in doc["layers"]] == rows and all(0 <= r["probe_accuracy"] <= 1 for r in doc["layers"])
    vector = PersonaVector.load(doc["artifact"])
    meta = vector.metadata["probe"]
    assert meta["seed"] == 0 and meta["rows"] == rows and meta["l2"] == probe_module.L2
    lm = load_model("smollm2-135m", dtype="float32", log=lambda m: None)
    pairs, _ = pairs_from_jsonl(MOOD_PAIRS, lm.tokenizer)
    examples = [p.pos for p in pairs] + [p.neg for p in pairs]
    readings = read_examples(
        lm.model, lm.layers, examples, pad_id=lm.tokenizer.pad_token_id, rows=rows, positions=positions
    )
    # mood pairs share their prompt: prompt_end is the same on both sides of every pair, no direction
    assert torch.isnan(vector.get("prompt_end", "probe")).all()
    assert meta["positions"]["prompt_end"]["accuracy"] == [None] * len(rows)
    table = vector.get("response_avg", "probe")
    assert table.shape == (31, 576) and torch.isnan(table[:10]).all() and torch.isnan(table[17:]).all()
    torch.testing.assert_close(torch.linalg.vector_norm(table[rows], dim=-1), torch.ones(len(rows)))
    assert ((table[rows] * vector.get("response_avg")[rows]).sum(-1) > 0).all()
    reference = fit_probe(readings.values[:8, 1], readings.values[8:, 1], seed=0)
    torch.testing.assert_close(table[rows], reference.directions, rtol=0, atol=1e-6)
    stats = meta["positions"]["response_avg"]
    assert (stats["train_pairs"], stats["test_pairs"]) == (6, 2)
    assert stats["accuracy"] == pytest.approx(reference.accuracy.tolist())
    assert min(stats["accuracy"]) >= 0.75  # happy and sad replies part clearly on held-out pairs

    shown = runner.invoke(app, ["show", doc["artifact"], "--json"])
    assert shown.exit_code == 0 and "probe.response_avg" in json.loads(shown.stdout)["directions"]
    steer = ["steer", "--vector", doc["artifact"], "--prompt", "How was your day?", "--layers", "12"]
    steered = runner.invoke(
        app, [*steer, "--aggregator", "probe", "--coefficients=30", "--max-new-tokens", "12", *common, "--json"]
    )
    assert steered.exit_code == 0, steered.output
    baseline, moved = (json.loads(line) for line in steered.stdout.splitlines())
    assert baseline["baseline"] and not moved["baseline"] and moved["aggregator"] == "probe"
    assert moved["vector_norm"] == pytest.approx(1.0) and moved["effective_norm"] == pytest.approx(30.0)
    assert moved["text"] != baseline["text"]
