"""Steerability diagnostics of an extraction, per position and layer, and the warnings they raise.

- `consistency`: mean cosine of each pair's difference with the mean difference (how much the
  pairs agree; consistent differences predict a vector that steers, arXiv 2505.22637).
- `anti_steerable`: fraction of pairs whose difference points against the mean (negative dot).
- `top_dim`, `top_dim_share`: the largest dimension of the mean difference and |v_j| / ‖v‖ (a
  random direction in 576 dimensions gives ~0.15; a massive-activation dimension gives ~1).
- `relative_size`: ‖v‖ / ‖mean activation‖ at that position: a difference within a few units of
  the dtype's resolution is mostly rounding.

Cheap by construction: the extraction's batch loop adds each pair's unit difference to a sum and
keeps the differences it already keeps for PCA (every pair while there are fewer pairs than hidden
units, else an evenly spaced sample of them); everything else is computed once at the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from personactl.core.ranges import format_ranges

MIN_PAIRS = 20  # fewer pairs and the mean difference is mostly noise at this model's scale
DOMINANT_SHARE = 0.5  # one dimension carries more than half of ‖v‖
RESOLUTION_FACTOR = 2.0  # ‖v‖ / ‖activation‖ within this many eps of the dtype is rounding territory
DIAGNOSTICS_RULE = (
    "per position and row: consistency = mean cosine of each pair difference with the mean difference; "
    "anti_steerable = fraction of pairs whose difference has a negative dot product with it (over "
    "anti_steerable_pairs pairs); top_dim_share = |v_j| / ||v|| for its largest dimension top_dim; "
    "relative_size = ||v|| / ||mean activation||"
)


def sample_slots(n_pairs: int, capacity: int) -> torch.Tensor:
    """`[n_pairs]` slot of each pair in a store of at most `capacity` pairs, -1 for pairs not kept:
    every pair when they fit, else an evenly spaced sample (input order, not batch order, so the
    sample is not biased towards short texts)."""
    if n_pairs <= capacity:
        return torch.arange(n_pairs)
    kept = torch.linspace(0, n_pairs - 1, capacity).round().long().unique()
    slots = torch.full((n_pairs,), -1, dtype=torch.long)
    slots[kept] = torch.arange(len(kept))
    return slots


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """`x / ‖x‖` along the last dimension; zero rows stay zero."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-30)


def _clean(x: float, digits: int = 4) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def summarize(
    mean_diff: torch.Tensor,
    mean_activation: torch.Tensor,
    unit_sum: torch.Tensor,
    kept_diffs: torch.Tensor,
    n_pairs: int,
) -> dict[str, list[Any]]:
    """Per-row lists from `[R, H]` mean difference and mean activation, `[R, H]` Σ unit(dᵢ) over all
    pairs and `[R, S, H]` kept per-pair differences (one position)."""
    m = mean_diff.double()
    norm = torch.linalg.vector_norm(m, dim=-1)
    consistency = (unit_sum.double() * unit_rows(m)).sum(-1) / n_pairs
    dots = torch.einsum("rsh,rh->rs", kept_diffs.double(), m)
    anti = (dots < 0).double().mean(-1)
    top = m.abs().max(dim=-1)
    share = top.values / norm
    relative = norm / torch.linalg.vector_norm(mean_activation.double(), dim=-1)
    no_direction = norm == 0
    nan = float("nan")
    return {
        "consistency": [_clean(float(x)) for x in consistency.masked_fill(no_direction, nan)],
        "anti_steerable": [_clean(float(x)) for x in anti.masked_fill(no_direction, nan)],
        "top_dim": [None if z else int(i) for i, z in zip(top.indices, no_direction, strict=True)],
        "top_dim_share": [_clean(float(x)) for x in share.masked_fill(no_direction, nan)],
        "relative_size": [_clean(float(x), 6) for x in relative],
    }


def warnings_for(diagnostics: dict[str, Any], dtype: torch.dtype) -> list[str]:
    """Human sentences for what should make a user doubt the vectors (empty when nothing does)."""
    out = []
    n = diagnostics["n_pairs"]
    if n < MIN_PAIRS:
        out.append(f"only {n} pairs: the mean difference is noisy; {MIN_PAIRS} or more are recommended")
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    rows = diagnostics["rows"]
    for position, stats in diagnostics["positions"].items():
        by_dim: dict[int, list[int]] = {}
        for row, dim, share in zip(rows, stats["top_dim"], stats["top_dim_share"], strict=True):
            if share is not None and share > DOMINANT_SHARE:
                by_dim.setdefault(dim, []).append(row)
        for dim, dim_rows in by_dim.items():
            out.append(
                f"{position}: dimension {dim} carries over {DOMINANT_SHARE:.0%} of the vector at layers "
                f"{format_ranges(dim_rows)} (a massive-activation dimension, not the trait)"
            )
        limit = RESOLUTION_FACTOR * eps
        coarse = [r for r, rel in zip(rows, stats["relative_size"], strict=True) if rel is not None and rel < limit]
        if coarse and dtype != torch.float32 and dtype != torch.float64:
            smallest = min(rel for rel in stats["relative_size"] if rel is not None)
            out.append(
                f"{position}: at layers {format_ranges(coarse)} the difference is only {smallest:.2%} of the "
                f"activation, near {str(dtype).removeprefix('torch.')}'s resolution ({eps:.1e}): "
                "extract again with --dtype float32"
            )
    return out
