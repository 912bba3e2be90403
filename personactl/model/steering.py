"""Steering: add coefficient · vector to the residual stream during generation.

Layer convention as everywhere: steering at layer `l` adds to the residual stream after decoder
block `l`, i.e. to the output of `layers[l-1]` (row `l` of a vector file). Layer 0 (the
embeddings) is not a steering target.

Position modes, for generation with a KV cache (what `generate` does):
- `all`: every position: the whole prompt at prefill and every generated token.
- `prompt`: prompt positions only (left padding included, which nothing attends to); generated
  tokens see the steering only through the cached keys and values of the prompt.
- `response`: every position whose output predicts a response token: the last prompt token and
  every generated token; the rest of the prompt is left alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from personactl.core.choices import POSITION_MODES
from personactl.errors import InputError
from personactl.model.steering_ops import AddTerm, Term, apply_terms, fold_adds, slots, to_device

# layer → a plan's terms there, in order (`personactl.model.steering_ops`); what a row adds beyond α·v
Plan = Mapping[int, Sequence[Term]]


def _as_coefficient(value: float | torch.Tensor, device: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1).clone()


MODE_CODES = {mode: code for code, mode in enumerate(POSITION_MODES)}


class RowSteering(Protocol):
    """One batch row's own steering: α · direction at each of its layers, at its positions
    (`personactl.backends.Steering` is one; a row without steering is `None`)."""

    @property
    def directions(self) -> Mapping[int, torch.Tensor]: ...
    @property
    def alpha(self) -> float: ...
    @property
    def positions(self) -> str: ...
    @property
    def plan(self) -> Plan | None: ...


class Steerer:
    """Context manager that steers any Hugging Face causal LM; hooks are removed on exit.

        with Steerer(model, vector, layers=[16], coefficient=1.5):
            model.generate(...)

    `vector`: `[H]` (the same direction at every layer), `[L+1, H]` (row `l` at layer `l`), or a
    mapping `{layer: [H]}`. `coefficient`: a float, a `[B]` tensor (one per batch row), or a
    mapping `{layer: float | [B]}`. Coefficients live in tensors updated in place
    (`set_coefficients`), so a compiled model does not recompile when they change.

    `plan` adds a steering plan's terms (adds, ablations, caps at their layers, applied in order
    after α·v at the same positions); `set_plans` changes them, one plan for every row or one per
    row. `Steerer.per_row(model, rows)` gives every batch row its own configuration instead (its own
    vectors, layers, α, plan and position mode); a row of `None` or α = 0 without a plan is left
    exactly unsteered."""

    def __init__(
        self,
        model: Any,
        vector: torch.Tensor | Mapping[int, torch.Tensor],
        layers: Sequence[int] | None = None,
        coefficient: float | torch.Tensor | Mapping[int, float | torch.Tensor] = 1.0,
        positions: str = "all",
        decoder_layers: Any = None,
        plan: Plan | None = None,
        dtype: torch.dtype | None = None,
    ):
        from personactl.model.loading import decoder_layers as find_layers
        from personactl.model.loading import input_device

        _check_mode(positions)
        self.model = model
        self.blocks = decoder_layers if decoder_layers is not None else find_layers(model)
        self.positions = positions
        self.row_modes: torch.Tensor | None = None  # [B] codes of MODE_CODES, set by `per_row`
        if dtype is None:
            # made where inputs go; a layer whose block runs elsewhere (an accelerate device map) moves
            # its own tensors there at its first forward (`_place`), never again per step
            self.device, self.dtype = input_device(model), next(model.parameters()).dtype
        else:  # the blocks of another engine (MLX): this object only holds the configuration, on the CPU
            self.device, self.dtype = torch.device("cpu"), dtype
        if isinstance(vector, Mapping):
            directions = dict(vector)
        else:
            if layers is None:
                raise InputError("Steerer needs layers when given a single vector")
            directions = {layer: (vector[layer] if vector.dim() == 2 else vector) for layer in layers}
        for layer, direction in directions.items():
            self._check_direction(layer, direction)
        self.directions = {layer: d.to(self.device, self.dtype) for layer, d in sorted(directions.items())}
        self._placed = dict.fromkeys(self.directions, self.device)  # {layer: device its tensors are on}
        self._modes_on: dict[Any, torch.Tensor] = {}  # `row_modes` per device
        self.coefficients: dict[int, torch.Tensor] = {}
        self.row_deltas: dict[int, torch.Tensor] | None = None  # {layer: [B, H]}, set by `per_row`
        self.set_coefficients(coefficient)
        self.plan_layers = sorted(plan or {})  # hooked for plan terms, fixed for the steerer's life
        for layer in self.plan_layers:
            self._check_layer(layer)
            self._placed.setdefault(layer, self.device)
        self.terms: dict[int, list[Term]] = {}  # {layer: batched terms}, set by `set_plans`
        self.set_plans(plan)
        self._handles: list[Any] = []
        self._offset = 0
        self._prompt_width = 0

    @classmethod
    def per_row(
        cls,
        model: Any,
        rows: Sequence[RowSteering | None],
        decoder_layers: Any = None,
        dtype: torch.dtype | None = None,
    ) -> Steerer:
        """Hooks at every layer any row steers; row `b` adds its own α · direction there (zeros at
        the layers it does not steer) at the positions of its own mode."""
        layers = sorted({layer for row in rows if row is not None for layer in row.directions})
        unit = {
            layer: next(r.directions[layer] for r in rows if r is not None and layer in r.directions)
            for layer in layers
        }
        plans = [_plan_of(row) for row in rows]
        plan_layers = {layer: [] for plan in plans if plan for layer in plan}
        steerer = cls(model, unit, coefficient=0.0, decoder_layers=decoder_layers, plan=plan_layers, dtype=dtype)
        steerer.set_plans(plans)
        for row in rows:
            if row is not None:
                _check_mode(row.positions)
                for layer, direction in row.directions.items():
                    steerer._check_direction(layer, direction)
        steerer.row_deltas = {layer: steerer._deltas_at(layer, rows) for layer in layers}
        modes = [MODE_CODES[row.positions] if row is not None else MODE_CODES["all"] for row in rows]
        steerer.row_modes = torch.tensor(modes, device=steerer.device)
        return steerer

    def _deltas_at(self, layer: int, rows: Sequence[RowSteering | None]) -> torch.Tensor:
        """`[B, H]`: what each row adds at `layer`, computed as the one-vector path does (α cast to
        the model's dtype times the direction in it), so a row equals its own run alone."""
        deltas = torch.zeros(
            len(rows), next(iter(self.directions.values())).shape[0], device=self.device, dtype=self.dtype
        )
        for b, row in enumerate(rows):
            if row is not None and layer in row.directions and row.alpha != 0:
                alpha = _as_coefficient(row.alpha, self.device).to(self.dtype)
                deltas[b] = alpha * row.directions[layer].to(self.device, self.dtype)
        return deltas

    def set_plans(self, plans: Plan | Sequence[Plan | None] | None) -> None:
        """The plan terms of the next forwards: one plan for every row, or one per row (None: none);
        only at the layers the steerer was made with (`plan`)."""
        if plans is None or isinstance(plans, Mapping):
            terms = {layer: fold_adds((plans or {}).get(layer, ())) for layer in self.plan_layers}
            self._check_plan_layers([plans] if plans else [])
        else:
            self._check_plan_layers(plans)
            terms = {layer: self._row_slots(layer, plans) for layer in self.plan_layers}
        self.terms = {
            layer: [to_device(t, self._placed.get(layer, self.device)) for t in layer_terms]
            for layer, layer_terms in terms.items()
            if layer_terms
        }

    def _row_slots(self, layer: int, plans: Sequence[Plan | None]) -> list[Term]:
        """Each row's own terms at `layer` as batched slots (none when no row has terms there)."""
        rows = [list(plan.get(layer, ())) if plan else [] for plan in plans]
        first = next((t for row in rows for t in row), None)
        if first is None:
            return []
        hidden = first.delta.shape[-1] if isinstance(first, AddTerm) else first.unit.shape[-1]
        return slots(rows, hidden, self.dtype)

    def _check_plan_layers(self, plans: Sequence[Plan | None]) -> None:
        extra = sorted({layer for plan in plans if plan for layer in plan} - set(self.plan_layers))
        if extra:
            raise InputError(f"plan terms at layer {extra[0]}, which this steerer was not made for")
        for layer in {layer for plan in plans if plan for layer in plan}:
            self._check_layer(layer)

    def _check_layer(self, layer: int) -> None:
        if not 1 <= layer <= len(self.blocks):
            raise InputError(
                f"steering layer {layer} out of range 1..{len(self.blocks)}",
                hint="layer l = output of decoder block l (0 is the embeddings)",
            )

    def _check_direction(self, layer: int, direction: torch.Tensor) -> None:
        self._check_layer(layer)
        if direction.dim() != 1 or not torch.isfinite(direction).all():
            raise InputError(f"the steering vector at layer {layer} is not a finite 1-D vector")

    def set_coefficients(self, coefficient: float | torch.Tensor | Mapping[int, float | torch.Tensor]) -> None:
        """Change coefficients in place (a new tensor only when the batch size changes)."""
        for layer in self.directions:
            value = coefficient.get(layer, 0.0) if isinstance(coefficient, Mapping) else coefficient
            new = _as_coefficient(value, self._placed[layer])
            old = self.coefficients.get(layer)
            if old is not None and old.shape == new.shape:
                old.copy_(new)
            else:
                self.coefficients[layer] = new

    def _clock(self, _module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        """Track where this forward pass starts in the sequence (0 at prefill, cache length after)."""
        cache = kwargs.get("past_key_values")
        self._offset = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0

    def _position_mask(self, length: int, device: Any) -> torch.Tensor | None:
        if self._offset == 0:
            self._prompt_width = length
        if self.row_modes is not None:
            return self._row_position_mask(length, device)
        if self.positions == "all":
            return None
        positions = torch.arange(self._offset, self._offset + length, device=device)
        if self.positions == "prompt":
            keep = positions < self._prompt_width
        else:
            keep = positions >= self._prompt_width - 1
        return keep[None, :, None]

    def _row_position_mask(self, length: int, device: Any) -> torch.Tensor:
        """`[B, T, 1]`: each row's own mode (rows share the prompt width: prompts are left-padded)."""
        positions = torch.arange(self._offset, self._offset + length, device=device)[None, :]
        if device not in self._modes_on:
            self._modes_on[device] = self.row_modes.to(device)
        modes = self._modes_on[device][:, None]
        prompt = positions < self._prompt_width
        response = positions >= self._prompt_width - 1
        keep = torch.where(modes == MODE_CODES["prompt"], prompt, response)
        keep = torch.where(modes == MODE_CODES["all"], torch.ones_like(keep), keep)
        return keep[:, :, None]

    def delta(self, layer: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """`[B or 1, 1, H]`: what this forward adds at `layer`."""
        if self.row_deltas is not None:
            deltas = self.row_deltas[layer]
            if deltas.shape[0] != batch:
                raise InputError(f"steering for {deltas.shape[0]} rows given to a batch of {batch}")
            return deltas.to(dtype)[:, None, :]
        coef = self.coefficients[layer]  # looked up per call: it is replaced when the batch size changes
        if coef.numel() not in (1, batch):
            raise InputError(f"{coef.numel()} steering coefficients for a batch of {batch}")
        return coef.to(dtype)[:, None, None] * self.directions[layer]

    def _place(self, layer: int, device: Any) -> None:
        """Move what `layer` adds to `device`, where its block's output is (once per layer)."""
        if layer in self.directions:
            self.directions[layer] = self.directions[layer].to(device)
            self.coefficients[layer] = self.coefficients[layer].to(device)
        if self.row_deltas is not None and layer in self.row_deltas:
            self.row_deltas[layer] = self.row_deltas[layer].to(device)
        if layer in self.terms:
            self.terms[layer] = [to_device(t, device) for t in self.terms[layer]]
        self._placed[layer] = device

    def _hook(self, layer: int):
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if self._placed[layer] != hidden.device:
                self._place(layer, hidden.device)
            mask = self._position_mask(hidden.shape[1], hidden.device)
            steered, terms = hidden, self.terms.get(layer, [])
            if layer in self.directions:
                delta = self.delta(layer, hidden.shape[0], hidden.dtype)
                if terms and isinstance(terms[0], AddTerm):  # α·v and the plan's first add, as one sum
                    delta, terms = sum_with_add(delta, terms[0], hidden.shape[0]), terms[1:]
                steered = hidden + (delta if mask is None else delta * mask)
            if terms:
                steered = self._apply_terms(terms, steered, mask)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    @staticmethod
    def _apply_terms(terms: Sequence[Term], hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """A plan's terms at one layer, in order, at the positions of `mask` (all when None)."""
        for term in terms:
            rows = term.delta if isinstance(term, AddTerm) else term.unit
            if rows.dim() == 2 and rows.shape[0] != hidden.shape[0]:
                raise InputError(f"plan terms for {rows.shape[0]} rows given to a batch of {hidden.shape[0]}")
        return apply_terms(hidden, terms, None if mask is None else mask[..., 0])

    def __enter__(self) -> Steerer:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._clock, with_kwargs=True))
            for layer in sorted({*self.directions, *self.plan_layers}):
                self._handles.append(self.blocks[layer - 1].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def sum_with_add(delta: torch.Tensor, term: AddTerm, batch: int) -> torch.Tensor:
    """`delta` [B or 1, 1, H] (α·v) plus a plan's add: one sum, so α·v then an add of w acts
    exactly as one add of α·v + w (as consecutive plan adds fold, and as the vLLM tables add them)."""
    add = term.delta
    if add.dim() == 2 and add.shape[0] != batch:
        raise InputError(f"plan terms for {add.shape[0]} rows given to a batch of {batch}")
    return delta + (add[:, None, :] if add.dim() == 2 else add)


def _plan_of(row: RowSteering | None) -> Plan | None:
    return getattr(row, "plan", None) if row is not None else None


def _check_mode(positions: str) -> None:
    if positions not in POSITION_MODES:
        raise InputError(f"unknown steering positions {positions!r}", hint=f"choose {', '.join(POSITION_MODES)}")


@dataclass(frozen=True)
class GridRow:
    """One generation of a sweep: a prompt, and a layer and coefficient (None/0 = the baseline)."""

    prompt_index: int
    layer: int | None
    coefficient: float
    planned: bool = False  # the run's steering plan applies too (after α·v at `layer`)

    @property
    def baseline(self) -> bool:
        return self.layer is None and not self.planned


def plan_grid(
    n_prompts: int, layers: Sequence[int], coefficients: Sequence[float], planned: bool = False
) -> list[GridRow]:
    """Prompts × layers × coefficients; α = 0 is the same at every layer, so it runs once per prompt.
    With a steering plan (`planned`) every steered row follows it too, and without layers each prompt
    gets one row of the plan alone; the baseline stays unsteered."""
    rows = []
    for p in range(n_prompts):
        rows.append(GridRow(p, None, 0.0))
        if planned and not layers:
            rows.append(GridRow(p, None, 0.0, planned=True))
        rows.extend(GridRow(p, layer, float(a), planned) for layer in layers for a in coefficients if a != 0)
    return rows


class BatchGenerator(Protocol):
    """What a grid needs of an engine: one batched, seeded generate, and `steerer(...)`, which takes
    `Steerer`'s arguments without the model and gives a context manager with `set_coefficients` and
    `set_plans` that steers that engine's generations while it is entered."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Any, seed: int) -> list[Any]: ...

    def steerer(self, directions: Mapping[int, torch.Tensor], **options: Any) -> Any: ...


def run_grid(
    backend: BatchGenerator,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[GridRow],
    directions: Mapping[int, torch.Tensor],
    *,
    sampling: Any,
    seed: int,
    batch_size: int,
    positions: str = "all",
    on_chunk: Any = None,
    plan: Plan | None = None,
) -> Iterator[tuple[GridRow, Any]]:
    """Generate every grid row in batches of `batch_size`: one batched call per chunk, each row
    steered at its own layer with its own coefficient (zero at every other hooked layer), then by
    `plan` where the row is `planned`."""
    used = sorted({r.layer for r in rows if r.layer is not None})
    hooked = {k: directions[k] for k in used}
    with backend.steerer(hooked, coefficient=0.0, positions=positions, plan=plan) as steerer:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            steerer.set_coefficients(
                {k: torch.tensor([r.coefficient if r.layer == k else 0.0 for r in chunk]) for k in used}
            )
            if plan:
                steerer.set_plans([plan if r.planned else None for r in chunk])
            outputs = backend.generate([prompts[r.prompt_index] for r in chunk], sampling, seed + start // batch_size)
            if on_chunk:
                on_chunk(len(chunk), sum(len(o.token_ids) for o in outputs))
            yield from zip(chunk, outputs, strict=True)
