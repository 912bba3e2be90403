"""`extract --quantiles`: percentiles of each response's projection on every direction, and caps at
a percentile (`--steer …:pNN:cap`) that use them."""

from __future__ import annotations

import json

import polars as pl
import torch
from test_cli import expect_error, extracted_workspace, invoke

from personactl.model.example_activations import read_examples
from personactl.model.loading import load_model
from personactl.steps.extract import pairs_from_responses
from personactl.steps.extract_quantiles import side_quantiles
from personactl.steps.plan import resolve_plan
from personactl.store.vectors import PersonaVector
from personactl.store.workspace import Workspace


def test_side_quantiles_are_the_percentiles_of_the_projections():
    gen = torch.Generator().manual_seed(0)
    values, directions = torch.randn(10, 3, 8, generator=gen), torch.randn(3, 8, generator=gen) * 5
    directions[1] = float("nan")  # an undefined direction stays NaN
    tables = side_quantiles(values, directions, n_pos=4)
    unit = directions / directions.norm(dim=-1, keepdim=True)
    projections = (values * unit).sum(-1)
    for side, part in (("pos", projections[:4]), ("neg", projections[4:])):
        assert tables[side].shape == (3, 101)
        for row in (0, 2):
            assert torch.allclose(
                tables[side][row, [0, 50, 100]], torch.quantile(part[:, row], torch.tensor([0.0, 0.5, 1.0]))
            )
        assert torch.isnan(tables[side][1]).all()


def test_extract_quantiles_and_cap_at_a_percentile(isolated_env, tmp_path, tiny_factory):
    model = str(tiny_factory("llama"))
    ws, vector_path = extracted_workspace(tmp_path, model)
    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    plan = lambda spec: resolve_plan(  # noqa: E731
        [spec], workspace=Workspace(ws), lm=lm, position="response_avg", aggregator="mean_diff", norm="stream"
    )
    steer = ["steer", "--prompt", "hi", "--model", model, "-w", ws, "--steer", "optimistic:2:p90:cap"]
    expect_error(invoke(*steer), "re-extract with --quantiles")

    again = invoke(
        "extract",
        "--trait",
        "optimistic",
        "--model",
        model,
        "-w",
        ws,
        "--dtype",
        "float32",
        "--quantiles",
        "--force",
        "--json",
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["skipped"] is False
    vector = PersonaVector.load(vector_path)
    assert vector.metadata["hook_site"].startswith("output of decoder block l")  # extracted files say where rows act
    neg = vector.tensors["quantiles.neg.mean_diff.response_avg"]
    assert neg.shape == (lm.num_layers + 1, 101)
    assert bool((neg[1:].diff(dim=-1) >= 0).all())  # percentiles rise

    # the median equals the median of the trait-free responses' projections, read naively
    responses = pl.read_parquet(next((ws / lm.source.slug / "optimistic").glob("responses*.parquet")))
    pairs = pairs_from_responses(responses, lm.tokenizer)
    readings = read_examples(
        lm.model,
        lm.layers,
        [p.neg for p in pairs],
        pad_id=lm.tokenizer.pad_token_id,
        rows=[2],
        positions=["response_avg"],
    )
    direction = vector.at(2, "response_avg", "mean_diff")
    projections = readings.values[:, 0, 0] @ (direction / direction.norm())
    assert torch.allclose(neg[2, 50], torch.quantile(projections, 0.5), atol=1e-4)

    term = plan("optimistic:2:p90:cap").by_layer()[2][0]
    assert float(term.hi) == float(neg[2, 90])
    term = plan("optimistic:2:p12.5:cap").by_layer()[2][0]
    assert abs(float(term.hi) - float(0.5 * neg[2, 12] + 0.5 * neg[2, 13])) < 1e-6
    assert invoke(*steer).exit_code == 0
    shown = invoke("show", vector_path, "--json")
    assert shown.exit_code == 0, shown.output


def test_probe_and_quantiles_share_one_pass_with_the_same_tables(isolated_env, tmp_path, tiny_factory):
    """With `probe` and `--quantiles`, the quantiles are computed from the probe's own per-example
    pass (one forward pass, not two) and equal those of a separate quantile pass; the probe's
    direction gets its quantiles too."""
    model = str(tiny_factory("llama"))
    ws, vector_path = extracted_workspace(tmp_path, model)
    common = ["extract", "--trait", "optimistic", "--model", model, "-w", ws, "--dtype", "float32", "--quantiles"]
    alone = invoke(*common, "--force", "--json")
    assert alone.exit_code == 0, alone.output
    separate = PersonaVector.load(vector_path)
    both = invoke(*common, "--aggregators", "mean_diff,pca,probe", "--force", "--json")
    assert both.exit_code == 0, both.output
    shared = PersonaVector.load(vector_path)
    assert shared.metadata["quantiles"]["read"] == "in the probe's pass"
    assert "read" not in separate.metadata["quantiles"]
    keys = [k for k in separate.tensors if k.startswith("quantiles.")]
    assert keys
    for key in keys:
        assert torch.equal(shared.tensors[key].nan_to_num(-7.0), separate.tensors[key].nan_to_num(-7.0)), key
    probe_table = shared.tensors["quantiles.pos.probe.response_avg"]
    assert bool(torch.isfinite(probe_table[1:]).all())
