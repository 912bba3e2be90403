"""`eval --trait A --trait B --proxy`: the cross-effect table without a judge, on a tiny model.
The same answers as the judged table, cells recomputed by hand from per-answer readings, exact
zeros for α = 0, steering-plan rows (judged and proxy), and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from judge_server import JudgeServer
from test_cross_effects import judged, one_error_line, prepare_two
from test_eval import hash_scorer
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.core.stats import mean_ci

runner = CliRunner()
TRAITS = ("optimistic", "evil")
GEN = ["--questions", "3", "--temperature", "0", "--max-new-tokens", "5", "--batch-size", "3", "--no-plots"]
ROWS = ["--cross", "optimistic:2:4", "--cross", "evil:2:0", "--cross", "evil:1-2:2", "--cross", "optimistic:2:0:ablate"]


def proxy_table(common, *extra):
    args = ["eval", *common, "--trait", "optimistic", "--trait", "evil", "--proxy", *GEN, "--json", *extra]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def naive_cells(samples: pl.DataFrame, model: str, ws, layer: int) -> dict[tuple[str, str], object]:
    """Every cell again: each answer read alone with `read_examples`, projected on the column's unit
    vector, divided by the norm of the column's mean difference, paired with its unsteered answer."""
    from personactl.model.chat_format import chat_messages, encode_example
    from personactl.model.example_activations import read_examples
    from personactl.model.loading import load_model
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    scores = []
    for answer in samples.iter_rows(named=True):
        vector = PersonaVector.load(Workspace(Path(ws)).find_vector(answer["column"], lm.source.slug))
        difference = vector.at(layer, "response_avg", "mean_diff")
        unit = difference / torch.linalg.vector_norm(difference)
        example = encode_example(
            lm.tokenizer, chat_messages(None, answer["question"]), response_ids=answer["token_ids"]
        )
        assert lm.tokenizer.decode(answer["token_ids"], skip_special_tokens=True) == answer["text"]
        read = read_examples(
            lm.model, lm.layers, [example], pad_id=lm.tokenizer.pad_token_id, rows=[layer], positions=["response_avg"]
        )
        scores.append(float((read.values[0, 0, 0] * unit).sum()) / float(torch.linalg.vector_norm(difference)))
    scored = samples.with_columns(pl.Series("naive", scores))
    cells = {}
    for (column, row), steered in scored.filter(pl.col("condition") == "steered").group_by("column", "row"):
        base = scored.filter((pl.col("column") == column) & (pl.col("condition") == "unsteered"))
        pairs = steered.join(base, on=["question_index", "sample_index"], suffix="_base")
        cells[(column, row)] = mean_ci((pairs["naive"] - pairs["naive_base"]).to_list())
    return cells


def test_proxy_table_scores_the_judged_answers_and_equals_a_naive_reading(isolated_env, tmp_path, tiny_factory):
    common = prepare_two(tmp_path, tiny_factory)
    proxy = proxy_table(common, "--layers", "2", *ROWS)
    with JudgeServer(scorer=hash_scorer) as server:
        table = judged(common, server, "--trait", "optimistic", "--trait", "evil", *ROWS)
    labels = [
        "optimistic@response_avg/mean_diff:2:4",
        "evil@response_avg/mean_diff:2:0",
        "evil@response_avg/mean_diff:1-2:2:add",
        "optimistic@response_avg/mean_diff:2:0:ablate",
    ]
    assert proxy["rows"] == table["rows"] == labels and proxy["columns"] == table["columns"] == list(TRAITS)
    assert "separation" in proxy["unit"]
    assert [(c["trait"], c["layer"], c["chosen_by"]) for c in proxy["column_settings"]] == [
        (t, 2, "--layers") for t in TRAITS
    ]
    # the same answers the judged table scores, steering-plan rows included
    keys = ["column", "row", "question_index", "sample_index"]
    mine = pl.read_parquet(proxy["files"]["samples"]).sort(keys, nulls_last=False)
    theirs = pl.read_parquet(table["files"]["samples"]).sort(keys, nulls_last=False)
    assert mine.select(*keys, "text").equals(theirs.select(*keys, "text"))
    assert mine.height == 2 * 3 * (1 + len(labels))
    for label in (labels[0], labels[2], labels[3]):  # the non-zero rows change some answer
        steered = mine.filter(pl.col("row") == label)["text"].to_list()
        assert steered != mine.filter(pl.col("row") == labels[1])["text"].to_list()
    # α = 0: every answer is the unsteered one, read once, so every change is exactly zero
    for cell in proxy["matrix"][1]:
        assert (cell["proxy"]["change"], cell["proxy"]["low"], cell["proxy"]["high"]) == (0.0, 0.0, 0.0)
    # every cell from a naive per-answer reading
    naive = naive_cells(mine, common[1], common[3], 2)
    for row in proxy["matrix"]:
        for cell in row:
            expected = naive[(cell["column"], cell["row"])]
            got = cell["proxy"]
            assert got["n"] == expected.n == 3
            assert got["change"] == pytest.approx(expected.mean, rel=1e-5, abs=1e-6)
            assert (got["low"], got["high"]) == pytest.approx((expected.low, expected.high), rel=1e-5, abs=1e-6)
    assert any(abs(c["proxy"]["change"]) > 1e-3 for c in proxy["matrix"][0])  # α = 4 moves something
    # the plan row resolved by the plan code, what it applied recorded
    plan = proxy["row_settings"][3]["plan"]["terms"][0]
    assert (plan["op"], plan["layers"], plan["applied"]) == ("ablate", [2], {"2": 0.0})
    again = proxy_table(common, "--layers", "2", *ROWS)
    assert again["skipped"] is True and again["matrix"] == proxy["matrix"]


