"""What an `ablate`, `cap` or `mean-ablate` term's VALUE means at one layer of a vector file, in
residual-stream units: the one rule that steering (`steps.plan`) and plan export
(`store.interop.plan_file`) both apply.

- `ablate` c and `cap` τ are projections on the unit direction: as given with `--norm raw` or
  `unit`, times the layer's mean stream norm with `--norm stream` (the direction was scaled to it).
- `cap` at `saved` takes τ per layer from the file's `cap_thresholds` (an imported capping
  configuration), already in stream units.
- `mean-ablate` m is m × the mean projection of the trait-free responses (the file's `neg_mean`).
- A τ as a percentile (`pNN`) needs projections personactl does not save yet: refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from personactl.errors import InputError

if TYPE_CHECKING:
    from personactl.core.steer_plan import PlanTerm
    from personactl.store.vectors import PersonaVector


def projection_value(
    term: PlanTerm, vector: PersonaVector, name: str, layer: int, position: str, norm: str, direction: torch.Tensor
) -> float:
    """The projection (stream units) that `term` sets or bounds at `layer`; `direction` is the
    file's direction there under `norm`, `name` the file's name for messages."""
    if term.percentile is not None:
        raise InputError(
            f"--steer {term.spec()}: τ as a percentile needs the projections of the vector's responses, "
            "which personactl does not save yet",
            hint="give τ as a number (a projection on the unit direction; see docs/guides/steering-plans.md)",
        )
    if term.value is None:
        return _saved_threshold(vector, name, layer)
    if term.op == "mean-ablate":
        return term.value * _mean_projection(vector, name, layer, position, direction)
    return term.value * float(direction.float().norm()) if norm == "stream" else term.value


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
