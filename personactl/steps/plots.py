"""PNG plots for `eval` and `compare`, meant to go into a paper as they are. matplotlib is imported
here only, with the Agg backend (via `Figure`, no pyplot state), so nothing needs a display and
`--help` stays fast.

Conventions: each figure's title names what was measured, and a second line the model, the judge
and n; every interval is drawn in the colour of its line (filled, translucent, with thin edges so
that overlapping bands stay distinguishable) and says what it is; score axes run 0–100, the judge's
scale, and intervals are clipped to it; the unsteered baseline is the α = 0 point of every curve
(the slope uses it too); colourbars are labelled; numbers drawn on cells pick black or white for
contrast and are left out when the cells are too small to hold them."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import polars as pl

from personactl.store.atomic import atomic_path

STEERED, RANDOM, UNSTEERED, PROMPTED, LIMIT = "#1f77b4", "#7f7f7f", "#000000", "#e377c2", "#d62728"
SCORE_LIMITS = (0.0, 100.0)
DPI = 150


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _clip(value: float | None) -> float:
    return float("nan") if value is None else min(SCORE_LIMITS[1], max(SCORE_LIMITS[0], float(value)))


def _text_color(cmap: Any, value: float, vmin: float, vmax: float) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour)."""
    r, g, b, _ = cmap((value - vmin) / (vmax - vmin) if vmax > vmin else 0.5)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _n_text(cells: list[dict[str, Any]]) -> str:
    """`n = 6 responses per cell` (or a range), from the cells' scored counts."""
    counts = sorted({c["n"] for c in cells if c.get("n")})
    if not counts:
        return ""
    shown = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"n = {shown} responses per cell"


# ---------------------------------------------------------------- eval: curves


def _curve(rows: list[dict[str, Any]], condition: str, layer: int, unsteered: dict[str, Any] | None) -> list[dict]:
    """One condition's cells at `layer` by α, with the unsteered baseline as its α = 0 point."""
    mine = [r for r in rows if r["condition"] == condition and r["layer"] == layer]
    if mine and unsteered is not None and not any(r["coefficient"] == 0 for r in mine):
        mine.append({**unsteered, "coefficient": 0.0, "_baseline": True})
    return sorted(mine, key=lambda r: r["coefficient"])


def _band(ax: Any, cells: list[dict[str, Any]], metric: str, color: str, style: str, fill: float) -> None:
    xs = [c["coefficient"] for c in cells]
    ys = [_nan(c[f"{metric}_mean"]) for c in cells]
    ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.6, zorder=3)
    solid = [(x, y) for c, x, y in zip(cells, xs, ys, strict=True) if not c.get("_baseline")]
    if solid:
        ax.plot(*zip(*solid, strict=True), linestyle="none", marker="o", markersize=4.5, color=color, zorder=4)
    base = [(x, y) for c, x, y in zip(cells, xs, ys, strict=True) if c.get("_baseline")]
    if base:  # the unsteered point: hollow, so it reads as the shared baseline
        ax.plot(*zip(*base, strict=True), linestyle="none", marker="o", markersize=5.5, color=color,
                markerfacecolor="white", zorder=5)  # fmt: skip
    low = [_clip(c[f"{metric}_low"]) for c in cells]
    high = [_clip(c[f"{metric}_high"]) for c in cells]
    if any(v == v for v in low):  # not all NaN
        ax.fill_between(xs, low, high, color=color, alpha=fill, linewidth=0, zorder=1)
        for edge in (low, high):
            ax.plot(xs, edge, color=color, linewidth=0.6, alpha=0.55, linestyle=style, zorder=2)


def _baseline(ax: Any, cell: dict[str, Any] | None, metric: str, color: str, style: str) -> None:
    if not cell or cell[f"{metric}_mean"] is None:
        return
    ax.axhline(cell[f"{metric}_mean"], color=color, linestyle=style, linewidth=1.1, zorder=2)
    if cell[f"{metric}_low"] is not None:
        ax.axhspan(_clip(cell[f"{metric}_low"]), _clip(cell[f"{metric}_high"]), color=color, alpha=0.07, zorder=0)


def _score_panel(
    ax: Any,
    rows: list[dict[str, Any]],
    layer: int,
    metric: str,
    unsteered: dict[str, Any] | None,
    prompted: dict[str, Any] | None,
    threshold: float,
) -> None:
    """One layer's trait or coherence vs α: the baselines as lines (prompting with its band), the
    coherence threshold, then the random-vector and steered curves with their bands."""
    _baseline(ax, prompted, metric, PROMPTED, "-.")
    if unsteered and unsteered[f"{metric}_mean"] is not None:
        ax.axhline(unsteered[f"{metric}_mean"], color=UNSTEERED, linestyle=":", linewidth=1.0, zorder=2)
    if metric == "coherence":
        ax.axhline(threshold, color=LIMIT, linewidth=1.0, zorder=2)
    random = _curve(rows, "random", layer, unsteered)
    if random:
        _band(ax, random, metric, RANDOM, "--", 0.12)
    _band(ax, _curve(rows, "steered", layer, unsteered), metric, STEERED, "-", 0.2)
    ax.set_ylim(-2, 102)
    ax.set_yticks([0, 25, 50, 75, 100])
    ax.grid(alpha=0.25, linewidth=0.5)


