"""PNG plots for `eval` and `compare`. matplotlib is imported here only, with the Agg backend
(via `Figure`, no pyplot state), so nothing needs a display and `--help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from personactl.store.workspace import atomic_path


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _band(ax: Any, xs: list[float], cells: list[dict[str, Any]], metric: str, **style: Any) -> None:
    ys = [c[f"{metric}_mean"] for c in cells]
    ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", **style)
    low = [c[f"{metric}_low"] for c in cells]
    high = [c[f"{metric}_high"] for c in cells]
    if any(v is not None for v in low):
        ax.fill_between(
            xs,
            [float("nan") if v is None else v for v in low],
            [float("nan") if v is None else v for v in high],
            alpha=0.2,
            color=style.get("color"),
        )


def _hline(ax: Any, cell: dict[str, Any] | None, metric: str, label: str, color: str, style: str) -> None:
    if not cell or cell[f"{metric}_mean"] is None:
        return
    ax.axhline(cell[f"{metric}_mean"], color=color, linestyle=style, label=label)
    if cell[f"{metric}_low"] is not None:
        ax.axhspan(cell[f"{metric}_low"], cell[f"{metric}_high"], color=color, alpha=0.08)


def _kl_panel(ax: Any, rows: list[dict[str, Any]], layer: int, max_kl: float | None) -> None:
    """kl_neutral vs α for the steered and random-vector cells of one layer, the budget as a line."""
    for condition, color, style in (("steered", "tab:blue", "-"), ("random", "tab:gray", "--")):
        mine = [
            (r["coefficient"], r.get("kl_neutral")) for r in rows if (r["condition"], r["layer"]) == (condition, layer)
        ]
        points = sorted([(0.0, 0.0)] + [(a, kl) for a, kl in mine if kl is not None and a != 0])  # α = 0: no cost
        if len(points) > 1:
            ax.plot(*zip(*points, strict=True), marker="o", color=color, linestyle=style)
    if max_kl is not None:
        ax.axhline(max_kl, color="tab:red", linewidth=0.8, label=f"KL budget {max_kl:g}")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"kl_neutral, nats/token (layer {layer})", fontsize=8)


def plot_curves(cells: pl.DataFrame, threshold: float, path: Path, title: str, max_kl: float | None = None) -> Path:
    """Trait, coherence and kl_neutral vs α, one row per layer: steered and random-vector curves
    (trait and coherence with 95% CI bands); the unsteered and prompting baselines as horizontal
    lines with bands; the coherence threshold and the KL budget as red lines."""
    rows = cells.to_dicts()
    unsteered = next((r for r in rows if r["condition"] == "unsteered"), None)
    prompted = next((r for r in rows if r["condition"] == "prompted"), None)
    layers = sorted({r["layer"] for r in rows if r["condition"] == "steered"})
    fig = _figure(14, 2.6 * max(1, len(layers)) + 0.6)
    axes = fig.subplots(max(1, len(layers)), 3, squeeze=False, sharex=True)
    for i, layer in enumerate(layers):
        _kl_panel(axes[i][2], rows, layer, max_kl)
        if i == len(layers) - 1:
            axes[i][2].set_xlabel("α")
        if i == 0 and max_kl is not None:
            axes[i][2].legend(fontsize=7, loc="best")
        for j, metric in enumerate(("trait", "coherence")):
            ax = axes[i][j]
            for condition, color, style in (("steered", "tab:blue", "-"), ("random", "tab:gray", "--")):
                mine = sorted(
                    (r for r in rows if r["condition"] == condition and r["layer"] == layer),
                    key=lambda r: r["coefficient"],
                )
                if mine:
                    label = "steered" if condition == "steered" else "random vector, same norm"
                    _band(ax, [r["coefficient"] for r in mine], mine, metric, color=color, linestyle=style, label=label)
            _hline(ax, unsteered, metric, "unsteered", "black", ":")
            _hline(ax, prompted, metric, "prompted (pos system prompt)", "tab:orange", "-.")
            if metric == "coherence":
                ax.axhline(threshold, color="tab:red", linewidth=0.8, label=f"threshold {threshold:g}")
            ax.set_ylim(-2, 102)
            ax.set_ylabel(f"{metric} (layer {layer})")
            if i == len(layers) - 1:
                ax.set_xlabel("α")
            if i == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def plot_heatmap(cells: pl.DataFrame, threshold: float, path: Path, title: str) -> Path:
    """Layer × α heatmaps of mean trait and mean coherence; broken cells (coherence < threshold)
    are marked with ×."""
    import numpy as np

    rows = [r for r in cells.to_dicts() if r["condition"] == "steered"]
    layers = sorted({r["layer"] for r in rows})
    alphas = sorted({r["coefficient"] for r in rows})
    fig = _figure(4 + 1.1 * len(alphas), 1.2 + 0.45 * len(layers) + 1)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, metric, cmap in ((axes[0], "trait", "viridis"), (axes[1], "coherence", "magma")):
        grid = np.full((len(layers), len(alphas)), np.nan)
        for r in rows:
            value = r[f"{metric}_mean"]
            if value is not None:
                grid[layers.index(r["layer"]), alphas.index(r["coefficient"])] = value
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=100, origin="lower")
        for r in rows:
            y, x = layers.index(r["layer"]), alphas.index(r["coefficient"])
            value = r[f"{metric}_mean"]
            text = "—" if value is None else f"{value:.0f}" + (" ×" if r["coherent"] is False else "")
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("α")
        ax.set_ylabel("layer")
        ax.set_title(f"mean {metric}" + (f" (× = below {threshold:g})" if metric == "coherence" else ""))
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_proxy(layers: list[int], values: list[float | None], path: Path, title: str) -> Path:
    """Cohen's d of held-out pos vs neg projections per layer (a proxy, not a judged effect)."""
    fig = _figure(7, 3.5)
    ax = fig.subplots()
    ax.plot(layers, [float("nan") if v is None else v for v in values], marker="o")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("Cohen's d (pos vs neg projection)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_cosines(result: dict[str, Any], path: Path) -> Path:
    """`compare`'s cosines as a heatmap: one row per vector pair, one column per layer, plus the
    matrix of mean cosines between all vectors."""
    import numpy as np

    specs = [v["spec"] for v in result["vectors"]]
    layers = result["layers"]
    pairs = result["pairs"]
    fig = _figure(max(6, 0.28 * len(layers) + 4 + 0.6 * len(specs)), 1.5 + 0.4 * max(len(pairs), len(specs)))
    left, right = fig.subplots(1, 2, width_ratios=[max(3, len(layers) * 0.28), max(2, len(specs) * 0.6)])
    grid = np.array([p["cosine"] for p in pairs])
    image = left.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    left.set_yticks(range(len(pairs)), [f"{p['a']} · {p['b']}" for p in pairs], fontsize=7)
    step = max(1, len(layers) // 16)
    left.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    left.set_xlabel("layer")
    left.set_title("cosine per layer")
    matrix = np.eye(len(specs))
    for p in pairs:
        i, j = specs.index(p["a"]), specs.index(p["b"])
        matrix[i, j] = matrix[j, i] = p["mean_cosine"]
    right.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(specs)):
        for j in range(len(specs)):
            right.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize=7)
    right.set_xticks(range(len(specs)), specs, rotation=45, ha="right", fontsize=7)
    right.set_yticks(range(len(specs)), specs, fontsize=7)
    right.set_title("mean cosine")
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.suptitle(f"compare ({result['model']})")
    return _save(fig, path)
