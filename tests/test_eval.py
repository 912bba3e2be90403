"""`personactl eval`: statistics against references, the summary logic on known data, the adaptive
search, and the whole command on a tiny model with a loopback judge (plots included)."""

from __future__ import annotations

import hashlib
import json
import math
import re

import polars as pl
import pytest
from judge_server import JudgeServer
from typer.testing import CliRunner

from personactl.backends import Generation, Sampling
from personactl.cli.app import app
from personactl.core.eval_summary import summarize
from personactl.core.stats import cohens_d, mean_ci, slope, t_quantile
from personactl.steps.evaluate import SAMPLES_SCHEMA, EvalSpec, Plan, Search, Variant, run_eval

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# two-sided 95% Student t quantiles t(0.975, df), from standard tables
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 19: 2.0930, 29: 2.0452}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_quantile_matches_scipy():
    from scipy import stats  # a dev dependency: the reference implementation

    for df in (1, 2, 3, 7, 50, 300):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_mean_ci_by_hand_and_edge_cases():
    ci = mean_ci([60.0, 70.0, None, 80.0, 90.0])
    sd = math.sqrt(sum((v - 75) ** 2 for v in (60, 70, 80, 90)) / 3)  # 12.9099
    half = 3.1824 * sd / 2
    assert (ci.n, ci.missing, ci.mean) == (4, 1, 75.0)
    assert ci.low == pytest.approx(75 - half, abs=1e-3) and ci.high == pytest.approx(75 + half, abs=1e-3)
    one = mean_ci([42.0, None])
    assert (one.mean, one.low, one.high, one.n, one.missing) == (42.0, None, None, 1, 1)
    none = mean_ci([None, None])
    assert (none.mean, none.low, none.n, none.missing) == (None, None, 0, 2)
    same = mean_ci([5.0, 5.0, 5.0])
    assert same.low == same.high == 5.0


