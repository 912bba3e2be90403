"""Steering-plan operations on a residual stream: exact invariants in float32."""

from __future__ import annotations

import pytest
import torch

from personactl.errors import InputError
from personactl.model.steering_ops import AddTerm, ablate_term, apply_terms, cap_term, slots


def _stream(seed: int = 0, shape: tuple[int, int, int] = (3, 5, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4


def _direction(seed: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 7  # not unit: only its direction counts


@pytest.mark.parametrize("c", [0.0, 3.0, -2.5])
def test_ablation_sets_the_projection_and_keeps_the_rest(c: float) -> None:
    hidden, v = _stream(), _direction()
    unit = v / v.norm()
    out = apply_terms(hidden, [ablate_term(v, c)])
    assert torch.allclose(out @ unit, torch.full(hidden.shape[:2], c), atol=1e-5)
    rest = lambda h: h - (h @ unit)[..., None] * unit  # noqa: E731
    assert torch.allclose(rest(out), rest(hidden), atol=1e-5)
    assert not torch.allclose(out, hidden, atol=1e-3)  # it did act


def test_cap_removes_only_the_excess_and_leaves_rows_below_untouched() -> None:
    hidden, v = _stream(2, (4, 6, 16)), _direction(3)
    unit = v / v.norm()
    tau = float((hidden @ unit).median())
    out = apply_terms(hidden, [cap_term(v, tau)])
    before, after = hidden @ unit, out @ unit
    below = before <= tau
    assert below.any() and (~below).any()
    assert torch.equal(out[below], hidden[below])  # bit for bit
    assert torch.allclose(after[~below], torch.full_like(after[~below], tau), atol=1e-5)
    assert bool((after <= tau + 1e-5).all())


def test_two_adds_equal_one_add_of_their_sum() -> None:
    hidden = _stream()
    a, b = _direction(4) * 0.5, _direction(5) * -1.5
    two = apply_terms(hidden, [AddTerm(a), AddTerm(b)])
    assert torch.equal(two, apply_terms(hidden, [AddTerm(a + b)]))  # folded: exactly the summed vector
    assert torch.equal(apply_terms(hidden, [AddTerm(a)]), hidden + a)


def test_terms_apply_in_order() -> None:
    """Ablating after an add along the same direction removes the add; the other order keeps it."""
    hidden, v = _stream(), _direction()
    unit = v / v.norm()
    add, ablate = AddTerm(3 * unit), ablate_term(v, 0.0)
    assert torch.allclose(apply_terms(hidden, [add, ablate]) @ unit, torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(apply_terms(hidden, [ablate, add]) @ unit, torch.full((3, 5), 3.0), atol=1e-5)


def test_per_row_values_and_masked_positions() -> None:
    hidden, v = _stream(), _direction()
    unit = v / v.norm()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, -2:] = True
    rows = [[ablate_term(v, 0.0), AddTerm(unit)], [ablate_term(v, 1.0), AddTerm(2 * unit)], [ablate_term(v, -1.0)]]
    out = apply_terms(hidden, slots(rows, 16, torch.float32), mask)
    assert torch.equal(out[:, :-2], hidden[:, :-2])  # masked out: untouched
    assert torch.allclose(out[:, -2:] @ unit, torch.tensor([[1.0], [3.0], [-1.0]]).expand(3, 2), atol=1e-5)


def test_rows_with_different_plans_equal_each_plan_alone() -> None:
    """Slots align every row's own sequence; a row without a plan is left bit for bit."""
    hidden, v, w = _stream(6, (4, 5, 16)), _direction(7), _direction(8)
    tau = float((hidden @ (v / v.norm())).median())
    plans = [
        [AddTerm(w * 0.3), cap_term(v, tau), AddTerm(v * 0.1)],
        [ablate_term(w, 0.5), ablate_term(v, 0.0)],
        None,
        [AddTerm(v), AddTerm(-w)],
    ]
    mixed = apply_terms(hidden, slots(plans, 16, torch.float32))
    for b, plan in enumerate(plans):
        alone = apply_terms(hidden[b : b + 1], plan or [])
        assert torch.equal(mixed[b : b + 1], alone), b
    assert torch.equal(mixed[2], hidden[2])


def test_bf16_stream_keeps_its_dtype_and_loses_the_direction() -> None:
    hidden, v = _stream().bfloat16(), _direction()
    out = apply_terms(hidden, [ablate_term(v, 0.0)])
    assert out.dtype == torch.bfloat16
    before = (hidden.float() @ (v / v.norm())).abs().mean()
    assert (out.float() @ (v / v.norm())).abs().mean() < before * 0.05


def test_a_zero_direction_is_refused() -> None:
    with pytest.raises(InputError, match="zero or non-finite"):
        cap_term(torch.zeros(16), 0.0)
