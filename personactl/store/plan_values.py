"""What an `ablate`, `cap` or `mean-ablate` term's VALUE means at one layer of a vector file, in
residual-stream units: the one rule that steering (`steps.plan`) and plan export
(`store.interop.plan_file`) both apply.

- `ablate` c and `cap` τ are projections on the unit direction: as given with `--norm raw` or
  `unit`, times the layer's mean stream norm with `--norm stream` (the direction was scaled to it).
- `cap` at `saved` takes τ per layer from the file's `cap_thresholds` (an imported capping
  configuration), already in stream units.
- `mean-ablate` m is m × the mean projection of the trait-free responses (the file's `neg_mean`).
- `cap` at a percentile (`pNN`) is that percentile of the trait-free (neg) responses' projections,
  saved by `extract --quantiles` as `quantiles.neg.<aggregator>.<position>` (stream units).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from personactl.core.choices import QUANTILE_POINTS
from personactl.errors import InputError

POINTS = QUANTILE_POINTS  # the saved percentiles: 0, 1, …, 100

if TYPE_CHECKING:
    from personactl.core.steer_plan import PlanTerm
    from personactl.store.vectors import PersonaVector


def quantile_key(side: str, aggregator: str, position: str) -> str:
    """The vector-file tensor of percentiles of one side's projections (`steps.extract_quantiles`)."""
    return f"quantiles.{side}.{aggregator}.{position}"


def projection_value(
    term: PlanTerm,
    vector: PersonaVector,
    name: str,
    layer: int,
    where: tuple[str, str],
    norm: str,
    direction: torch.Tensor,
) -> float:
    """The projection (stream units) that `term` sets or bounds at `layer`; `where` is the term's
    (position, aggregator), `direction` the file's direction there under `norm`, `name` the file's
    name for messages."""
    position, aggregator = where
    if term.percentile is not None:
        return _percentile(vector, name, layer, quantile_key("neg", aggregator, position), term.percentile)
    if term.value is None:
        return _saved_threshold(vector, name, layer)
    if term.op == "mean-ablate":
        return term.value * _mean_projection(vector, name, layer, position, direction)
    return term.value * float(direction.float().norm()) if norm == "stream" else term.value


def _percentile(vector: PersonaVector, name: str, layer: int, key: str, percentile: float) -> float:
    table = vector.tensors.get(key)
    if table is None:
        raise InputError(
            f"a τ as a percentile needs the responses' projections, which {name} lacks ({key})",
            hint="re-extract with --quantiles (a second pass over the pairs), or give τ as a number",
        )
    row = table[layer]
    low, high = int(percentile), min(int(percentile) + 1, POINTS - 1)
    weight = percentile - int(percentile)
    value = float(row[low] * (1 - weight) + row[high] * weight)  # linear, as torch.quantile interpolates
    if value != value:  # NaN: the row was not read, or has no direction
        raise InputError(f"{name} has no projections at layer {layer} ({key})", hint="cap at an extracted layer")
    return value


def _saved_threshold(vector: PersonaVector, name: str, layer: int) -> float:
    saved = vector.metadata.get("cap_thresholds") or {}
    tau = (saved.get("rows") or {}).get(str(layer))
    if tau is None:
        have = ", ".join(sorted(saved.get("rows") or {}, key=int)) or "none"
        raise InputError(
            f"{name} has no saved cap threshold at layer {layer} (saved at rows: {have})",
            hint="give τ as a number, or cap at the rows the file has thresholds for",
        )
    return float(tau)


def _mean_projection(vector: PersonaVector, name: str, layer: int, position: str, direction: torch.Tensor) -> float:
    mean = vector.tensors.get(f"neg_mean.{position}")
    if mean is None or layer >= mean.shape[0] or not bool(torch.isfinite(mean[layer]).all()):
        raise InputError(
            f"mean-ablate needs the mean activations of the trait-free responses (neg_mean.{position}), "
            f"which {name} lacks at layer {layer}",
            hint="use ablate with a value, or a vector personactl extracted",
        )
    unit = direction.float() / direction.float().norm()
    return float(mean[layer].float() @ unit)