def test_slope_and_cohens_d():
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert slope([1, 1], [0, 5]) is None
    assert slope([0, 1, 2, 3], [0, 1, 1, 3]) == pytest.approx(0.9)  # Σ(x-x̄)(y-ȳ)=4.5, Σ(x-x̄)²=5
    # pooled sd of (1,2,3) and (3,4,5) is 1: d = (2 - 4) / 1
    assert cohens_d([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0)
    assert cohens_d([1], [2, 3]) is None


def _sample(condition, layer=None, alpha=0.0, trait=None, coherence=None, variant=True, seed=None):
    row = dict.fromkeys(SAMPLES_SCHEMA)
    row.update(condition=condition, layer=layer, coefficient=alpha, random_seed=seed, round=0)
    row.update(question_index=0, sample_index=0, question="q", text="t", n_tokens=1, finish_reason="stop")
    row.update(trait_score=trait, coherence_score=coherence)
    if variant:
        row.update(position="response_avg", aggregator="mean_diff", norm_mode="raw")
    return row


def known_samples():
    """Layer 2 moves the trait 8/α, layer 1 only 3/α; coherence breaks at α=4 (and α=-4 at layer 1);
    the random vector does nothing; prompting reaches 80."""
    rows = []
    for t, c in ((10, 90), (12, 92), (8, 88)):
        rows.append(_sample("unsteered", trait=t, coherence=c, variant=False))
        rows.append(_sample("prompted", trait=t + 70, coherence=c, variant=False))
    for layer, gain in ((1, 3), (2, 8)):
        for alpha in (-4, 1, 2, 4):
            for noise in (-1, 0, 1):
                coherence = 20 if abs(alpha) >= 4 and (alpha > 0 or layer == 1) else 90
                rows.append(_sample("steered", layer, alpha, 10 + gain * alpha + noise, coherence + noise))
                rows.append(_sample("random", layer, alpha, 10 + noise, 90, seed=noise % 2))
    rows.append(_sample("steered", 2, 2.0, None, None))  # an unscored response counts as missing
    return pl.DataFrame(rows, schema=SAMPLES_SCHEMA)


def test_summary_best_layer_breaking_point_and_baselines():
    cells, summary = summarize(known_samples(), threshold=50)
    by = {(r["condition"], r["layer"], r["coefficient"]): r for r in cells.to_dicts()}
    cell = by[("steered", 2, 2.0)]
    assert (cell["n"], cell["trait_n"], cell["trait_missing"], cell["coherence_missing"]) == (4, 3, 1, 1)
    assert cell["trait_mean"] == pytest.approx(26.0)
    half = 4.3027 * 1.0 / math.sqrt(3)  # sd of (25, 26, 27) is 1
    assert cell["trait_low"] == pytest.approx(26 - half, abs=1e-3)
    layers = {a["layer"]: a for a in summary["layers"]}
    # fit over coherent αs plus the unsteered α=0 (mean 10): layer 2 uses (-4, 0, 1, 2)
    assert layers[2]["alphas_in_fit"] == [-4.0, 0.0, 1.0, 2.0] and layers[2]["slope"] == pytest.approx(8.0)
    assert layers[1]["alphas_in_fit"] == [0.0, 1.0, 2.0] and layers[1]["slope"] == pytest.approx(3.0)
    assert layers[1]["breaking_alpha_negative"] == -4.0 and layers[2]["breaking_alpha_negative"] is None
    best = summary["best"]
    assert (best["layer"], best["breaking_alpha"], best["recommended_alpha"]) == (2, 4.0, 2.0)
    assert best["trait_at_recommended"] == pytest.approx(26.0)
    assert best["random_trait_at_recommended"] == pytest.approx(10.0) and best["steered_minus_random"] == 16.0
    assert summary["baselines"]["unsteered"]["trait_mean"] == pytest.approx(10.0)
    versus = summary["prompting_vs_steering"]
    assert versus["prompted_trait"] == pytest.approx(80.0) and versus["prompting_ahead"] is True
    assert versus["cis_overlap"] is False
    # a stricter threshold: nothing is coherent any more except the baselines, no α is recommended
    _, strict = summarize(known_samples(), threshold=95)
    assert all(a["recommended_alpha"] is None for a in strict["layers"])
    assert strict["best"] is None or strict["best"]["slope"] is None


class TextRunner:
    """Stands in for the engine in the adaptive test: the response text names its cell."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, rows, directions, *, sampling, seed, batch_size, positions, on_chunk):
        self.calls += 1
        for row in rows:
            yield row, Generation([1], f"layer={row.layer} alpha={row.coefficient}", "stop")


def coherence_scorer(limits):
    """Trait = 10·α; coherence 90 up to the layer's limit α, 10 beyond it."""

    def scorer(prompt):
        match = re.search(r"layer=(\w+) alpha=([-\d.]+)", prompt)
        layer, alpha = match.group(1), float(match.group(2))
        ok = layer == "None" or alpha <= limits[int(layer)]
        value = (90 if ok else 10) if "coherent" in prompt else min(100, int(10 * alpha))
        return [(str(value), math.log(0.9)), ("x", math.log(0.1))]

    return scorer


def test_adaptive_search_finds_the_largest_coherent_alpha():
    import torch

    from personactl.judging.remote import RemoteJudge
    from personactl.store.traits import load_trait

    trait = load_trait("optimistic")
    plan = Plan(["q0", "q1"], 1, ["sys", "sys"], [[1], [1], [1], [1]])
    spec = EvalSpec(adaptive=True, rounds=5, alpha_start=1.0, max_alpha=8.0, random_seeds=1)
    with JudgeServer(scorer=coherence_scorer({1: 3.0, 2: 100.0, 3: 5.0})) as server:
        judge = RemoteJudge("fake", base_url=server.base_url, api_key="x", mode="single", cache=None)
        samples = run_eval(
            runner=TextRunner(),
            judge=judge,
            trait=trait,
            plan=plan,
            spec=spec,
            layers=[1, 2, 3],
            directions={Variant(): {layer: torch.ones(4) for layer in (1, 2, 3)}},
            threshold=50,
            sampling=Sampling(4, 0.0),
            seed=0,
            batch_size=8,
        )
    probed = {
        layer: sorted(samples.filter((pl.col("condition") == "steered") & (pl.col("layer") == layer))["coefficient"])
        for layer in (1, 2, 3)
    }
    assert sorted(set(probed[1])) == [1.0, 2.0, 3.0, 3.5, 4.0]  # 1, 2, 4 (broken), then bisect: 3, 3.5
    assert sorted(set(probed[2])) == [1.0, 2.0, 4.0, 8.0]  # coherent up to max_alpha: stops there
    assert sorted(set(probed[3])) == [1.0, 2.0, 4.0, 6.0, 8.0]  # 8 and 6 broken
    _, summary = summarize(samples, 50)
    found = {a["layer"]: (a["recommended_alpha"], a["breaking_alpha"]) for a in summary["layers"]}
    assert found == {1: (3.0, 3.5), 2: (8.0, None), 3: (4.0, 6.0)}
    assert (
        samples.filter(pl.col("condition") == "random").height
        == samples.filter(pl.col("condition") == "steered").height
    )


def test_search_state_machine():
    s = Search(next=1.0)
    for alpha, coherent in ((1, True), (2, True), (4, False), (3, False)):
        s.update(alpha, coherent, 16)
    assert (s.good, s.bad, s.next) == (2, 3, 2.5)


def hash_scorer(prompt):
    """A deterministic judge: a score from the prompt's hash (so from the response text)."""
    value = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 101
    return [(str(value), math.log(0.9)), ("x", math.log(0.1))]


def prepare(tmp_path, tiny_factory):
    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    common = ["--trait", "optimistic", "--model", model, "-w", str(ws), "--dtype", "float32"]
    gen = runner.invoke(app, ["generate", *common, "--questions", "2", "--max-new-tokens", "6"])
    assert gen.exit_code == 0, gen.output
    ext = runner.invoke(app, ["extract", *common, "--aggregators", "mean_diff"])
    assert ext.exit_code == 0, ext.output
    return common


def samples_height(summary):
    return pl.read_parquet(summary["files"]["samples"]).height


def assert_png(path):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100


def test_eval_command_grid_baselines_plots_and_skip(isolated_env, tmp_path, tiny_factory):
    common = prepare(tmp_path, tiny_factory)
    with JudgeServer(scorer=hash_scorer) as server:
        args = [
            "eval",
            *common,
            "--judge-base-url",
            server.base_url,
            "--judge",
            "fake-judge",
            "--layers",
            "1,2",
            "--coefficients=-2,0,1,4",
            "--questions",
            "3",
            "--samples",
            "2",
            "--temperature",
            "1",
            "--max-new-tokens",
            "5",
            "--random-seeds",
            "2",
            "--json",
        ]
        dry = runner.invoke(app, [*args, "--dry-run"], catch_exceptions=False)
        assert dry.exit_code == 0 and server.total_requests == 0, dry.output
        estimate = json.loads(dry.stdout)
        # 2 baselines + 2 layers × 3 αs ≠ 0 × (steered + random), each 3 questions × 2 samples
        assert (estimate["generations"], estimate["judgements"]) == (6 * 2 + 2 * 3 * 2 * 6, 2 * 84)
        assert estimate["max_new_tokens_total"] == 84 * 5 and estimate["tokens_per_second"] > 0
        worded = runner.invoke(app, [a for a in args if a != "--json"] + ["--dry-run"]).stdout
        assert "would generate 84 responses" in worded and "tok/s measured here" in worded
        first = runner.invoke(app, args, catch_exceptions=False)
        assert first.exit_code == 0, first.output
        summary = json.loads(first.stdout)
        assert samples_height(summary) == estimate["generations"]
        requests = server.total_requests
        again = runner.invoke(app, args, catch_exceptions=False)
        assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] is True
        assert server.total_requests == requests  # nothing regenerated or rejudged
        stricter = runner.invoke(app, [*args, "--coherence-threshold", "90"], catch_exceptions=False)
        assert server.total_requests == requests  # a new threshold only redoes the summary
    assert stricter.exit_code == 0 and json.loads(stricter.stdout)["coherence_threshold"] == 90
    assert summary["skipped"] is False
    samples = pl.read_parquet(summary["files"]["samples"])
    count = lambda **kw: samples.filter(pl.all_horizontal(pl.col(k) == v for k, v in kw.items())).height  # noqa: E731
    # 3 questions × 2 samples per cell: 2 baselines, 2 layers × 3 αs (α=0 is the unsteered cell), steered + random
    assert count(condition="unsteered") == count(condition="prompted") == 6
    assert count(condition="steered") == count(condition="random") == 2 * 3 * 6
    assert set(samples.filter(pl.col("condition") == "random")["random_seed"]) == {0, 1}
    assert samples.filter(pl.col("condition") == "prompted")["system_prompt"].null_count() == 0
    assert samples["trait_score"].null_count() == 0
    # every cell's statistics recomputed from the samples, by hand
    cells = pl.read_parquet(summary["files"]["cells"])
    assert cells.height == 2 + 2 * 2 * 3
    for cell in cells.iter_rows(named=True):
        mine = samples.filter(
            (pl.col("condition") == cell["condition"]) & (pl.col("coefficient") == cell["coefficient"])
        )
        if cell["layer"] is not None:
            mine = mine.filter(pl.col("layer") == cell["layer"])
        values = mine["trait_score"].to_list()
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert cell["trait_mean"] == pytest.approx(mean)
        assert cell["trait_high"] - mean == pytest.approx(2.5706 * sd / math.sqrt(6), abs=1e-3)  # t(0.975, 5)
    # the best layer is the largest least-squares slope over the coherent αs plus α=0
    threshold = summary["coherence_threshold"]
    base = cells.filter(pl.col("condition") == "unsteered").row(0, named=True)
    slopes = {}
    for layer in (1, 2):
        pts = [
            (c["coefficient"], c["trait_mean"])
            for c in cells.filter((pl.col("condition") == "steered") & (pl.col("layer") == layer)).iter_rows(named=True)
            if c["coherence_mean"] >= threshold
        ]
        pts += [(0.0, base["trait_mean"])] if base["coherence_mean"] >= threshold else []
        slopes[layer] = slope([p[0] for p in pts], [p[1] for p in pts])
    assert {a["layer"]: a["slope"] for a in summary["layers"]} == pytest.approx(slopes)
    if any(v is not None for v in slopes.values()):
        assert summary["best"]["layer"] == max((s, -k) for k, s in slopes.items() if s is not None)[1] * -1
    assert len(summary["files"]["plots"]) == 2
    for path in summary["files"]["plots"]:
        assert_png(path)
    table = runner.invoke(app, [a for a in args if a != "--json"], catch_exceptions=False)
    assert "prompted" in table.stdout and "random" in table.stdout and "CI: Student t-interval" in table.stdout


