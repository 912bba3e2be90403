"""Steering configurations as the vLLM engine's requests carry them, and which table row holds each.

A configuration is what one request does at each layer: what it adds (block number → α·v in the
engine's dtype, with the first `add` of a steering plan there folded in) and, with a steering plan,
the rest of the plan's terms there as the plugin's slots take them (`LayerPlan`: projection slots
and the adds between them, aligned as `personactl.model.steering_ops.slots` aligns a row's terms).
Its key is a hash of all of it, and serves twice: as `SamplingParams.extra_args["personactl_steering"]`, which
the workers map to a table row (`vllm_plugin`), and as the request's prefix-cache salt, so the two can
never disagree and one configuration's prompt KV is never reused for another. A configuration that
adds nothing has no key: its requests are plain unsteered requests and share the unsteered cache.

`ConfigRows` decides which configuration sits in which of the engine's R - 1 table rows (row 0 is
the zero row), keeps rows that requests in flight use, and evicts the least recently used others.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from personactl.errors import InputError, ModelError
from personactl.model.steering_ops import AddTerm, ProjectionTerm, Term, alternating, fold_adds


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def salt_for(deltas: Mapping[int, torch.Tensor], plans: Mapping[int, LayerPlan] | None = None) -> str | None:
    """A key unique to a steering configuration; None when it changes nothing. A configuration of
    adds alone keeps the key it had before steering plans existed."""
    active = {layer: d for layer, d in sorted(deltas.items()) if bool(d.ne(0).any())}
    active_plans = {layer: p for layer, p in sorted((plans or {}).items()) if p.active}
    if not active and not active_plans:
        return None
    h = hashlib.sha256(b"personactl-steering-v1")
    for layer, delta in active.items():
        h.update(f"{layer}:{delta.dtype}:".encode())
        h.update(_raw_bytes(delta))
    for layer, plan in active_plans.items():
        h.update(f"plan {layer}:".encode())
        for part in plan.parts():
            h.update(b"-" if part is None else f"{part.dtype}:{part.numel()}:".encode() + _raw_bytes(part))
    return h.hexdigest()


@dataclass(frozen=True)
class LayerPlan:
    """What a configuration puts in one layer's plan slots: `projections[k]` = (unit [H] float32,
    bounds [2] float32 lo, hi) for projection slot k, or None (neutral); `adds[k]` = the add (in the
    engine's dtype) before projection slot k + 1, or None (zeros)."""

    projections: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] = ()
    adds: tuple[torch.Tensor | None, ...] = ()

    @property
    def active(self) -> bool:
        return any(p is not None for p in self.projections) or any(
            a is not None and bool(a.ne(0).any()) for a in self.adds
        )

    def parts(self) -> list[torch.Tensor | None]:
        return [t for p in self.projections for t in (p or (None, None))] + list(self.adds)

    def wire(self) -> list[object]:
        """The layer's slots as the worker extension takes them (after the layer's delta)."""
        return [
            [None if p is None else [_raw_bytes(p[0]), _raw_bytes(p[1])] for p in self.projections],
            [None if a is None else _raw_bytes(a) for a in self.adds],
        ]


def plan_slots(
    deltas: Mapping[int, torch.Tensor],
    plan: Mapping[int, Sequence[Term]],
    projections: int,
    dtype: torch.dtype,
    hidden_size: int,
) -> tuple[dict[int, torch.Tensor], dict[int, LayerPlan]]:
    """A row's α·v (`deltas`) and steering plan as an engine with `projections` slots per layer takes
    them: the plan's first add at a layer joins α·v in the base table (added after it, as the HF
    `Steerer` adds plan terms after α·v); the rest fills projection, add, projection, ... slots.
    InputError when a layer needs more slots than the engine has."""
    out = dict(deltas)
    plans: dict[int, LayerPlan] = {}
    for layer, terms in sorted(plan.items()):
        aligned = alternating(fold_adds([_checked(term, layer, hidden_size) for term in terms]))
        if not aligned:
            continue
        capacity = 2 * projections if projections else 1
        if len(aligned) > capacity:
            raise InputError(
                f"the steering plan at layer {layer} needs {len(aligned)} slots (add, projection, add, …; "
                f"consecutive adds share one), and this vLLM engine has {capacity} per layer "
                f"({projections} projection slots)",
                hint=f"use at most {projections} ablate/cap terms at one layer, with adds before or between "
                "them, or --backend hf",
            )
        first = aligned[0]
        if isinstance(first, AddTerm):
            add = first.delta.to("cpu", dtype)
            out[layer] = out[layer] + add if layer in out else add
        rest = aligned[1:]
        plans[layer] = LayerPlan(
            tuple(_projection(t) for t in rest[0::2]),
            tuple(None if t is None else t.delta.to("cpu", dtype) for t in rest[1::2]),
        )
    return out, plans