def _kl_panel(ax: Any, rows: list[dict[str, Any]], layer: int, max_kl: float | None) -> None:
    """kl_neutral vs α for the steered and random-vector cells of one layer, the budget as a line."""
    for condition, color, style in (("steered", STEERED, "-"), ("random", RANDOM, "--")):
        mine = [
            (r["coefficient"], r.get("kl_neutral")) for r in rows if (r["condition"], r["layer"]) == (condition, layer)
        ]
        points = sorted([(a, kl) for a, kl in mine if kl is not None and a != 0])
        if points:
            ax.plot(*zip(*sorted([(0.0, 0.0), *points]), strict=True), color=color, linestyle=style, linewidth=1.6)
            ax.plot(*zip(*points, strict=True), linestyle="none", marker="o", markersize=4.5, color=color)
            ax.plot([0.0], [0.0], linestyle="none", marker="o", markersize=5.5, color=color, markerfacecolor="white")
    if max_kl is not None:
        ax.axhline(max_kl, color=LIMIT, linewidth=1.0)
    ax.set_ylim(bottom=0)


def _legend_handles(has_random: bool, has_prompted: bool, threshold: float, max_kl: float | None) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color=STEERED, marker="o", markersize=4.5, label="steered (mean, 95% CI band)"),
        Line2D(
            [],
            [],
            color=STEERED,
            marker="o",
            markersize=5.5,
            markerfacecolor="white",
            linestyle="none",
            label="α = 0: unsteered",
        ),  # fmt: skip
    ]
    if has_random:
        handles.append(Line2D([], [], color=RANDOM, marker="o", markersize=4.5, linestyle="--",
                              label="random vector, same norm"))  # fmt: skip
    handles.append(Line2D([], [], color=UNSTEERED, linestyle=":", label="unsteered level"))
    if has_prompted:
        handles.append(Line2D([], [], color=PROMPTED, linestyle="-.", label="prompted (pos system prompt)"))
        handles.append(Patch(color=PROMPTED, alpha=0.15, label="its 95% CI"))
    handles.append(Line2D([], [], color=LIMIT, label=f"coherence threshold {threshold:g}"))
    if max_kl is not None:
        handles.append(Line2D([], [], color=LIMIT, linewidth=1.0, label=f"KL budget {max_kl:g}"))
    return handles


def plot_curves(
    cells: pl.DataFrame,
    threshold: float,
    path: Path,
    title: str,
    max_kl: float | None = None,
    subtitle: str | None = None,
) -> Path:
    return _save(curves_figure(cells, threshold, title, max_kl, subtitle), path)


