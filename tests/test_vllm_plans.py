"""Steering plans in the vLLM plugin, without an engine: the plan hook on a stand-in decoder layer,
fed through the frontend's configurations and the worker extension's wire format, against the HF
`Steerer`'s arithmetic (`steering_ops.slots` + `change`), exactly, in float32. The engine tests (each
operation against HF on SmolLM2, mixed batches, the slot limit on a real engine) are in test_vllm.py,
on its one compiled engine."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from personactl.errors import InputError
from personactl.model.steering_ops import AddTerm, ablate_term, cap_term, change, slots

H = 16


class StandInLayer(torch.nn.Module):
    """Returns (hidden, residual) as vLLM decoder layers do; the stream is their sum."""

    def forward(self, hidden, residual):
        return hidden, residual


def engine_state(projections: int, rows: int = 6, tokens: int = 16):
    from personactl.backends.vllm_plugin import (
        INDEX,
        STATE,
        TABLE,
        SteeringTables,
        _add_steering,
        _install_slots,
        _plan_hook,
    )

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([StandInLayer(), StandInLayer()])
    index = torch.zeros(tokens, dtype=torch.int64)
    tables, layer_slots = {}, {}
    for number, layer in enumerate(model.layers, start=1):
        tables[number] = torch.zeros(rows, H)
        layer.register_buffer(TABLE, tables[number], persistent=False)
        layer.register_buffer(INDEX, index, persistent=False)
        if projections:
            layer_slots[number] = _install_slots(layer, projections, rows, H, torch.float32, "cpu")
        layer.register_forward_hook(_plan_hook(projections) if projections else _add_steering)
    state = SteeringTables(index, tables, layer_slots)
    object.__setattr__(model, STATE, state)
    return model, state


def write(model, configs):
    """Configurations into rows 1.. through the worker extension (the wire format the frontend sends)."""
    from personactl.backends.vllm_worker import SteeringWorkerExtension

    worker = SteeringWorkerExtension()
    worker.model_runner = SimpleNamespace(get_model=lambda: model)
    entries = [config.entry(row) for row, config in enumerate(configs, start=1)]
    assert worker.personactl_steering_put(entries) == len(entries)


def config(plan, deltas=None, projections=2):
    from personactl.backends.vllm_configs import SteeringConfig, plan_slots

    added, plans = plan_slots(deltas or {}, plan, projections, torch.float32, H)
    return SteeringConfig.of(added, plans)


def directions(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, generator=g), torch.randn(H, generator=g)


def hf_reference(stream, row_terms):
    """What the HF Steerer does to a batch whose rows follow their own terms (per-row slots)."""
    out = stream
    for term in slots(row_terms, H, torch.float32):
        out = out + change(out, term)
    return out


def test_the_plan_hook_applies_each_rows_terms_exactly_as_the_hf_steerer():
    """Five requests, two tokens each, in one forward: a three-term plan at one layer (add, cap on v,
    ablate on w: both projection slots), a cap, an ablation to c, an add alone, and an unsteered one.
    With the residual at zero the stream is `hidden`, so the result must equal HF's per-row slot
    arithmetic bit for bit; the unsteered request and the other layer are left exactly as they were."""
    v, w = directions()
    delta = 0.7 * v
    plans = [
        {1: [AddTerm(delta), cap_term(v, 0.5), ablate_term(w)]},
        {1: [cap_term(v, -0.25)]},
        {1: [ablate_term(w, 1.5)]},
        {1: [AddTerm(delta)]},
    ]
    model, state = engine_state(projections=2)
    write(model, [config(p) for p in plans])
    keys = [config(p).key for p in plans] + [None]
    state.map_tokens(keys, np.array([2] * 5))
    hidden = torch.randn(10, H, generator=torch.Generator().manual_seed(1)) * 3
    out, _ = model.layers[0](hidden, torch.zeros(10, H))

    rows = [list(p[1]) for p in plans] + [[]]
    expected = hf_reference(hidden.reshape(5, 2, H), rows).reshape(10, H)
    assert torch.equal(out, expected)
    assert torch.equal(out[8:], hidden[8:])  # unsteered: bit for bit
    unit_v, unit_w = v / v.norm(), w / w.norm()
    assert float((out[2:4] @ unit_v).max()) <= -0.25 + 1e-5  # capped
    assert torch.allclose(out[4:6] @ unit_w, torch.full((2,), 1.5), atol=1e-5)  # ablated to c
    untouched, _ = model.layers[1](hidden, torch.zeros(10, H))
    assert torch.equal(untouched, hidden)


def test_the_plan_hook_projects_the_stream_hidden_plus_residual():
    """vLLM's layers hand the stream on as hidden + residual: an ablation removes the direction from
    their sum, and a cap leaves a token below τ exactly as it was."""
    v, _ = directions()
    unit = v / v.norm()
    model, state = engine_state(projections=2)
    ablate, cap = config({1: [ablate_term(v)]}), config({1: [cap_term(v, 100.0)]})
    write(model, [ablate, cap])
    state.map_tokens([ablate.key, cap.key], np.array([3, 3]))
    g = torch.Generator().manual_seed(2)
    hidden, residual = torch.randn(6, H, generator=g), torch.randn(6, H, generator=g)
    out, res = model.layers[0](hidden, residual)
    assert torch.equal(res, residual)
    assert float(((out + residual)[:3] @ unit).abs().max()) < 1e-5
    assert torch.equal(out[3:], hidden[3:])  # projection far below τ: unchanged


def test_add_only_rows_get_exactly_what_an_add_only_engine_gives():
    """The neutral slots add exact zeros: a row that only adds α·v, on an engine with projection
    slots, equals the same row on an add-only engine (projections=0, the add-only hook)."""
    from personactl.backends.vllm_configs import SteeringConfig

    v, _ = directions()
    alpha_v = {1: torch.tensor(-2.0) * v}
    plain = SteeringConfig.of(alpha_v)
    outputs = []
    for projections in (0, 2):
        model, state = engine_state(projections)
        write(model, [plain])
        state.map_tokens([plain.key, None], np.array([2, 2]))
        hidden = torch.randn(4, H, generator=torch.Generator().manual_seed(3))
        outputs.append(model.layers[0](hidden, torch.ones(4, H))[0])
    assert torch.equal(outputs[0], outputs[1])


def test_a_row_taken_over_by_another_configuration_forgets_its_plan():
    v, w = directions()
    model, state = engine_state(projections=2)
    write(model, [config({1: [ablate_term(v), AddTerm(v), cap_term(w, 0.0)]})])
    write(model, [config({2: [AddTerm(w)]})])  # row 1 again: layer 1 must be neutral now
    state.map_tokens([config({2: [AddTerm(w)]}).key], np.array([2]))
    hidden = torch.randn(2, H, generator=torch.Generator().manual_seed(4))
    out, _ = model.layers[0](hidden, torch.zeros(2, H))
    assert torch.equal(out, hidden)


def test_plan_configurations_are_keyed_by_everything_they_apply():
    v, w = directions()
    add_only = config({1: [AddTerm(v)]})
    assert add_only.key == config({}, {1: v}).key  # a plan add = α·v at that layer: one configuration
    keys = {
        add_only.key,
        config({1: [ablate_term(v)]}).key,
        config({1: [ablate_term(v, 0.5)]}).key,
        config({1: [cap_term(v, 0.5)]}).key,
        config({1: [ablate_term(w)]}).key,
        config({2: [ablate_term(v)]}).key,
        config({1: [ablate_term(v), cap_term(w, 0.5)]}).key,
        config({1: [cap_term(w, 0.5), ablate_term(v)]}).key,
        config({1: [ablate_term(v), AddTerm(v)]}).key,
    }
    assert len(keys) == 9
    assert config({1: [ablate_term(v)]}).key == config({1: [ablate_term(2 * v)]}).key  # only the direction counts
    assert config({1: [AddTerm(torch.zeros(H))]}) is None  # changes nothing: unsteered, no key


def test_a_plan_that_needs_more_slots_than_the_engine_has_is_refused():
    from personactl.backends.vllm_configs import plan_slots

    v, w = directions()
    fits = {1: [AddTerm(v), AddTerm(w), ablate_term(v), AddTerm(v), cap_term(w, 1.0)]}  # adds fold: 4 slots
    plan_slots({}, fits, 2, torch.float32, H)
    too_many = {1: [ablate_term(v), cap_term(w, 1.0), AddTerm(v)]}  # projection, projection, add: 5
    with pytest.raises(InputError, match=r"layer 1 needs 5 slots .* this vLLM engine has 4 per layer"):
        plan_slots({}, too_many, 2, torch.float32, H)
    with pytest.raises(InputError, match="has 1 per layer"):
        plan_slots({}, {1: [ablate_term(v)]}, 0, torch.float32, H)  # an add-only engine
    plan_slots({}, {1: [AddTerm(v)]}, 0, torch.float32, H)  # ... takes plan adds
    with pytest.raises(InputError, match=r"not one finite \[16\] vector"):
        plan_slots({}, {1: [AddTerm(torch.ones(2, H))]}, 2, torch.float32, H)  # one delta per row


def test_a_plan_add_joins_alpha_v_in_the_base_table_after_it():
    """α·v and the plan's first add at the same layer share the base table (α·v + δ, the order the
    HF Steerer adds them); later terms fill the slots."""
    from personactl.backends.vllm_configs import plan_slots

    v, w = directions()
    deltas, plans = plan_slots({1: 2 * v}, {1: [AddTerm(w), cap_term(v, 0.0), AddTerm(v)]}, 2, torch.float32, H)
    assert torch.equal(deltas[1], 2 * v + w)
    assert plans[1].projections[0] is not None and torch.equal(plans[1].adds[0], v)


def test_the_vllm_backend_refuses_hf_only_placement_settings(isolated_env):
    from personactl.backends.vllm import open_vllm_from
    from personactl.settings import load_settings

    for option, value in (("device_map", "auto"), ("max_memory", "0=20GiB")):
        settings, _ = load_settings({"backend": "vllm", option: value})
        with pytest.raises(InputError, match=f"--{option.replace('_', '-')} is a setting of the hf backend") as info:
            open_vllm_from(settings, steering=True)
        assert "--tensor-parallel-size" in info.value.hint


def test_settings_vllm_refuses_are_one_line_exit_2(isolated_env, tmp_path):
    """vLLM's own check of the engine's settings (here: SmolLM2's 9 heads over 2 ranks) is a clear
    error before any worker starts, not an internal one."""
    from typer.testing import CliRunner

    from personactl.cli.app import app

    pytest.importorskip("vllm")
    args = ["generate", "--trait", "optimistic", "--backend", "vllm", "--tensor-parallel-size", "2"]
    result = CliRunner().invoke(app, [*args, "-w", str(tmp_path / "ws"), "--max-new-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert "vLLM refused this engine's settings: Total number of attention heads (9)" in result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