def test_a_plan_row_of_one_add_equals_the_plain_row(isolated_env, tmp_path, tiny_factory):
    """The plan path (a one-term plan on rows marked planned) gives the plain add's answers, token for
    token, when the term is one add at one layer."""
    from personactl.backends import Sampling
    from personactl.core.steer_plan import PlanTerm
    from personactl.model.loading import load_model
    from personactl.settings import Settings
    from personactl.steps.cross_effects import CrossRow, generate_column, parse_cross, row_steering
    from personactl.steps.evaluate import EvalSpec, Variant
    from personactl.store.traits import load_trait
    from personactl.store.workspace import Workspace

    common = prepare_two(tmp_path, tiny_factory)
    model, ws = common[1], common[3]
    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    settings = Settings(model=model, workspace=ws, dtype="float32", batch_size=2)
    variant = Variant()
    plain = parse_cross("evil:2:4", variant)
    planned = CrossRow(
        "evil", None, 4.0, variant, PlanTerm("evil", (2,), "add", 4.0, None, "response_avg", "mean_diff")
    )
    weaker = parse_cross("evil:2:-4:add", variant)  # `:add` written out: still the plain row
    assert plain.term is None and weaker.term is None and plain.label != planned.label
    steering = row_steering(settings, Workspace(Path(ws)), lm, [plain, planned, weaker])
    assert steering[1].plan is not None and steering[1].direction is None
    _, generated = generate_column(
        settings, lm, load_trait("evil"), steering, EvalSpec(questions=3), Sampling(6, 1.0, 1.0), lambda *a: None, None
    )
    tokens = {}
    for cross, (_, _, gen) in generated:
        tokens.setdefault(None if cross is None else cross.label, []).append(gen.token_ids)
    assert tokens[plain.label] == tokens[planned.label]
    assert tokens[plain.label] != tokens[None]  # α = 4 steers: the equality is not between unsteered answers
    assert tokens[weaker.label] != tokens[plain.label]  # and the opposite α steers elsewhere


def test_proxy_column_layers_default_rows_and_refusals(isolated_env, tmp_path, tiny_factory):
    common = prepare_two(tmp_path, tiny_factory)
    # without --layers each column reads at its proxy sweep's best layer (the sweep is saved and reused)
    swept = proxy_table(common, "--cross", "evil:2:1")
    for column in swept["column_settings"]:
        single = runner.invoke(app, ["eval", *common, "--trait", column["trait"], "--proxy", *GEN, "--json"])
        sweep = json.loads(single.stdout)
        assert sweep["skipped"] is True
        assert (column["layer"], column["chosen_by"], column["cohens_d"]) == (
            sweep["best_layer"],
            "proxy sweep",
            sweep["best"]["cohens_d"],
        )
    # without --cross: each trait's vector at its column layer, once per α of --coefficients
    rows = proxy_table(common, "--layers", "3", "--coefficients", "0,3")
    assert rows["rows"] == [f"{t}@response_avg/mean_diff:3:{a}" for t in TRAITS for a in (0, 3)]
    for i in (0, 2):
        assert all(c["proxy"]["change"] == 0.0 for c in rows["matrix"][i])
    human = runner.invoke(app, ["eval", *common, "--trait", "optimistic", "--trait", "evil", "--proxy", *GEN,
                                "--layers", "3", "--coefficients", "0,3"])  # fmt: skip
    assert human.exit_code == 0 and "cross effects (proxy" in human.stdout and "separation" in human.stdout
    base = ["eval", *common, "--trait", "optimistic", "--trait", "evil", "--proxy", *GEN]
    at2 = ["--layers", "2"]
    for extra in (["--backend", "vllm"], ["--steer", "evil:1:1"], [*at2, "--cross", "evil:9:1"],
                  [*at2, "--cross", "evil:2:1", "--cross", "evil:2:1"], [*at2, "--cross", "evil:2"],
                  [*at2, "--cross", "evil:1:1:bogus"], ["--vector", "evil"], ["--dry-run"]):  # fmt: skip
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert one_error_line(result.output), (extra, result.output)