def curves_figure(
    cells: pl.DataFrame, threshold: float, title: str, max_kl: float | None = None, subtitle: str | None = None
) -> Any:
    """Trait, coherence and kl_neutral vs α, one row per layer: steered and random-vector curves
    through the unsteered point at α = 0, with 95% CI bands in their colours; the unsteered and
    prompting baselines as horizontal lines (prompting with its band); the coherence threshold and
    the KL budget as red lines; one legend for the figure."""
    rows = cells.to_dicts()
    unsteered = next((r for r in rows if r["condition"] == "unsteered"), None)
    prompted = next((r for r in rows if r["condition"] == "prompted"), None)
    layers = sorted({r["layer"] for r in rows if r["condition"] == "steered"})
    has_random = any(r["condition"] == "random" for r in rows)
    n_rows = max(1, len(layers))
    fig = _figure(13, 2.5 * n_rows + 1.5)
    axes = fig.subplots(n_rows, 3, squeeze=False, sharex=True)
    heads = ("trait score (0–100)", "coherence score (0–100)", "KL on neutral text (nats/token)")
    for j, head in enumerate(heads):
        axes[0][j].set_title(head, fontsize=10)
    for i, layer in enumerate(layers):
        for j, metric in enumerate(("trait", "coherence")):
            _score_panel(axes[i][j], rows, layer, metric, unsteered, prompted, threshold)
        _kl_panel(axes[i][2], rows, layer, max_kl)
        axes[i][2].grid(alpha=0.25, linewidth=0.5)
        axes[i][0].set_ylabel(f"layer {layer}", fontsize=10, fontweight="bold")
        for ax in axes[i]:
            ax.axvline(0, color="black", linewidth=0.4, alpha=0.4, zorder=0)
    alphas = sorted({r["coefficient"] for r in rows if r["condition"] == "steered"} | {0.0})
    for ax in axes[-1]:
        ax.set_xlabel("α (steering coefficient)")
        if len(alphas) <= 12:  # ticks at the αs measured
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
    fig.legend(
        handles=_legend_handles(has_random, prompted is not None, threshold, max_kl),
        loc="outside lower center",
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    n = _n_text([r for r in rows if r["condition"] == "steered"])
    _suptitle(fig, title, _join(subtitle, n, "95% t-intervals, clipped to 0–100"), 150)
    return fig


def _join(*parts: str | None) -> str:
    return " · ".join(p for p in parts if p)


def _suptitle(fig: Any, title: str, subtitle: str | None, width: int) -> None:
    """The title over a line of facts (model, judge, n), each wrapped to `width` characters (one
    text, so that constrained layout makes room for both)."""
    text = textwrap.fill(title, width)
    if subtitle:
        text += "\n" + textwrap.fill(subtitle, width)
    fig.suptitle(text, fontsize=10.5, linespacing=1.5)


# ---------------------------------------------------------------- eval: heatmap


def plot_heatmap(cells: pl.DataFrame, threshold: float, path: Path, title: str, subtitle: str | None = None) -> Path:
    return _save(heatmap_figure(cells, threshold, title, subtitle), path)


def heatmap_figure(cells: pl.DataFrame, threshold: float, title: str, subtitle: str | None = None) -> Any:
    """Layer × α heatmaps of mean trait and mean coherence, with the unsteered baseline as the α = 0
    column; broken cells (coherence below the threshold) are marked with ×."""
    import matplotlib as mpl
    import numpy as np

    rows = [r for r in cells.to_dicts() if r["condition"] == "steered"]
    unsteered = next((r for r in cells.to_dicts() if r["condition"] == "unsteered"), None)
    layers = sorted({r["layer"] for r in rows})
    alphas = sorted({r["coefficient"] for r in rows} | ({0.0} if unsteered else set()))
    fig = _figure(max(8.0, 3.2 + 1.3 * len(alphas)), 2.2 + 0.42 * len(layers))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, metric, cmap_name in ((axes[0], "trait", "viridis"), (axes[1], "coherence", "magma")):
        cmap = mpl.colormaps[cmap_name]
        grid, texts = _heatmap_cells(rows, unsteered, layers, alphas, metric)
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=100, origin="lower")
        size = 8 if len(alphas) <= 12 and len(layers) <= 24 else 0
        for (y, x), text in texts.items() if size else ():
            value = grid[y, x]
            color = "black" if np.isnan(value) else _text_color(cmap, value, 0, 100)
            ax.text(x, y, text, ha="center", va="center", fontsize=size, color=color)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("α (0: unsteered)" if unsteered else "α")
        ax.set_ylabel("layer")
        ax.set_title(f"mean {metric}" + (f" (× = below {threshold:g})" if metric == "coherence" else ""), fontsize=10)
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.set_label(f"mean {metric} score (0–100)", fontsize=8)
    _suptitle(fig, title, _join(subtitle, _n_text(rows)), 100)
    return fig


def _heatmap_cells(
    rows: list[dict[str, Any]], unsteered: dict[str, Any] | None, layers: list[int], alphas: list[float], metric: str
) -> tuple[Any, dict[tuple[int, int], str]]:
    """The layer × α grid of mean `metric` (NaN where unmeasured; α = 0 from the unsteered cell) and
    the text of each measured cell: its mean, "×" when broken, "—" when it has no score."""
    import numpy as np

    grid = np.full((len(layers), len(alphas)), np.nan)
    texts: dict[tuple[int, int], str] = {}
    for layer in layers:
        for alpha in alphas:
            cell = next((r for r in rows if r["layer"] == layer and r["coefficient"] == alpha), None)
            if cell is None and alpha == 0 and unsteered is not None:
                cell = unsteered
            if cell is None:
                continue
            y, x = layers.index(layer), alphas.index(alpha)
            value = cell[f"{metric}_mean"]
            if value is not None:
                grid[y, x] = value
            texts[(y, x)] = "—" if value is None else f"{value:.0f}" + (" ×" if cell["coherent"] is False else "")
    return grid, texts


# ---------------------------------------------------------------- eval --proxy


def plot_proxy(rows: list[dict[str, Any]], path: Path, title: str, subtitle: str | None = None) -> Path:
    return _save(proxy_figure(rows, title, subtitle), path)


