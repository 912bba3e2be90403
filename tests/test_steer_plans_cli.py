"""`steer --steer SPEC`: a steering plan from the command line, alone or beside a sweep, resolved
against the workspace's vectors; bad terms are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import expect_error, invoke, isolated_extraction

from personactl.model.loading import load_model
from personactl.model.steering_ops import AddTerm, ablate_term
from personactl.steps.plan import resolve_plan
from personactl.store.vectors import PersonaVector
from personactl.store.workspace import Workspace


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_factory):
    return isolated_extraction(tmp_path_factory.mktemp("plans"), str(tiny_factory("llama")))


def steer_json(model, ws, *args):
    common = ["--model", model, "-w", ws, "--dtype", "float32", "--max-new-tokens", "6", "--json"]
    result = invoke("steer", "--prompt", "hello world", *args, *common)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_plan_alone_and_beside_a_sweep(isolated_env, setup):
    model, ws, _ = setup
    alone = steer_json(model, ws, "--steer", "optimistic:2:0:ablate", "--steer", "optimistic:1:8")
    assert [(r["baseline"], r["layer"]) for r in alone] == [(True, None), (False, None)]
    assert alone[1]["plan"] == "--steer optimistic:2:0:ablate --steer optimistic:1:8:add"
    assert alone[0]["plan"] is None
    assert alone[1]["text"] != alone[0]["text"]

    swept = steer_json(
        model, ws, "--vector", "optimistic", "--layers", "2", "--coefficients=-4,4", "--steer", "optimistic:1:8"
    )
    assert [(r["baseline"], r["layer"], r["plan"] is not None) for r in swept] == [
        (True, None, False),
        (False, 2, True),
        (False, 2, True),
    ]
    assert swept[0]["text"] == alone[0]["text"]  # the baseline stays unsteered


def test_a_plan_resolves_to_the_vector_in_the_chosen_units(isolated_env, setup):
    model, ws, vector_path = setup
    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    vector = PersonaVector.load(vector_path)
    plan = resolve_plan(
        ["optimistic:1-2:3", "optimistic@response_avg:2:0.5:ablate", "optimistic:2:1:mean-ablate"],
        workspace=Workspace(ws),
        lm=lm,
        position="response_avg",
        aggregator="mean_diff",
        norm="stream",
    )
    layers = plan.by_layer()
    assert sorted(layers) == [1, 2] and len(layers[2]) == 3
    stream = vector.tensors["stream_norm"]
    direction = vector.direction(2, "response_avg", "mean_diff", "stream")
    assert isinstance(layers[2][0], AddTerm)
    assert torch.equal(layers[2][0].delta, torch.tensor(3.0) * direction)
    expected = ablate_term(direction, 0.5 * float(stream[2]))
    assert torch.allclose(layers[2][1].unit, expected.unit) and float(layers[2][1].lo) == pytest.approx(
        0.5 * float(stream[2]), rel=1e-5
    )
    unit = direction / direction.norm()
    mean = float(vector.at(2, "response_avg", "neg_mean").float() @ unit)
    assert float(layers[2][2].lo) == pytest.approx(mean, rel=1e-5)
    assert plan.describe()["terms"][1]["applied"]["2"] == pytest.approx(0.5 * float(stream[2]), rel=1e-5)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("optimistic:2:4:scale", "unknown steering operation 'scale'"),
        ("optimistic:2:x", "bad value 'x'"),
        ("optimistic:9:1", "out of range"),
        ("optimistic:0:1:ablate", "layer 0 is the embeddings"),
        ("nosuchtrait:2:1", "no vectors for 'nosuchtrait'"),
        ("optimistic:2:p25:cap", "re-extract with --quantiles"),
        ("optimistic@prompt_middle:2:1", "no mean_diff.prompt_middle"),
    ],
)
def test_bad_terms_exit_2_with_one_line(isolated_env, setup, spec, needle):
    model, ws, _ = setup
    expect_error(invoke("steer", "--prompt", "hi", "--steer", spec, "--model", model, "-w", ws), needle)


def test_nothing_to_steer_with(isolated_env, setup):
    model, ws, _ = setup
    expect_error(invoke("steer", "--prompt", "hi", "--model", model, "-w", ws), "nothing to steer with")


def test_cap_at_saved_thresholds(isolated_env, setup, tmp_path):
    """`cap` at `saved` takes τ per layer from the file's cap_thresholds (an imported capping
    configuration), unscaled by --norm; a layer without one is one clear error."""
    model, ws, vector_path = setup
    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    vector = PersonaVector.load(vector_path)
    vector.metadata = {**vector.metadata, "cap_thresholds": {"rows": {"2": 0.75}, "unit": "projection"}}
    capped = tmp_path / "capped.safetensors"
    vector.save(capped)
    resolve = lambda spec: resolve_plan(  # noqa: E731
        [spec], workspace=Workspace(ws), lm=lm, position="response_avg", aggregator="mean_diff", norm="stream"
    )
    term = resolve(f"{capped}:2:saved:cap").by_layer()[2][0]
    assert float(term.hi) == 0.75 and float(term.lo) == float("-inf")
    expect_error(
        invoke("steer", "--prompt", "hi", "--steer", f"{capped}:1-2:saved:cap", "--model", model, "-w", ws),
        "no saved cap threshold at layer 1 (saved at rows: 2)",
    )


def test_a_malformed_term_fails_before_the_model_loads(isolated_env, tmp_path):
    result = invoke(
        "steer", "--prompt", "hi", "--steer", "x:2:4:scale", "--model", tmp_path / "no-model", "-w", tmp_path
    )
    expect_error(result, "unknown steering operation 'scale'")


def test_an_engine_without_an_operation_refuses_the_plan_up_front(tiny_factory):
    """`check_plan_ops` refuses, before generation, operations an engine does not apply (an add-only
    vLLM engine, vllm_plan_projections = 0, has plan_ops ("add",))."""
    from personactl.backends import check_plan_ops
    from personactl.backends.hf import HFBackend
    from personactl.errors import InputError

    lm = load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)
    engine = HFBackend(lm.model, lm.tokenizer)
    check_plan_ops(engine, {"add", "ablate", "cap", "mean-ablate"})
    engine.plan_ops = ("add",)
    check_plan_ops(engine, {"add"})
    with pytest.raises(InputError, match="does not apply steering plans with ablate, cap") as info:
        check_plan_ops(engine, {"add", "cap", "ablate"})
    assert "vllm_plan_projections" in info.value.hint
