"""`personactl run`: generate → score → extract → eval for one trait, each step skipping what is done.

Calls the steps' own functions (never a subprocess), so each step's skip/resume rules hold: a
finished artifact with the same inputs is reused, and the model is loaded once, only when some
step has work to do. With `proxy`, there is no judge: score is left out and eval is the proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from personactl.steps.eval_any import eval_or_proxy
from personactl.steps.extract import extract_step
from personactl.steps.generate import generate_step
from personactl.steps.score import score_step

if TYPE_CHECKING:
    from personactl.model.loading import ModelHandle
    from personactl.settings import Settings
    from personactl.steps.evaluate import EvalSpec
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


def run_pipeline(
    *,
    settings: Settings,
    workspace: Workspace,
    trait: Trait,
    spec: EvalSpec,
    load: Callable[[], ModelHandle],
    load_judge: Callable[[str], Any] | None,
    max_questions: int | None,
    eval_questions: int | None,
    proxy: bool = False,
    on_step: Callable[[str], None] = lambda name: None,
    on_phase: Callable[[str, int | None], None] = lambda what, total: None,
    on_chunk: Callable[[int, int], None] | None = None,
    on_judged: Callable[[Any], None] = lambda j: None,
    on_judge: Callable[[Any], None] = lambda judge: None,
) -> dict[str, Any]:
    """Run the four steps; return each step's summary and the recommendation. `eval_questions` is
    unused: the eval reads `spec.questions` (the CLI builds the spec with the same value)."""
    steps: dict[str, Any] = {}
    on_step("generate")
    steps["generate"] = generate_step(
        settings=settings,
        trait=trait,
        workspace=workspace,
        load=load,
        max_questions=max_questions,
        force=False,
        on_start=lambda total, done: on_phase("generate", total - done),
        on_batch=lambda rows, tokens: on_chunk(rows, tokens) if on_chunk else None,
    )
    if not proxy:
        on_step("score")
        _, steps["score"] = score_step(
            settings=settings,
            workspace=workspace,
            trait=trait,
            force=False,
            on_start=lambda total, cached: on_phase("score", total - cached),
            on_done=on_judged,
            load=load_judge,
            on_judge=on_judge,
        )
    on_step("extract")
    _, steps["extract"] = extract_step(
        settings=settings,
        workspace=workspace,
        load=load,
        trait=trait,
        pairs_file=None,
        name=None,
        rows=None,
        positions=None,
        aggregators=["mean_diff", "pca"],
        force=False,
    )
    on_step("eval")
    _, steps["eval"] = eval_or_proxy(
        settings=settings,
        workspace=workspace,
        trait=trait,
        spec=spec,
        load=load,
        proxy=proxy,
        load_judge=load_judge,
        on_phase=on_phase,
        on_chunk=on_chunk,
        on_judged=on_judged,
        on_judge=on_judge,
    )
    return {"trait": trait.name, "model": settings.model, "steps": steps, "recommendation": recommendation(steps)}


def recommendation(steps: dict[str, Any]) -> dict[str, Any]:
    """Layer and α to use, and where the evidence is."""
    result = steps["eval"]
    plots = result.get("files", {}).get("plots", [])
    if "label" in result:  # the proxy sweep: a layer, no α
        return {"kind": "proxy", "layer": result["best_layer"], "alpha": None, "plots": plots, "label": result["label"]}
    best = result.get("best")
    if best is None:
        return {"kind": "judged", "layer": None, "alpha": None, "plots": plots}
    return {
        "kind": "judged",
        "layer": best["layer"],
        "alpha": best["recommended_alpha"],
        "position": best["position"],
        "aggregator": best["aggregator"],
        "norm": best["norm_mode"],
        "breaking_alpha": best["breaking_alpha"],
        "prompting_vs_steering": result.get("prompting_vs_steering"),
        "plots": plots,
    }
