"""Steering inside MLX: the same configuration as on Hugging Face, applied by wrapped decoder blocks.

The configuration is a `personactl.model.steering.Steerer` that is never entered (MLX has no hooks):
it makes the same checks, per-row α·v, plan slots and position modes as on HF. While an
`MLXSteerer` is entered, each steered block is wrapped (`mlx_model.wrapped_blocks`) and its output
gets what the configuration adds there, converted to MLX arrays once per change of coefficients or
plans, never per token. The arithmetic is `model.steering_ops`' own: h + mask·δ, then each plan term
in order (projections in float32), positions outside the mask left bit for bit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from personactl.backends.mlx_model import torch_to_mx, wrapped_blocks
from personactl.model.steering import MODE_CODES, Plan, RowSteering, Steerer, sum_with_add
from personactl.model.steering_ops import AddTerm, Term


class MLXSteerer:
    """Steers an MLX engine's generations while entered: `set_coefficients` and `set_plans` as on
    `Steerer`; the engine's decode loop tells it where each forward pass starts (`at`)."""

    def __init__(self, engine: Any, config: Steerer):
        self.engine, self.config = engine, config
        self.mx_dtype = engine.mx_dtype
        self._cache: dict[int, tuple[Any, list[tuple[Any, ...]]]] = {}  # layer → (δ, terms) as MLX arrays
        self._batch = 0
        self.offset = 0  # where the next forward pass starts in the sequence (0 at prefill)
        self.prompt_width = 0
        self._ran: set[int] = set()  # layers whose wrapped block ran in the last prefill

    @classmethod
    def build(cls, engine: Any, directions: Mapping[int, torch.Tensor], **options: Any) -> MLXSteerer:
        """`Steerer`'s arguments, without the model."""
        config = Steerer(None, directions, decoder_layers=engine.layers, dtype=engine.dtype, **options)
        return cls(engine, config)

    @classmethod
    def per_row(cls, engine: Any, rows: Sequence[RowSteering | None]) -> MLXSteerer:
        """Each row its own vectors, α, plan and position mode (`Steerer.per_row`)."""
        return cls(engine, Steerer.per_row(None, rows, decoder_layers=engine.layers, dtype=engine.dtype))

    def set_coefficients(self, coefficient: float | torch.Tensor | Mapping[int, float | torch.Tensor]) -> None:
        self.config.set_coefficients(coefficient)
        self._cache.clear()

    def set_plans(self, plans: Plan | Sequence[Plan | None] | None) -> None:
        self.config.set_plans(plans)
        self._cache.clear()

    def at(self, offset: int, batch: int) -> None:
        """The next forward pass starts at `offset` (0: a prefill, whose width is the prompt's)."""
        self.offset = offset
        if batch != self._batch:
            self._cache.clear()
            self._batch = batch

    def __enter__(self) -> MLXSteerer:
        layers = sorted({*self.config.directions, *self.config.plan_layers})
        self._wrap = wrapped_blocks(self.engine.layers, {layer - 1: self._steer_at(layer) for layer in layers})
        self._wrap.__enter__()
        self.engine.active_steerer = self
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.active_steerer = None
        self._wrap.__exit__(*exc)

    def check_ran(self) -> None:
        """After a prefill: every steered block ran (a model that walked other blocks would go
        unsteered without a word)."""
        missing = sorted({*self.config.directions, *self.config.plan_layers} - self._ran)
        self._ran.clear()
        if missing:
            from personactl.errors import ModelError

            raise ModelError(f"the MLX model ran without its steered blocks at layers {missing}")

    def _steer_at(self, layer: int) -> Any:
        def steer(hidden: Any) -> Any:
            if self.offset == 0:
                self.prompt_width = hidden.shape[1]
                self._ran.add(layer)
            delta, terms = self._arrays(layer, hidden.shape[0])
            mask = self._mask(hidden.shape[1])
            out = hidden
            if delta is not None:
                out = out + (delta if mask is None else delta * mask)
            if terms:
                out = _apply(out, terms, mask)
            return out

        return steer

    def _arrays(self, layer: int, batch: int) -> tuple[Any, list[tuple[Any, ...]]]:
        """What `layer` adds for a batch of `batch` rows: δ [B or 1, 1, H] (α·v and a plan's first
        add as one sum, as on HF) and the rest of the plan's terms, as MLX arrays."""
        if layer not in self._cache:
            terms: list[Term] = list(self.config.terms.get(layer, []))
            delta = None
            if layer in self.config.directions:
                delta = self.config.delta(layer, batch, self.config.dtype)
                if terms and isinstance(terms[0], AddTerm):
                    delta, terms = sum_with_add(delta, terms[0], batch), terms[1:]
            self._cache[layer] = (
                None if delta is None else torch_to_mx(delta, self.mx_dtype),
                [_term_arrays(term, self.mx_dtype) for term in terms],
            )
        return self._cache[layer]

    def _mask(self, length: int) -> Any:
        """[B or 1, T, 1] bool: where this forward pass is steered (None: everywhere), as `Steerer`."""
        import mlx.core as mx

        positions = mx.arange(self.offset, self.offset + length)[None, :]
        prompt = positions < self.prompt_width
        response = positions >= self.prompt_width - 1
        if self.config.row_modes is not None:
            modes = mx.array(self.config.row_modes.tolist())[:, None]
            keep = mx.where(modes == MODE_CODES["prompt"], prompt, response)
            keep = mx.where(modes == MODE_CODES["all"], mx.ones_like(keep), keep)
            return keep[:, :, None]
        if self.config.positions == "all":
            return None
        return (prompt if self.config.positions == "prompt" else response)[:, :, None]


def _term_arrays(term: Term, dtype: Any) -> tuple[Any, ...]:
    import mlx.core as mx

    if isinstance(term, AddTerm):
        delta = term.delta
        return ("add", torch_to_mx(delta[:, None, :] if delta.dim() == 2 else delta, dtype))
    unit = term.unit[:, None, :] if term.unit.dim() == 2 else term.unit
    lo = term.lo[:, None] if term.lo.dim() == 1 else term.lo
    hi = term.hi[:, None] if term.hi.dim() == 1 else term.hi
    return ("project", torch_to_mx(unit, mx.float32), torch_to_mx(lo, mx.float32), torch_to_mx(hi, mx.float32))


def _apply(hidden: Any, terms: list[tuple[Any, ...]], mask: Any) -> Any:
    """`steering_ops.apply_terms` in MLX: each term on the stream the previous one left; positions
    outside `mask` keep their values."""
    import mlx.core as mx

    out = hidden
    for term in terms:
        if term[0] == "add":
            out = out + term[1]
            continue
        _, unit, lo, hi = term
        projection = (out.astype(mx.float32) * unit).sum(-1)
        target = mx.maximum(mx.minimum(projection, hi), lo)
        out = out + ((target - projection)[..., None] * unit).astype(out.dtype)
    return out if mask is None else mx.where(mask, out, hidden)