def _checked(term: Term, layer: int, hidden_size: int) -> Term:
    tensor = term.delta if isinstance(term, AddTerm) else term.unit
    per_row = isinstance(term, ProjectionTerm) and (term.lo.dim() or term.hi.dim())
    if tensor.dim() != 1 or tensor.shape[0] != hidden_size or per_row or not bool(torch.isfinite(tensor).all()):
        raise InputError(f"the steering plan's term at layer {layer} is not one finite [{hidden_size}] vector")
    return term


def _projection(term: Term | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if term is None:
        return None
    assert isinstance(term, ProjectionTerm)
    bounds = torch.stack([term.lo.reshape(()), term.hi.reshape(())]).to("cpu", torch.float32)
    return term.unit.to("cpu", torch.float32).contiguous(), bounds


@dataclass(frozen=True)
class SteeringConfig:
    """One configuration: its key, what it adds (only non-zero layers) and its plan slots."""

    key: str
    deltas: Mapping[int, torch.Tensor]
    plans: Mapping[int, LayerPlan] = field(default_factory=dict)

    @staticmethod
    def of(deltas: Mapping[int, torch.Tensor], plans: Mapping[int, LayerPlan] | None = None) -> SteeringConfig | None:
        key = salt_for(deltas, plans)
        if key is None:
            return None
        active = {layer: d for layer, d in deltas.items() if bool(d.ne(0).any())}
        return SteeringConfig(key, active, {layer: p for layer, p in (plans or {}).items() if p.active})

    def entry(self, row: int) -> list[object]:
        """The configuration as the worker extension's `personactl_steering_put` takes it."""
        layers: list[list[object]] = []
        for layer in sorted({*self.deltas, *self.plans}):
            delta = self.deltas.get(layer)
            item: list[object] = [layer, None if delta is None else _raw_bytes(delta)]
            if layer in self.plans:
                item.extend(self.plans[layer].wire())
            layers.append(item)
        return [row, self.key, layers]


class ConfigRows:
    """Configuration key → table row, for one engine's `num_rows` rows (row 0 stays zero)."""

    def __init__(self, num_rows: int):
        self.capacity = num_rows - 1
        self._rows: collections.OrderedDict[str, int] = collections.OrderedDict()  # least recent first
        self._in_use: collections.Counter[str] = collections.Counter()

    def place(self, configs: Iterable[SteeringConfig]) -> list[list[object]]:
        """Give each configuration a row and mark it in use; returns the entries the workers must
        write (configurations not already in a row). Raises ModelError when more distinct
        configurations are in use at once than the engine has rows."""
        entries = []
        for config in {c.key: c for c in configs}.values():
            if config.key in self._rows:
                self._rows.move_to_end(config.key)
            else:
                self._rows[config.key] = self._free_row()
                entries.append(config.entry(self._rows[config.key]))
            self._in_use[config.key] += 1
        return entries

    @property
    def available(self) -> int:
        """How many more distinct configurations can be in use at once."""
        return self.capacity - len(self._in_use)

    def has_room(self, config: SteeringConfig | None) -> bool:
        """Whether `place([config])` can give it a row now (it is unsteered, in use, or a row is free)."""
        return config is None or config.key in self._in_use or self.available > 0

    def release(self, configs: Iterable[SteeringConfig]) -> None:
        for key in {c.key for c in configs}:
            self._in_use[key] -= 1
            if self._in_use[key] <= 0:
                del self._in_use[key]

    def forget(self, entries: Sequence[Sequence[object]]) -> None:
        """Drop placements whose write did not reach the workers."""
        for _row, key, _layers in entries:
            self._rows.pop(str(key), None)

    def _free_row(self) -> int:
        if len(self._rows) < self.capacity:
            return min(set(range(1, self.capacity + 1)) - set(self._rows.values()))
        for key in self._rows:
            if key not in self._in_use:
                return self._rows.pop(key)
        raise ModelError(
            f"more than {self.capacity} distinct steering configurations at once in this vLLM engine",
            hint="send fewer at once (the engine's table has one row per request it runs, max_num_seqs)",
        )