def test_eval_proxy_without_a_judge(isolated_env, tmp_path, tiny_factory):
    common = prepare(tmp_path, tiny_factory)
    args = ["eval", *common, "--proxy", "--questions", "4", "--max-new-tokens", "5", "--temperature", "0", "--json"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["label"].startswith("proxy:")
    assert [r["layer"] for r in summary["layers"]] == [1, 2, 3]
    assert all(r["n_pos"] == r["n_neg"] == 4 for r in summary["layers"])
    d = {r["layer"]: r["cohens_d"] for r in summary["layers"] if r["cohens_d"] is not None}
    assert summary["best_layer"] == max(d, key=d.get)
    assert_png(summary["files"]["plots"][0])


def test_compare_writes_a_cosine_heatmap(isolated_env, tmp_path, tiny_factory):
    common = prepare(tmp_path, tiny_factory)
    ws = common[common.index("-w") + 1]
    model = common[common.index("--model") + 1]
    out = tmp_path / "cos.png"
    result = runner.invoke(
        app,
        ["compare", "optimistic@response_avg", "optimistic@prompt_end", "optimistic@response_start",
         "-w", ws, "--model", model, "--plot", str(out)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_png(out)


def test_a_baseline_below_the_threshold_is_diagnosed_not_blamed_on_the_alphas():
    from personactl.cli.eval import recommendation_lines

    incoherent = known_samples().with_columns(
        pl.when(pl.col("condition") == "unsteered")
        .then(39.1)
        .otherwise(pl.col("coherence_score"))
        .alias("coherence_score")
    )
    _, summary = summarize(incoherent, threshold=95)
    assert summary["diagnosis"]["kind"] == "baseline_below_threshold"
    summary.update(artifact="a", files={"cells": "c", "plots": []})
    text = "\n".join(recommendation_lines(summary))
    assert "unsteered model's own coherence is 39.1, below the threshold 95" in text
    assert "--coherence-threshold" in text and "smaller αs" not in text
    _, fine = summarize(known_samples(), threshold=50)
    assert fine["diagnosis"]["kind"] is None
    _, strict = summarize(known_samples(), threshold=91)  # baseline 90 < 91 as well
    assert strict["diagnosis"]["kind"] == "baseline_below_threshold"
    _, steep = summarize(
        known_samples()
        .filter(pl.col("coefficient").abs() < 4)
        .with_columns(
            pl.when(pl.col("condition") == "steered")
            .then(10.0)
            .otherwise(pl.col("coherence_score"))
            .alias("coherence_score")
        ),
        threshold=50,
    )
    assert steep["diagnosis"]["kind"] == "alphas_too_large"
    assert "smaller αs" in steep["diagnosis"]["hint"]
