"""What a steering plan does to the residual stream at one layer, as tensor arithmetic that a hook
(or a compiled graph) can run: no data-dependent branches, every parameter a tensor.

Two kinds of term exist at this level:
- `AddTerm`: h ← h + δ (δ = α·v); the `add` terms of a plan.
- `ProjectionTerm`: h ← h + (clamp(p, lo, hi) − p)·û with p = h·û, the stream's own projection on
  the unit direction û. `ablate` with c is lo = hi = c (c = 0 removes the direction; `mean-ablate`
  is c = a mean projection, resolved when the plan is built); `cap` with τ is lo = −∞, hi = τ, so a
  row whose projection is at most τ is left exactly as it was. lo = −∞, hi = +∞ changes nothing,
  which is how a row without the term sits in a batch of rows with it.

Projections are computed in float32 whatever the model's dtype. Terms at one layer apply in the
order given, each to the stream the previous one left; consecutive adds are folded into one
(`fold_adds`), so two `add` terms act exactly as one term of their summed vector.

A batch whose rows follow different plans is steered through `slots`: each row's terms at a layer,
aligned as alternating add and projection slots, with neutral parameters where a row has nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

INF = math.inf


@dataclass(frozen=True)
class AddTerm:
    delta: torch.Tensor  # [H] or [B, H], in the stream's dtype


@dataclass(frozen=True)
class ProjectionTerm:
    unit: torch.Tensor  # [H] or [B, H] float32, unit norm (or zero: changes nothing)
    lo: torch.Tensor  # [] or [B] float32
    hi: torch.Tensor  # [] or [B] float32


Term = AddTerm | ProjectionTerm


def _unit(direction: torch.Tensor) -> torch.Tensor:
    unit = direction.detach().float()
    norm = unit.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        from personactl.errors import InputError

        raise InputError("cannot ablate or cap along a zero or non-finite direction")
    return unit / norm


def ablate_term(direction: torch.Tensor, c: float = 0.0) -> ProjectionTerm:
    """Set the projection on `direction` (any norm; only its direction counts) to `c`."""
    unit = _unit(direction)
    value = torch.tensor(float(c), device=unit.device)
    return ProjectionTerm(unit, value, value.clone())


def cap_term(direction: torch.Tensor, tau: float) -> ProjectionTerm:
    """Remove the projection on `direction` above `tau`; leave rows at or below it untouched."""
    unit = _unit(direction)
    return ProjectionTerm(unit, torch.tensor(-INF, device=unit.device), torch.tensor(float(tau), device=unit.device))


def apply_terms(hidden: torch.Tensor, terms: Sequence[Term], mask: torch.Tensor | None = None) -> torch.Tensor:
    """`hidden` [B, T, H] after every term in order; positions where `mask` [B, T] is False keep
    their values bit for bit."""
    out = hidden
    for term in fold_adds(terms):
        out = out + change(out, term)
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


def change(hidden: torch.Tensor, term: Term) -> torch.Tensor:
    """What `term` adds to `hidden` [B, T, H] (exactly zero where it changes nothing)."""
    if isinstance(term, AddTerm):
        delta = term.delta
        return delta[:, None, :] if delta.dim() == 2 else delta
    unit = term.unit[:, None, :] if term.unit.dim() == 2 else term.unit  # one direction per row, or shared
    # an elementwise product summed over H: the same arithmetic for a shared and a per-row direction,
    # so a row steered in a mixed batch equals the row steered alone, bit for bit
    projection = (hidden.float() * unit).sum(-1)  # [B, T]
    lo = term.lo[:, None] if term.lo.dim() == 1 else term.lo
    hi = term.hi[:, None] if term.hi.dim() == 1 else term.hi
    target = torch.maximum(torch.minimum(projection, hi), lo)
    return ((target - projection)[..., None] * unit).to(hidden.dtype)


def slots(rows: Sequence[Sequence[Term] | None], hidden_size: int, dtype: torch.dtype) -> list[Term]:
    """Per-row terms at one layer as one list of batched terms: slot 2k adds, slot 2k + 1 projects;
    a row's terms fill the slots in order (consecutive adds folded, a missing kind left neutral), so
    each row gets exactly its own sequence and a row with none is left unchanged."""
    aligned = [alternating(fold_adds(terms or [])) for terms in rows]
    width = max((len(a) for a in aligned), default=0)
    out: list[Term] = []
    for k in range(width):
        column = [a[k] if k < len(a) else None for a in aligned]
        out.append(_add_slot(column, hidden_size, dtype) if k % 2 == 0 else _projection_slot(column, hidden_size))
    return out


def alternating(terms: Sequence[Term]) -> list[Term | None]:
    """`terms` as add, projection, add, projection, … with None where a kind is skipped: the slot
    order every engine lays a row's terms out in (the vLLM plugin's tables too)."""
    out: list[Term | None] = []
    for term in terms:
        if isinstance(term, AddTerm) != (len(out) % 2 == 0):
            out.append(None)
        out.append(term)
    return out


def _add_slot(column: Sequence[Term | None], hidden_size: int, dtype: torch.dtype) -> AddTerm:
    deltas = torch.zeros(len(column), hidden_size, dtype=dtype)
    for b, term in enumerate(column):
        if isinstance(term, AddTerm):
            deltas[b] = term.delta.to("cpu", dtype)
    return AddTerm(deltas)


def _projection_slot(column: Sequence[Term | None], hidden_size: int) -> ProjectionTerm:
    unit = torch.zeros(len(column), hidden_size)
    lo, hi = torch.full((len(column),), -INF), torch.full((len(column),), INF)
    for b, term in enumerate(column):
        if isinstance(term, ProjectionTerm):
            unit[b], lo[b], hi[b] = term.unit.cpu(), term.lo.cpu(), term.hi.cpu()
    return ProjectionTerm(unit, lo, hi)


def to_device(term: Term, device: torch.device | str) -> Term:
    if isinstance(term, AddTerm):
        return AddTerm(term.delta.to(device))
    return ProjectionTerm(term.unit.to(device), term.lo.to(device), term.hi.to(device))
