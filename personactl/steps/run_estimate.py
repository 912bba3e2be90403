"""What `personactl run` would do before it runs: per step, skipped or how many generations and
judgements, and the generation time at the speed this workspace measured. Reads files only; loads
no model and sends no request (a step whose input is not there yet is counted from the trait)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personactl.steps.eval_estimate import estimate_eval, measured_tokens_per_second

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.steps.evaluate import EvalSpec
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


def config_num_layers(settings: Settings) -> int | None:
    """The model's layer count from a config.json already on this machine (local directory, the
    converted built-in model, or the Hugging Face cache); None when there is none yet."""
    from personactl.model.loading import resolve_model

    source = resolve_model(settings.model)
    candidates = []
    if source.kind == "local":
        candidates.append(Path(source.location) / "config.json")
    elif source.kind == "builtin":
        candidates.append(Path(settings.cache_dir) / "models" / source.spec / "config.json")
    elif source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json", revision=settings.revision)
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config = config.get("text_config", config)
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(config.get(key), int):
                    return config[key]
    return None


def estimate_run(
    *, settings: Settings, workspace: Workspace, trait: Trait, spec: EvalSpec, max_questions: int | None, proxy: bool
) -> dict[str, Any]:
    """Per step: `skipped` (finished with the same inputs) or what it needs; totals for the run."""
    from personactl.model.loading import resolve_model
    from personactl.steps.generate import responses_fingerprint
    from personactl.steps.score import score_step
    from personactl.store.vectors import PersonaVector

    slug = resolve_model(settings.model).slug
    responses = workspace.responses_path(slug, trait.name, "model")
    steps: dict[str, Any] = {}
    if workspace.finished(responses, responses_fingerprint(settings, trait, max_questions)):
        steps["generate"] = {"skipped": True, "generations": 0}
    else:
        questions = trait.questions.extraction[:max_questions] if max_questions else trait.questions.extraction
        rows = 2 * len(trait.instructions) * len(questions) * settings.samples_per_question
        steps["generate"] = {"generations": rows}
    if proxy:
        steps["score"] = {"skipped": True, "judgements": 0, "why": "--proxy"}
    elif "skipped" in steps["generate"]:
        _, dry = score_step(settings=settings, workspace=workspace, trait=trait, force=False, dry_run=True)
        steps["score"] = {"judgements": dry["judgements"], "cached": dry["cached"]}
    else:
        steps["score"] = {"judgements": 2 * steps["generate"]["generations"], "cached": None}
    vector_path = workspace.vectors_path(slug, trait.name, "model")
    vector_layers = PersonaVector.load(vector_path).num_layers if vector_path.is_file() else None
    steps["extract"] = {"generations": 0, "reads": "every kept response, one forward pass each"}
    num_layers = vector_layers or config_num_layers(settings)
    speed = measured_tokens_per_second(workspace, slug)
    upstream_done = "skipped" in steps["generate"] and (proxy or steps["score"].get("judgements") == 0)
    finished = upstream_done and vector_path.is_file() and _eval_finished(settings, workspace, trait, spec, proxy)
    if finished:
        steps["eval"] = {"skipped": True, "generations": 0, "judgements": 0}
    elif num_layers is None and not spec.layers:
        steps["eval"] = {"generations": None, "why": "the model's layer count is not known before it is loaded"}
    else:
        estimate = estimate_eval(
            trait=trait, spec=spec, num_layers=num_layers or 0, max_new_tokens=settings.max_new_tokens,
            tokens_per_second=speed,
        )  # fmt: skip
        steps["eval"] = {k: estimate[k] for k in ("layers", "questions", "generations", "upper_bound")}
        steps["eval"]["judgements"] = 0 if proxy else estimate["judgements"]
    counted = [s.get("generations", 0) for s in steps.values()]  # None: the eval could not be counted
    generations = None if None in counted else sum(counted)
    max_tokens = None if generations is None else generations * settings.max_new_tokens
    return {
        "dry_run": True,
        "trait": trait.name,
        "model": settings.model,
        "steps": steps,
        "generations": generations,
        "judgements": sum(s.get("judgements") or 0 for s in steps.values()),
        "max_new_tokens_total": max_tokens,
        "tokens_per_second": None if speed is None else round(speed, 1),
        "estimated_generation_seconds": round(max_tokens / speed) if speed and max_tokens is not None else None,
    }


def _eval_finished(settings: Settings, workspace: Workspace, trait: Trait, spec: EvalSpec, proxy: bool) -> bool:
    """Whether the eval `run` would do is already in the workspace with the same inputs (the vector
    as it is now: the caller checks that nothing upstream will rewrite it). The same fingerprint as
    `eval_step` / `proxy_step`, so the dry run and the run agree on what is skipped."""
    from personactl.backends import Sampling
    from personactl.model.loading import resolve_model
    from personactl.store.responses import fingerprint_of

    slug = resolve_model(settings.model).slug
    vector_path = workspace.vectors_path(slug, trait.name, "model")
    sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
    if proxy:
        from personactl.steps.proxy import proxy_fingerprint

        variant = spec.variants[0]
        fingerprint = proxy_fingerprint(
            settings, trait, vector_path, spec.layers, variant.position, variant.aggregator, spec.questions, sampling
        )
        return workspace.finished(
            workspace.eval_path(slug, trait.name, "proxy-" + fingerprint_of(fingerprint)), fingerprint
        )
    from personactl.steps.evaluate import eval_fingerprint

    fingerprint = eval_fingerprint(settings, trait, spec, vector_path, sampling)
    return workspace.finished(workspace.eval_path(slug, trait.name, fingerprint_of(fingerprint)), fingerprint)


def describe_run_estimate(estimate: dict[str, Any], judge: str) -> str:
    """A few lines for a person: each step, then the totals and the time."""
    lines = []
    for name, step in estimate["steps"].items():
        if step.get("skipped"):
            lines.append(f"{name}: skipped ({step.get('why', 'finished with the same inputs')})")
        elif name == "extract":
            lines.append(f"extract: no generation ({step['reads']})")
        elif "generations" in step and step["generations"] is None:
            lines.append(f"{name}: not counted ({step['why']})")
        else:
            bound = "at most " if step.get("upper_bound") else ""
            what = [f"{bound}{step['generations']} generations"] if step.get("generations") else []
            if "judgements" in step:
                cached = f" ({step['cached']} already cached)" if step.get("cached") else ""
                what.append(f"{bound}{step['judgements']} judgements with {judge}{cached}")
            layers = f" at layers {','.join(map(str, step['layers']))}" if step.get("layers") else ""
            lines.append(f"{name}: {' and '.join(what) or 'nothing'}{layers}")
    seconds = estimate["estimated_generation_seconds"]
    if estimate["generations"] == 0:
        speed = estimate["tokens_per_second"]
        measured = f"; {speed:g} tok/s measured here" if speed else ""
        total = f"total: nothing to generate (every step that generates is finished{measured})"
    elif estimate["generations"] is None:
        total = "total generation time: not known until the model's layer count is (pass --layers)"
    elif seconds is None:
        total = (
            f"total: {estimate['generations']} generations, up to {estimate['max_new_tokens_total']} new tokens; "
            "no measured speed in this workspace yet (run generate or steer once for a time estimate)"
        )
    else:
        minutes = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds} s"
        total = (
            f"total: {estimate['generations']} generations, up to {estimate['max_new_tokens_total']} new tokens, "
            f"about {minutes} of generation at the {estimate['tokens_per_second']:g} tok/s measured here"
        )
    return "\n".join([*lines, total])
