"""Error bars for vector comparisons: bootstrap CIs of per-layer cosines and split-half reliability.

Pure math on per-pair difference tensors `[n_pairs, R, H]` (pos − neg per pair; their mean is the
mean-difference vector).

- Bootstrap: each replicate resamples the pairs of each vector with replacement, independently
  (the two vectors may come from different pair sets), recomputes both mean differences and their
  cosine per row; the CI is the percentile interval of the replicates (linear interpolation).
- Split-half: random halves of one vector's pairs (equal sizes; an odd pair out is left out of
  that split), cosine per row between the halves' mean differences, averaged over splits. The
  Spearman-Brown value 2r / (1 + r) of that mean estimates the reliability of the full-size vector.
"""

from __future__ import annotations

import torch

from personactl.core.directions import cosine


def resample_means(diffs: torch.Tensor, n_boot: int, generator: torch.Generator) -> torch.Tensor:
    """`[n_boot, R, H]` means of pairs drawn with replacement (as counts, so no `[B, n, R, H]` copy)."""
    n = diffs.shape[0]
    draws = torch.randint(n, (n_boot, n), generator=generator)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, n, dtype=torch.float64)
    )
    flat = diffs.reshape(n, -1).double()
    return (counts @ flat / n).reshape(n_boot, *diffs.shape[1:])


def bootstrap_cosine(
    a: torch.Tensor, b: torch.Tensor, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0, chunk: int = 100
) -> dict[str, torch.Tensor]:
    """Per-row cosine of the two mean differences with a percentile bootstrap CI.

    Returns `estimate` (all pairs), `low`, `high` `[R]` and `replicates` `[n_boot, R]`."""
    generator = torch.Generator().manual_seed(seed)
    replicates = []
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        replicates.append(cosine(resample_means(a, k, generator), resample_means(b, k, generator)))
    reps = torch.cat(replicates).double()
    alpha = (1 - level) / 2
    bounds = torch.quantile(reps, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=0)
    return {
        "estimate": cosine(a.mean(0), b.mean(0)),
        "low": bounds[0].float(),
        "high": bounds[1].float(),
        "replicates": reps.float(),
    }


def split_half(diffs: torch.Tensor, *, n_splits: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean over random splits of the per-row cosine between the two halves' mean differences
    (`split_half`), and its Spearman-Brown correction (`spearman_brown`)."""
    n = diffs.shape[0]
    if n < 2:
        raise ValueError("split-half reliability needs at least two pairs")
    generator = torch.Generator().manual_seed(seed)
    half = n // 2
    total = torch.zeros(diffs.shape[1], dtype=torch.float64)
    for _ in range(n_splits):
        order = torch.randperm(n, generator=generator)
        first, second = diffs[order[:half]].mean(0), diffs[order[half : 2 * half]].mean(0)
        total += cosine(first, second).double()
    r = total / n_splits
    return {"split_half": r.float(), "spearman_brown": (2 * r / (1 + r)).float()}


def compare_uncertainty(
    result: dict,
    diffs: dict[str, tuple[torch.Tensor, list[int]]],
    *,
    n_boot: int,
    n_splits: int,
    level: float,
    seed: int,
) -> dict:
    """Add to a `compare_vectors` result: per pair of vectors a bootstrap CI of each layer's cosine,
    per vector its split-half reliability, on `result["layers"]`. `diffs[spec]` = (per-pair
    differences `[n, R, H]`, the rows they hold)."""
    layers = result["layers"]

    def at_layers(spec: str) -> torch.Tensor:
        tensor, rows = diffs[spec]
        missing = sorted(set(layers) - set(rows))
        if missing:
            raise ValueError(f"the per-pair differences of {spec} lack layers {missing}")
        return tensor[:, [rows.index(r) for r in layers]]

    selected = {spec: at_layers(spec) for spec in diffs}
    for pair in result["pairs"]:
        boot = bootstrap_cosine(selected[pair["a"]], selected[pair["b"]], n_boot=n_boot, level=level, seed=seed)
        pair["ci"] = {
            "level": level,
            "n_boot": n_boot,
            "method": "percentile bootstrap, pairs of each vector resampled independently",
            "low": [float(x) for x in boot["low"]],
            "high": [float(x) for x in boot["high"]],
        }
    result["reliability"] = {}
    for spec, tensor in selected.items():
        halves = split_half(tensor, n_splits=n_splits, seed=seed)
        result["reliability"][spec] = {
            "n_pairs": tensor.shape[0],
            "n_splits": n_splits,
            "split_half": [float(x) for x in halves["split_half"]],
            "spearman_brown": [float(x) for x in halves["spearman_brown"]],
        }
    return result
