"""From judged samples to the numbers `eval` reports: cells with CIs, best layer, breaking point.

Definitions (C = the coherence threshold; a cell is one (condition, vector variant, layer, α)):
- A cell is *coherent* when its mean coherence is ≥ C; *broken* when it is < C; a cell with no
  coherence score at all is neither (and is left out of both).
- Per layer, the *slope* is the ordinary least-squares slope of mean trait score on α over that
  layer's coherent steered cells plus the unsteered baseline at α = 0 (when it is coherent): the
  trait change per unit α while the model still makes sense. None with fewer than two αs. Under a
  steering plan the α = 0 point is the `plan` cell (the plan alone), since every steered row follows it.
- A *paired change* (plan vs unsteered, cross effects) is the mean over (question, sample) pairs,
  both scored, of the score difference, with a 95% t-interval of those differences.
- The *best layer* is the one with the largest slope (ties: the lower layer).
- The *breaking point* of a layer is the smallest α > 0 whose cell is broken (None: not within the
  αs tried); `breaking_alpha_negative` is the α < 0 closest to 0 that is broken.
- A cell's *kl_neutral* is the mean over its responses of their direction's KL(steered ‖ unsteered)
  per token on the shipped neutral texts (`personactl.model.capability_cost`); a random cell averages its
  K directions. It is *over budget* when kl_neutral > the KL budget (`--max-kl`).
- The *KL limit* of a layer is the smallest α > 0 whose cell is over budget (None: none is).
- The *recommended α* at a layer is the largest coherent α > 0 below both its breaking point and
  its KL limit. A cell without kl_neutral (an eval saved before it existed) is not held to the budget.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from personactl.core.stats import CI_METHOD, mean_ci, slope
from personactl.errors import InputError

# nats per token. Measured on the embedded SmolLM2 (bf16, the chat mood vector): greedy replies at
# layers 11/15/19 stay fluent and on topic up to α = 2 (KL 0.21-0.64 over layers 8-22, both signs) and
# go off topic or into letter soup at α = 4 (KL 1.35-3.1); 1.0 sits between. docs/guides/sinks-diagnostics-kl.md.
DEFAULT_MAX_KL = 1.0


def check_max_kl(max_kl: float) -> float:
    if not max_kl > 0:
        raise InputError(f"--max-kl must be > 0 (got {max_kl:g})", hint="a KL budget in nats per token, e.g. 1")
    return float(max_kl)


SCORE_SCALE = (0.0, 100.0)  # the judge's scale: intervals are clipped to it
CELL_KEYS = ["condition", "position", "aggregator", "norm_mode", "layer", "coefficient"]
CONDITION_ORDER = {"unsteered": 0, "prompted": 1, "plan": 2, "steered": 3, "random": 4}
CHANGE_SCALE = (-100.0, 100.0)  # a difference of two 0–100 scores
PAIR_KEYS = ["question_index", "sample_index"]


def paired_change(steered: pl.DataFrame, reference: pl.DataFrame, column: str) -> dict[str, Any]:
    """Mean change of `column` from `reference` to `steered` over the same (question, sample) pairs,
    both scored, with a 95% t-interval of the paired differences (the design pairs every steered
    response with the unsteered answer to the same prompt)."""
    joined = steered.select(*PAIR_KEYS, column).join(
        reference.select(*PAIR_KEYS, pl.col(column).alias("_ref")), on=PAIR_KEYS, how="inner"
    )
    diffs = [
        None if s is None or r is None else s - r
        for s, r in zip(joined[column].to_list(), joined["_ref"].to_list(), strict=True)
    ]
    ci = mean_ci(diffs, bounds=CHANGE_SCALE)
    return {"change": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n, "missing": ci.missing}


def cells_table(samples: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """One row per cell: mean trait and coherence with 95% t-intervals, and the None counts."""
    records = []
    for key, group in samples.group_by(CELL_KEYS, maintain_order=True):
        trait = mean_ci(group["trait_score"].to_list(), bounds=SCORE_SCALE)
        coherence = mean_ci(group["coherence_score"].to_list(), bounds=SCORE_SCALE)
        mean_c = coherence.mean
        kl = group["kl_neutral"].drop_nulls() if "kl_neutral" in group.columns else pl.Series([], dtype=pl.Float64)
        records.append(
            {
                **dict(zip(CELL_KEYS, key, strict=True)),
                "n": group.height,
                **trait.as_dict("trait"),
                **coherence.as_dict("coherence"),
                "coherent": None if mean_c is None else mean_c >= threshold,
                "kl_neutral": float(kl.mean()) if kl.len() else None,
            }
        )
    table = pl.DataFrame(records, infer_schema_length=None)
    order = table["condition"].replace_strict(CONDITION_ORDER, default=9, return_dtype=pl.Int32)
    return (
        table.with_columns(order.alias("_o"))
        .sort(["_o", "position", "aggregator", "norm_mode", "layer", "coefficient"], nulls_last=False)
        .drop("_o")
    )


def _cell(cells: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for cell in cells:
        if all(cell[k] == v for k, v in match.items()):
            return cell
    return None


def _over_budget(cell: dict[str, Any], max_kl: float) -> bool:
    return cell.get("kl_neutral") is not None and cell["kl_neutral"] > max_kl


def layer_analysis(cells: pl.DataFrame, threshold: float, max_kl: float = DEFAULT_MAX_KL) -> list[dict[str, Any]]:
    """Slope, breaking points, KL limit and recommended α per (vector variant, layer); see the module doc."""
    rows = cells.to_dicts()
    unsteered = _cell(rows, condition="plan") or _cell(rows, condition="unsteered")  # α = 0 of the steered rows
    out = []
    steered = [r for r in rows if r["condition"] == "steered"]
    variants = sorted({(r["position"], r["aggregator"], r["norm_mode"]) for r in steered})
    for position, aggregator, norm in variants:
        variant = {"position": position, "aggregator": aggregator, "norm_mode": norm}
        of_variant = [r for r in steered if all(r[k] == v for k, v in variant.items())]
        for layer in sorted({r["layer"] for r in of_variant}):
            mine = sorted((r for r in of_variant if r["layer"] == layer), key=lambda r: r["coefficient"])
            points = [
                (r["coefficient"], r["trait_mean"]) for r in mine if r["coherent"] and r["trait_mean"] is not None
            ]
            if unsteered and unsteered["coherent"] and unsteered["trait_mean"] is not None:
                points.append((0.0, unsteered["trait_mean"]))
            broken_pos = [r["coefficient"] for r in mine if r["coefficient"] > 0 and r["coherent"] is False]
            broken_neg = [r["coefficient"] for r in mine if r["coefficient"] < 0 and r["coherent"] is False]
            breaking = min(broken_pos) if broken_pos else None
            over = [r["coefficient"] for r in mine if r["coefficient"] > 0 and _over_budget(r, max_kl)]
            kl_limit = min(over) if over else None
            ceiling = min((a for a in (breaking, kl_limit) if a is not None), default=None)
            good = [
                r["coefficient"]
                for r in mine
                if r["coefficient"] > 0 and r["coherent"] and (ceiling is None or r["coefficient"] < ceiling)
            ]
            recommended = max(good) if good else None
            at = _cell(mine, coefficient=recommended) if recommended is not None else None
            rand = (
                _cell(rows, condition="random", layer=layer, coefficient=recommended, **variant)
                if recommended is not None
                else None
            )
            trait_at = at["trait_mean"] if at else None
            random_at = rand["trait_mean"] if rand else None
            out.append(
                {
                    **variant,
                    "layer": layer,
                    "slope": slope([p[0] for p in points], [p[1] for p in points]),
                    "alphas_in_fit": sorted(p[0] for p in points),
                    "breaking_alpha": breaking,
                    "breaking_alpha_negative": max(broken_neg) if broken_neg else None,
                    "kl_limit_alpha": kl_limit,
                    "recommended_alpha": recommended,
                    "kl_at_recommended": at["kl_neutral"] if at else None,
                    "trait_at_recommended": trait_at,
                    "coherence_at_recommended": at["coherence_mean"] if at else None,
                    "random_trait_at_recommended": random_at,
                    "steered_minus_random": None if trait_at is None or random_at is None else trait_at - random_at,
                }
            )
    return out


def best_layer(analysis: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The (variant, layer) with the largest slope; ties go to the lower layer."""
    candidates = [a for a in analysis if a["slope"] is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (a["slope"], -a["layer"]))


