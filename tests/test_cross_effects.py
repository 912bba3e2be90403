"""`eval --trait A --trait B`: the cross-effect table on a tiny model with a real loopback judge.
Its shape, its diagonal against each trait's own eval at the same layer and α, and zero effects
from a vector added at α = 0."""

from __future__ import annotations

import json

import polars as pl
import pytest
from judge_server import JudgeServer
from test_eval import hash_scorer
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.core.stats import mean_ci

runner = CliRunner()
TRAITS = ("optimistic", "evil")


def prepare_two(tmp_path, tiny_factory):
    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    common = ["--model", model, "-w", str(ws), "--dtype", "float32"]
    for trait in TRAITS:
        gen = runner.invoke(app, ["generate", "--trait", trait, *common, "--questions", "2", "--max-new-tokens", "6"])
        assert gen.exit_code == 0, gen.output
        ext = runner.invoke(app, ["extract", "--trait", trait, *common, "--aggregators", "mean_diff"])
        assert ext.exit_code == 0, ext.output
    return common


def judged(common, server, *extra):
    args = [
        "eval", *common, "--judge-base-url", server.base_url, "--judge", "fake-judge", "--questions", "3",
        "--temperature", "0", "--max-new-tokens", "5", "--batch-size", "3", "--random-seeds", "0",
        "--coherence-threshold", "0", "--no-plots", "--json", *extra,
    ]  # fmt: skip
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cross_effects_shape_diagonal_and_zero(isolated_env, tmp_path, tiny_factory):
    common = prepare_two(tmp_path, tiny_factory)
    grid = ["--layers", "2", "--coefficients", "4"]
    with JudgeServer(scorer=hash_scorer) as server:
        single = {t: judged(common, server, "--trait", t, *grid) for t in TRAITS}
        requests = server.total_requests
        table = judged(common, server, "--trait", "optimistic", "--trait", "evil", *grid)
        rejudged = server.total_requests - requests
        zero = judged(common, server, "--trait", "optimistic", "--trait", "evil", "--cross", "evil:2:0",
                      "--cross", "optimistic@response_avg/mean_diff:1:0")  # fmt: skip
        again = judged(common, server, "--trait", "optimistic", "--trait", "evil", *grid)
        human = runner.invoke(app, ["eval", *common, "--trait", "optimistic", "--trait", "evil", *grid,
                                    "--judge-base-url", server.base_url, "--judge", "fake-judge", "--questions", "3",
                                    "--temperature", "0", "--max-new-tokens", "5", "--batch-size", "3",
                                    "--random-seeds", "0", "--coherence-threshold", "0", "--no-plots"])  # fmt: skip
    # shape: rows = the steering vectors (each trait's at its grid's best), columns = the judged traits
    assert table["columns"] == list(TRAITS)
    assert table["rows"] == [f"{t}@response_avg/mean_diff:2:4" for t in TRAITS]
    assert [[(c["row"], c["column"]) for c in row] for row in table["matrix"]] == [
        [(r, c) for c in TRAITS] for r in table["rows"]
    ]
    samples = pl.read_parquet(table["files"]["samples"])
    for trait in TRAITS:  # α = 4 changes answers: the comparisons below are not between identical texts
        col = samples.filter(pl.col("column") == trait)
        base_texts = col.filter(pl.col("condition") == "unsteered").sort("question_index")["text"].to_list()
        assert any(
            col.filter(pl.col("row") == row).sort("question_index")["text"].to_list() != base_texts
            for row in table["rows"]
        )
    # per column: 3 unsteered answers and 3 per row, each judged for trait and coherence
    assert samples.height == 2 * (3 + 2 * 3)
    assert rejudged <= 2 * samples.height  # the single evals' judgements come from the judge cache
    # the diagonal is each trait's own eval at the same layer and α: the same answers, the same effect
    for i, trait in enumerate(TRAITS):
        own = pl.read_parquet(single[trait]["files"]["samples"])
        for condition, row in (("steered", table["rows"][i]), ("unsteered", None)):
            mine = samples.filter((pl.col("column") == trait) & (pl.col("condition") == condition))
            if row is not None:
                mine = mine.filter(pl.col("row") == row)
            theirs = own.filter(pl.col("condition") == condition)
            assert mine.sort("question_index")["text"].to_list() == theirs.sort("question_index")["text"].to_list()
        cells = {c["condition"]: c for c in single[trait]["cells"]}
        effect = cells["steered"]["trait_mean"] - cells["unsteered"]["trait_mean"]
        diagonal = table["matrix"][i][i]
        assert diagonal["trait"]["change"] == pytest.approx(effect, abs=1e-9)
        assert diagonal["steered_trait_mean"] == pytest.approx(cells["steered"]["trait_mean"], abs=1e-9)
    # an off-diagonal cell recomputed by hand from the saved answers: paired differences, t-interval
    col = samples.filter(pl.col("column") == "evil")
    base = col.filter(pl.col("condition") == "unsteered").sort("question_index")["trait_score"]
    steered = col.filter(pl.col("row") == table["rows"][0]).sort("question_index")["trait_score"]
    expected = mean_ci([s - b for s, b in zip(steered, base, strict=True)], bounds=(-100, 100))
    got = table["matrix"][0][1]["trait"]
    assert (got["change"], got["low"], got["high"], got["n"]) == (expected.mean, expected.low, expected.high, 3)
    # α = 0: every answer is the unsteered one, every effect exactly zero
    assert zero["rows"] == ["evil@response_avg/mean_diff:2:0", "optimistic@response_avg/mean_diff:1:0"]
    for row in zero["matrix"]:
        for cell in row:
            assert (cell["trait"]["change"], cell["trait"]["low"], cell["trait"]["high"]) == (0.0, 0.0, 0.0)
            assert cell["coherence"]["change"] == 0.0
    zero_samples = pl.read_parquet(zero["files"]["samples"])
    for trait in TRAITS:
        col = zero_samples.filter(pl.col("column") == trait)
        base_texts = col.filter(pl.col("condition") == "unsteered").sort("question_index")["text"].to_list()
        for row in zero["rows"]:
            assert col.filter(pl.col("row") == row).sort("question_index")["text"].to_list() == base_texts
    assert again["skipped"] is True and again["matrix"] == table["matrix"]
    assert human.exit_code == 0 and "cross effects" in human.stdout and "evil" in human.stdout


