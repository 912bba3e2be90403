"""Steering plans resolved for a loaded model: each `--steer` term's vector found and checked, its
layers checked, and its value turned into tensors the engines apply (`model.steering_ops`).

Units: `add`'s α multiplies the direction scaled by `--norm` exactly as for `--vector`; what the
other operations' values mean is `store.plan_values.projection_value`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from personactl.core.ranges import check_steering_layers
from personactl.core.steer_plan import PlanTerm, parse_term, split_persona
from personactl.model.steering_ops import AddTerm, Term, ablate_term, cap_term
from personactl.store.plan_values import projection_value
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    from personactl.model.loading import ModelHandle
    from personactl.store.vectors import LoadedVector
    from personactl.store.workspace import Workspace


@dataclass(frozen=True)
class ResolvedTerm:
    term: PlanTerm
    vector_path: str
    label: str
    position: str
    aggregator: str
    terms: Mapping[int, Term]  # layer → what the engines apply there
    raw_values: Mapping[int, float]  # layer → α, or c / τ in residual-stream units (what was applied)
    warning: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.term.spec(),
            "vector": self.vector_path,
            "trait": self.label,
            "op": self.term.op,
            "layers": list(self.term.layers),
            "value": self.term.value,
            "position": self.position,
            "aggregator": self.aggregator,
            "applied": {str(layer): value for layer, value in self.raw_values.items()},
        }


@dataclass(frozen=True)
class ResolvedPlan:
    terms: list[ResolvedTerm] = field(default_factory=list)
    norm: str = "raw"

    def by_layer(self) -> dict[int, list[Term]]:
        """layer → every term's tensors there, in the order the terms were given."""
        out: dict[int, list[Term]] = {}
        for resolved in self.terms:
            for layer, term in resolved.terms.items():
                out.setdefault(layer, []).append(term)
        return dict(sorted(out.items()))

    @property
    def ops(self) -> set[str]:
        return {resolved.term.op for resolved in self.terms}

    def spec(self) -> str:
        """The plan in one line, as `--steer` flags would write it."""
        return " ".join(f"--steer {resolved.term.spec()}" for resolved in self.terms)

    def describe(self) -> dict[str, Any]:
        return {"norm": self.norm, "terms": [resolved.describe() for resolved in self.terms]}

    @property
    def warnings(self) -> list[str]:
        return [resolved.warning for resolved in self.terms if resolved.warning]


def resolve_plan(
    specs: Sequence[str | PlanTerm],
    *,
    workspace: Workspace,
    lm: ModelHandle,
    position: str,
    aggregator: str,
    norm: str,
) -> ResolvedPlan:
    """Every term of a plan, resolved in order (`position` and `aggregator`: the defaults of terms
    that name none). Errors name the term they are about."""
    resolved = [
        _resolve(parse_term(s) if isinstance(s, str) else s, workspace, lm, position, aggregator, norm) for s in specs
    ]
    return ResolvedPlan(resolved, norm)


def _resolve(
    term: PlanTerm, workspace: Workspace, lm: ModelHandle, position: str, aggregator: str, norm: str
) -> ResolvedTerm:
    name, persona = split_persona(term.vector)
    loaded = load_for_model(workspace, name, lm, persona)
    position, aggregator = term.position or position, term.aggregator or aggregator
    layers = check_steering_layers(list(term.layers), lm.num_layers)
    terms: dict[int, Term] = {}
    applied: dict[int, float] = {}
    for layer in layers:
        direction = loaded.vector.direction(layer, position, aggregator, norm)
        terms[layer], applied[layer] = _term_at(term, loaded, layer, direction, (position, aggregator), norm, lm.dtype)
    return ResolvedTerm(term, str(loaded.path), loaded.label, position, aggregator, terms, applied, loaded.warning)


def _term_at(
    term: PlanTerm,
    loaded: LoadedVector,
    layer: int,
    direction: torch.Tensor,
    where: tuple[str, str],
    norm: str,
    dtype: torch.dtype,
) -> tuple[Term, float]:
    """One term's tensors at one layer and the value applied there (α, or c / τ in stream units)."""
    if term.op == "add":
        alpha = torch.tensor(float(term.value or 0.0), dtype=torch.float32).to(dtype)
        return AddTerm(alpha * direction.to(dtype)), float(term.value or 0.0)  # as `Steerer` computes α·v
    value = projection_value(term, loaded.vector, loaded.path.name, layer, where, norm, direction)
    if term.op == "cap":
        return cap_term(direction, value), value
    return ablate_term(direction, value), value
