"""`eval --steer SPEC`: a steering plan on every steered and random row of the grid, the plan alone
as its own cell, and a plan evaluated with no sweep at all; a tiny model and a real loopback judge."""

from __future__ import annotations

import json

import polars as pl
import pytest
from judge_server import JudgeServer
from test_eval import hash_scorer, prepare
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.core.stats import mean_ci

runner = CliRunner()


def eval_args(common, server, *extra):
    return [
        "eval", *common, "--judge-base-url", server.base_url, "--judge", "fake-judge", "--questions", "3",
        "--temperature", "0", "--max-new-tokens", "5", "--no-plots", "--json", *extra,
    ]  # fmt: skip


def run_eval(args):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    return summary, pl.read_parquet(summary["files"]["samples"])


def texts(samples, condition):
    rows = samples.filter(pl.col("condition") == condition).sort("question_index", "sample_index")
    return rows["text"].to_list()


def test_a_plan_follows_every_steered_row_and_runs_alone(isolated_env, tmp_path, tiny_factory):
    common = prepare(tmp_path, tiny_factory)
    grid = ["--vector", "optimistic", "--layers", "1", "--coefficients", "2", "--random-seeds", "1"]
    with JudgeServer(scorer=hash_scorer) as server:
        plain, plain_samples = run_eval(eval_args(common, server, *grid))
        noop, noop_samples = run_eval(eval_args(common, server, *grid, "--steer", "optimistic:2:0"))
        strong, strong_samples = run_eval(eval_args(common, server, *grid, "--steer", "optimistic:2:40"))
    assert noop["artifact"] != plain["artifact"] and "plan" not in plain and plain["plan_effect"] is None
    # conditions and the plan column: the baselines stay unsteered, the rest follows the plan
    for samples in (noop_samples, strong_samples):
        counts = dict(samples.group_by("condition").len().iter_rows())
        assert counts == {"unsteered": 3, "prompted": 3, "plan": 3, "steered": 3, "random": 3}
        planned = samples.filter(pl.col("plan").is_not_null())["condition"].unique().sort().to_list()
        assert planned == ["plan", "random", "steered"]
    assert set(strong_samples["plan"].drop_nulls()) == {"--steer optimistic:2:40:add"}
    assert strong["plan"]["terms"][0]["spec"] == "optimistic:2:40:add" and strong["plan"]["terms"][0]["op"] == "add"
    # an add of 0 changes nothing, exactly: the plan cell is the unsteered answers, the steered cells the plain ones
    assert texts(noop_samples, "plan") == texts(noop_samples, "unsteered") == texts(plain_samples, "unsteered")
    for condition in ("steered", "random", "prompted"):
        assert texts(noop_samples, condition) == texts(plain_samples, condition)
    assert noop["plan_effect"]["trait"]["change"] == 0.0 and noop["plan_effect"]["trait"]["high"] == 0.0
    # a strong plan moves the plan cell and the steered and random rows; the baselines stay as they were
    assert texts(strong_samples, "unsteered") == texts(plain_samples, "unsteered")
    for condition in ("plan", "steered", "random"):
        assert texts(strong_samples, condition) != texts(
            plain_samples, "unsteered" if condition == "plan" else condition
        )
    # the plan effect: paired differences of the judge's scores, recomputed by hand
    base = strong_samples.filter(pl.col("condition") == "unsteered").sort("question_index")
    alone = strong_samples.filter(pl.col("condition") == "plan").sort("question_index")
    diffs = [a - b for a, b in zip(alone["trait_score"], base["trait_score"], strict=True)]
    expected = mean_ci(diffs, bounds=(-100, 100))
    got = strong["plan_effect"]["trait"]
    assert (got["change"], got["low"], got["high"], got["n"]) == (expected.mean, expected.low, expected.high, 3)
    # the α = 0 point of the slope is the plan cell under a plan
    plan_cell = next(c for c in strong["cells"] if c["condition"] == "plan")
    assert plan_cell["trait_mean"] == sum(alone["trait_score"]) / 3
    steered_cell = next(c for c in strong["cells"] if c["condition"] == "steered")
    expected_fit = sorted([0.0] * bool(plan_cell["coherent"]) + [2.0] * bool(steered_cell["coherent"]))
    assert strong["layers"][0]["alphas_in_fit"] == expected_fit
    if len(expected_fit) == 2:  # the slope runs from the plan cell, not from the unsteered one
        assert strong["layers"][0]["slope"] == pytest.approx((steered_cell["trait_mean"] - plan_cell["trait_mean"]) / 2)


def test_a_plan_alone_equals_the_same_add_swept(isolated_env, tmp_path, tiny_factory):
    """Without --vector a plan is evaluated alone; `optimistic:1:2` adds what `--layers 1
    --coefficients 2` adds, so the plan cell answers exactly as that steered cell."""
    common = prepare(tmp_path, tiny_factory)
    with JudgeServer(scorer=hash_scorer) as server:
        swept, swept_samples = run_eval(
            eval_args(common, server, "--layers", "1", "--coefficients", "2", "--random-seeds", "0")
        )
        dry = runner.invoke(app, [*eval_args(common, server, "--steer", "optimistic:1:2"), "--dry-run"])
        alone, alone_samples = run_eval(eval_args(common, server, "--steer", "optimistic:1:2"))
        again = runner.invoke(app, eval_args(common, server, "--steer", "optimistic:1:2"), catch_exceptions=False)
    assert json.loads(dry.stdout)["generations"] == 9  # unsteered, prompted, plan × 3 questions
    assert dict(alone_samples.group_by("condition").len().iter_rows()) == {"unsteered": 3, "prompted": 3, "plan": 3}
    assert texts(alone_samples, "plan") == texts(swept_samples, "steered")
    assert texts(alone_samples, "unsteered") == texts(swept_samples, "unsteered")
    assert alone["layers"] == [] and alone["best"] is None and alone["diagnosis"]["kind"] is None
    assert alone["plan_effect"]["trait"]["change"] is not None
    steered = next(c for c in swept["cells"] if c["condition"] == "steered")
    unsteered = next(c for c in swept["cells"] if c["condition"] == "unsteered")
    assert alone["plan_effect"]["trait"]["change"] == pytest.approx(
        steered["trait_mean"] - unsteered["trait_mean"], abs=1e-9
    )
    assert json.loads(again.stdout)["skipped"] is True
    manifest = json.loads(open(alone["artifact"].removesuffix(".parquet") + ".manifest.json").read())
    assert manifest["fingerprint"]["plan"][0]["spec"] == "optimistic:1:2:add"
    assert manifest["summary"]["plan"]["terms"][0]["applied"] == {"1": 2.0}
    table = runner.invoke(app, [a for a in eval_args(common, server, "--steer", "optimistic:1:2") if a != "--json"])
    assert "the plan alone vs unsteered" in table.stdout and "--steer optimistic:1:2:add" in table.stdout


def test_bad_plans_fail_in_one_line(isolated_env, tmp_path, tiny_factory):
    common = prepare(tmp_path, tiny_factory)
    for extra in (["--steer", "optimistic:1:x"], ["--steer", "optimistic:1:1", "--proxy"],
                  ["--steer", "optimistic:1:1", "--adaptive"], ["--steer", "optimistic:9:1"]):  # fmt: skip
        result = runner.invoke(app, ["eval", *common, "--judge-base-url", "http://127.0.0.1:9", *extra])
        assert result.exit_code == 2, (extra, result.output)