def test_cross_effect_input_errors(isolated_env, tmp_path, tiny_factory):
    common = prepare_two(tmp_path, tiny_factory)
    base = ["eval", *common, "--trait", "optimistic", "--trait", "evil", "--judge-base-url", "http://127.0.0.1:9"]
    for extra in (["--steer", "evil:1:1"], ["--cross", "evil:1:x"], ["--cross", "evil:1:1:bogus"],
                  ["--cross", "evil:9:1"], ["--cross", "evil:1-9:1:ablate"], ["--cross", "evil:1:p25:ablate"],
                  ["--cross", "evil:2:1", "--cross", "evil:2:1"], ["--vector", "evil"]):  # fmt: skip
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert one_error_line(result.output), (extra, result.output)


def one_error_line(output: str) -> bool:
    """An expected failure: one `error:` line, at most a hint after it."""
    lines = output.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    return len(errors) == 1 and len(lines) - errors[0] <= 2 and lines[-1].startswith(("error: ", "hint: "))


def test_a_cross_row_names_another_persona_s_file(isolated_env, tmp_path, tiny_factory):
    """`--cross trait:user:LAYER:ALPHA` steers with the user persona's file, as `--steer` does."""
    import torch
    from test_cli import extracted_workspace

    from personactl.model.loading import load_model
    from personactl.settings import Settings
    from personactl.steps.cross_effects import parse_cross, row_steering
    from personactl.steps.evaluate import Variant
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

    model = str(tiny_factory("llama"))
    ws, vector_path = extracted_workspace(tmp_path, model)
    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    vector = PersonaVector.load(vector_path)
    user = PersonaVector({k: v * 2 for k, v in vector.tensors.items()}, vector.metadata)
    user.save(Workspace(ws).vectors_path(lm.source.slug, "optimistic", "user"))
    row = parse_cross("optimistic:user:2:1", Variant("response_avg", "mean_diff", "raw"))
    (steering,) = row_steering(Settings(model=model), Workspace(ws), lm, [row])
    assert torch.equal(steering.direction, 2 * vector.direction(2))