def diagnose(
    unsteered: dict[str, Any] | None, best: dict[str, Any] | None, threshold: float, swept: bool = True
) -> dict[str, Any]:
    """Why no α is recommended, in words: an unsteered model below the coherence threshold fails
    every cell whatever α is, so blaming the αs would send the user the wrong way. Without a sweep
    (a steering plan alone) there is no α to recommend and nothing to diagnose about αs."""
    base = None if unsteered is None else unsteered["coherence_mean"]
    if base is not None and base < threshold:
        return {
            "kind": "baseline_below_threshold",
            "message": f"the unsteered model's own coherence is {base:.1f}, below the threshold {threshold:g}, "
            "so every cell fails it whatever α is: the judge finds this model incoherent unsteered",
            "hint": f"lower --coherence-threshold (e.g. {max(0.0, base - 10):.0f}), or use a stronger judge",
        }
    if swept and (best is None or best["recommended_alpha"] is None):
        return {
            "kind": "alphas_too_large",
            "message": "no layer has two coherent αs to fit a slope"
            if best is None
            else f"no α > 0 stayed coherent at layer {best['layer']}",
            "hint": "try smaller αs (or --adaptive)",
        }
    return {"kind": None, "message": None, "hint": None}


def summarize(
    samples: pl.DataFrame, threshold: float, max_kl: float = DEFAULT_MAX_KL
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Cells table plus the JSON summary: per-layer analysis, best layer, baselines, and how the
    prompting baseline compares with the best steered cell (AxBench: prompting often wins)."""
    cells = cells_table(samples, threshold)
    analysis = layer_analysis(cells, threshold, max_kl)
    best = best_layer(analysis)
    rows = cells.to_dicts()
    unsteered = _cell(rows, condition="unsteered")
    prompted = _cell(rows, condition="prompted")
    comparison = None
    if best and best["recommended_alpha"] is not None and prompted and prompted["trait_mean"] is not None:
        at = _cell(
            rows,
            condition="steered",
            layer=best["layer"],
            coefficient=best["recommended_alpha"],
            position=best["position"],
            aggregator=best["aggregator"],
            norm_mode=best["norm_mode"],
        )
        overlap = None
        if None not in (at["trait_low"], at["trait_high"], prompted["trait_low"], prompted["trait_high"]):
            overlap = at["trait_low"] <= prompted["trait_high"] and prompted["trait_low"] <= at["trait_high"]
        comparison = {
            "prompted_trait": prompted["trait_mean"],
            "prompted_coherence": prompted["coherence_mean"],
            "steered_trait": at["trait_mean"],
            "steered_coherence": at["coherence_mean"],
            "prompting_ahead": prompted["trait_mean"] >= at["trait_mean"],
            "cis_overlap": overlap,
        }
    return cells, {
        "coherence_threshold": threshold,
        "diagnosis": diagnose(
            unsteered, best, threshold, swept=bool(analysis) or _cell(rows, condition="plan") is None
        ),
        "max_kl": max_kl,
        "ci_method": CI_METHOD,
        "definitions": {
            "slope": "least-squares slope of mean trait on α over coherent αs (mean coherence ≥ threshold) "
            "plus the unsteered α=0",
            "best_layer": "largest slope (ties: lower layer)",
            "breaking_alpha": "smallest α > 0 with mean coherence < threshold",
            "kl_neutral": "mean per-token KL(steered ‖ unsteered) in nats, teacher-forced on personactl's "
            "neutral texts",
            "kl_limit_alpha": "smallest α > 0 with kl_neutral > max_kl",
            "recommended_alpha": "largest coherent α > 0 below the breaking point and the KL limit",
        },
        "layers": analysis,
        "best": best,
        "baselines": {"unsteered": unsteered, "prompted": prompted},
        "prompting_vs_steering": comparison,
        "plan_effect": plan_effect(samples),
    }


def plan_effect(samples: pl.DataFrame) -> dict[str, Any] | None:
    """The steering plan alone (condition `plan`) against the unsteered answers to the same prompts:
    paired changes of trait and coherence (None without plan rows)."""
    plan = samples.filter(pl.col("condition") == "plan")
    if plan.is_empty():
        return None
    unsteered = samples.filter(pl.col("condition") == "unsteered")
    return {
        "trait": paired_change(plan, unsteered, "trait_score"),
        "coherence": paired_change(plan, unsteered, "coherence_score"),
    }
