"""What an eval would cost before running it: generations, judgements, tokens and, from the speed
this workspace has measured before, the generation time. Reads files only; loads no model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personactl.steps.evaluate import EvalSpec
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


def grid_generations(spec: EvalSpec, n_questions: int, n_layers: int) -> int:
    """Rows the eval generates: unsteered and prompted baselines (and the plan alone under a steering
    plan), then per variant, layer and α ≠ 0 one steered row per (question, sample), and as many
    random-vector rows when K > 0 (none without a swept vector)."""
    items = n_questions * spec.samples
    baselines = (3 if spec.plan else 2) * items
    if not spec.sweep:
        return baselines
    if spec.adaptive:
        per_layer = spec.rounds
    else:
        per_layer = sum(1 for a in spec.coefficients if a != 0)
    per_cell = items * (2 if spec.random_seeds else 1)
    return baselines + len(spec.variants) * n_layers * per_layer * per_cell


def measured_tokens_per_second(workspace: Workspace, model_slug: str) -> float | None:
    """The generation speed of the latest generate or steer run for this model in the workspace."""
    runs = []
    for manifest in workspace.artifacts():
        if f"/{model_slug}/" not in manifest["path"].replace("\\", "/"):
            continue
        timings, counts = manifest.get("timings") or {}, manifest.get("counts") or {}
        if manifest.get("kind") == "steer" and timings.get("tokens_per_second"):
            runs.append((manifest.get("created", ""), float(timings["tokens_per_second"])))
        elif manifest.get("kind") == "responses" and timings.get("seconds_this_run"):
            tokens = counts.get("response_tokens") or 0
            if tokens:
                runs.append((manifest.get("created", ""), tokens / timings["seconds_this_run"]))
    return max(runs)[1] if runs else None


def estimate_eval(
    *, trait: Trait, spec: EvalSpec, num_layers: int, max_new_tokens: int, tokens_per_second: float | None
) -> dict[str, Any]:
    from personactl.steps.evaluate import default_layers

    n_questions = len(trait.questions.evaluation[: spec.questions] if spec.questions else trait.questions.evaluation)
    layers = list(spec.layers or default_layers(num_layers)) if spec.sweep else []
    generations = grid_generations(spec, n_questions, len(layers))
    max_tokens = generations * max_new_tokens
    return {
        "dry_run": True,
        "layers": layers,
        "questions": n_questions,
        "generations": generations,
        "judgements": 2 * generations,  # trait and coherence per response
        "max_new_tokens_total": max_tokens,
        "tokens_per_second": None if tokens_per_second is None else round(tokens_per_second, 1),
        "estimated_generation_seconds": None if not tokens_per_second else round(max_tokens / tokens_per_second),
        "upper_bound": spec.adaptive,
    }


def describe_estimate(estimate: dict[str, Any], judge: str) -> str:
    """One paragraph for a person."""
    bound = "at most " if estimate["upper_bound"] else ""
    text = (
        f"would generate {bound}{estimate['generations']} responses ({estimate['questions']} questions, "
        f"{'layers ' + ','.join(map(str, estimate['layers'])) if estimate['layers'] else 'the steering plan alone'}) "
        f"and make {bound}{estimate['judgements']} judgements with "
        f"{judge}; up to {estimate['max_new_tokens_total']} new tokens"
    )
    seconds = estimate["estimated_generation_seconds"]
    if seconds is None:
        return text + "; no measured speed in this workspace yet (run generate or steer once for a time estimate)"
    minutes = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds} s"
    return text + f", about {minutes} of generation at the {estimate['tokens_per_second']:g} tok/s measured here"