def proxy_figure(rows: list[dict[str, Any]], title: str, subtitle: str | None = None) -> Any:
    """Cohen's d of held-out pos vs neg projections per layer with its 95% interval (a proxy, not a
    judged effect); `rows` as `proxy_sweep` returns them (layer, cohens_d, n_pos, n_neg)."""
    from personactl.core.stats import cohens_d_interval

    layers = [r["layer"] for r in rows]
    ds = [_nan(r["cohens_d"]) for r in rows]
    bounds = [
        cohens_d_interval(r["cohens_d"], r["n_pos"], r["n_neg"]) if r["cohens_d"] is not None else None for r in rows
    ]
    fig = _figure(8, 4.2)
    ax = fig.subplots()
    low = [b[0] if b else float("nan") for b in bounds]
    high = [b[1] if b else float("nan") for b in bounds]
    ax.fill_between(layers, low, high, color=STEERED, alpha=0.2, linewidth=0)
    for edge in (low, high):
        ax.plot(layers, edge, color=STEERED, linewidth=0.6, alpha=0.55)
    ax.plot(layers, ds, marker="o", markersize=4, color=STEERED, linewidth=1.6, label="Cohen's d, 95% CI band")
    ax.axhline(0, color="black", linewidth=0.6)
    scored = [r for r in rows if r["cohens_d"] is not None]
    if scored:
        best = max(scored, key=lambda r: (r["cohens_d"], -r["layer"]))
        ax.annotate(
            f"best: layer {best['layer']}, d = {best['cohens_d']:.2f}",
            (best["layer"], best["cohens_d"]),
            xytext=(0, 10),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("Cohen's d (pos vs neg projection)")
    ax.grid(alpha=0.25, linewidth=0.5)
    ax.legend(fontsize=8, loc="lower center", frameon=False)
    counts = sorted({(r["n_pos"], r["n_neg"]) for r in rows})
    n = (
        f"n = {counts[0][0]} pos and {counts[0][1]} neg held-out answers per layer"
        if len(counts) == 1
        else f"n = {min(c[0] for c in counts)}–{max(c[0] for c in counts)} pos answers per layer"
        if counts
        else ""
    )
    _suptitle(fig, title, _join(subtitle, n, "95% CI: d ± 1.96·SE (Hedges & Olkin)"), 80)
    return fig


# ---------------------------------------------------------------- compare --plot


def plot_cosines(result: dict[str, Any], path: Path) -> Path:
    return _save(cosines_figure(result), path)


def cosines_figure(result: dict[str, Any]) -> Any:
    """`compare`'s cosines as a heatmap: one row per vector pair, one column per layer, plus the
    matrix of mean cosines between all vectors (its numbers drawn while the cells can hold them)."""
    import matplotlib as mpl
    import numpy as np

    specs = [v["spec"] for v in result["vectors"]]
    layers = result["layers"]
    pairs = result["pairs"]
    cmap = mpl.colormaps["RdBu_r"]
    cell = 0.62  # inches per matrix cell: room for "+0.00" at 7.5 pt
    matrix_width = max(2.2, cell * len(specs))
    label_room = 0.075 * max(len(s) for s in specs)
    left_width = max(4.0, 0.24 * len(layers))
    height = max(2.8, 1.6 + max(0.34 * len(pairs), cell * len(specs)) + label_room)
    fig = _figure(left_width + matrix_width + 2 * label_room + 2.2, height)
    left, right = fig.subplots(1, 2, width_ratios=[left_width, matrix_width])
    grid = np.array([p["cosine"] for p in pairs], dtype=float)
    image = left.imshow(grid, aspect="auto", cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    left.set_yticks(range(len(pairs)), [f"{p['a']} · {p['b']}" for p in pairs], fontsize=7.5)
    step = max(1, round(len(layers) / 16))
    left.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
    left.set_xlabel("layer")
    left.set_title("cosine per layer", fontsize=10)
    matrix = np.eye(len(specs))
    for p in pairs:
        i, j = specs.index(p["a"]), specs.index(p["b"])
        matrix[i, j] = matrix[j, i] = p["mean_cosine"]
    right.imshow(matrix, cmap=cmap, vmin=-1, vmax=1)
    if len(specs) <= 14:
        size = 7.5 if len(specs) <= 8 else 6
        for i in range(len(specs)):
            for j in range(len(specs)):
                color = _text_color(cmap, matrix[i, j], -1, 1)
                right.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize=size, color=color)
    right.set_xticks(range(len(specs)), specs, rotation=40, ha="right", fontsize=7.5)
    right.set_yticks(range(len(specs)), specs, fontsize=7.5)
    right.set_title("mean cosine over layers", fontsize=10)
    bar = fig.colorbar(image, ax=[left, right], shrink=0.85, pad=0.02)
    bar.set_label("cosine similarity", fontsize=8)
    _suptitle(
        fig,
        f"cosine similarity between persona vectors ({result['model']})",
        f"{len(specs)} vectors, layers {layers[0]}–{layers[-1]}" if layers else None,
        110,
    )
    return fig
