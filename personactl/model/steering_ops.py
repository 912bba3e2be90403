"""What a steering-plan term does to the residual stream at one layer, as tensor arithmetic that a
hook (or a compiled graph) can run: no data-dependent branches, every parameter a tensor.

Two kinds of term exist at this level:
- `AddTerm`: h ← h + δ (δ = α·v, one per row or shared); `add` terms of a plan.
- `ProjectionTerm`: h ← h + (target(p) − p)·û with p = h·û, the stream's own projection on the unit
  direction û. `ablate` sets the projection to c (target = c; c = 0 removes it, and `mean-ablate` is
  c = the mean projection, resolved when the plan is built); `cap` removes only the excess over τ
  (target = min(p, τ)), so a row whose projection is at most τ is left exactly as it was. To floor a
  projection instead, cap the negated direction at −τ.

Projections are computed in float32 whatever the model's dtype, so a bf16 model's ablation removes
the direction as well as its dtype allows. Terms at one layer apply in the order given, each to the
stream the previous one left; consecutive adds are folded into one (`fold_adds`), so two `add` terms
act exactly as one term of their summed vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AddTerm:
    delta: torch.Tensor  # [H] or [B, H], in the stream's dtype


@dataclass(frozen=True)
class ProjectionTerm:
    unit: torch.Tensor  # [H] float32, unit norm
    value: torch.Tensor  # [] or [B] float32: c for ablate, τ for cap
    cap: bool  # False: ablate (projection := c); True: cap (projection := min(p, τ))


Term = AddTerm | ProjectionTerm


def apply_terms(hidden: torch.Tensor, terms: Sequence[Term], mask: torch.Tensor | None = None) -> torch.Tensor:
    """`hidden` [B, T, H] after every term in order; positions where `mask` [B, T] is False keep
    their values bit for bit."""
    out = hidden
    for term in fold_adds(terms):
        out = out + _change(out, term)
    if mask is None:
        return out
    return torch.where(mask[..., None], out, hidden)


def fold_adds(terms: Sequence[Term]) -> list[Term]:
    """Consecutive `AddTerm`s as one (their deltas summed in order): fewer passes over the stream, and
    the same result as steering with the summed vector."""
    folded: list[Term] = []
    for term in terms:
        if isinstance(term, AddTerm) and folded and isinstance(folded[-1], AddTerm):
            folded[-1] = AddTerm(folded[-1].delta + term.delta)  # broadcasts [H] with [B, H]
        else:
            folded.append(term)
    return folded


def _change(hidden: torch.Tensor, term: Term) -> torch.Tensor:
    """What `term` adds to `hidden` (zero where it changes nothing)."""
    if isinstance(term, AddTerm):
        delta = term.delta
        return delta[:, None, :] if delta.dim() == 2 else delta
    projection = hidden.float() @ term.unit  # [B, T]
    value = term.value[:, None] if term.value.dim() == 1 else term.value
    target = torch.minimum(projection, value) if term.cap else value.expand_as(projection)
    return ((target - projection)[..., None] * term.unit).to(hidden.dtype)


def unit_term(direction: torch.Tensor, value: float | torch.Tensor, *, cap: bool) -> ProjectionTerm:
    """A projection term on `direction` (any norm; only its direction counts)."""
    unit = direction.detach().float()
    norm = unit.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        from personactl.errors import InputError

        raise InputError("cannot ablate or cap along a zero or non-finite direction")
    return ProjectionTerm(unit / norm, torch.as_tensor(value, dtype=torch.float32).to(direction.device), cap)
