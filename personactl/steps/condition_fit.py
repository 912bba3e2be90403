"""`personactl condition fit`: the layer and threshold of a `--when` condition, fitted by F1 on
labelled prompts.

At every layer each prompt's last-token projection on the vector's unit direction is read (the
same reading `--when` makes before steering, `steps.condition`), and the threshold maximising F1
is found (`core.condition_fit`). The best layer is the one with the highest F1; among equal F1 the
shallower layer wins (its forward pass is shorter). The result is saved as a small JSON artifact
with its manifest, and names the exact `--when` to use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personactl.core.condition_fit import ThresholdFit, baseline_f1, best_threshold, check_labels
from personactl.core.condition_spec import ConditionSpec
from personactl.core.ranges import check_steering_layers
from personactl.core.steer_plan import split_persona
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.steps.condition import prompt_projections, unit_direction
from personactl.steps.skeleton import RunArtifact
from personactl.store.labelled_prompts import read_labelled_prompts
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


@dataclass(frozen=True)
class LabelledPrompt:
    """One prompt as the model sees it (system prompt and user message) and whether to steer it."""

    system: str | None
    text: str
    label: int  # 1: steering should act, 0: it should not


def file_prompts(path: Path, system: str | None) -> list[LabelledPrompt]:
    """The lines of a labels file as user messages, each with `system` as its system prompt."""
    return [LabelledPrompt(system, text, label) for text, label in read_labelled_prompts(path)]


def trait_prompts(trait: Trait) -> tuple[list[LabelledPrompt], str]:
    """A trait's contrastive prompts: every question under each pos instruction (label 1) and each
    neg instruction (label 0). The held-out evaluation questions when the trait has them (the vector
    was extracted on the others), else the extraction questions; the second value says which."""
    which = "evaluation" if trait.questions.evaluation else "extraction"
    questions = getattr(trait.questions, which)
    prompts = [
        LabelledPrompt(pair.pos if label else pair.neg, question, label)
        for pair in trait.instructions
        for question in questions
        for label in (1, 0)
    ]
    return prompts, which


def fit_condition_step(
    *,
    settings: Settings,
    workspace: Workspace,
    lm: LoadedModel,
    vector_spec: str,
    prompts: Sequence[LabelledPrompt],
    source: dict[str, Any],
    layers: list[int] | None,
    position: str,
    aggregator: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the threshold at every layer, pick the best, save the fit; return it and a summary."""
    labels = [p.label for p in prompts]
    check_labels(labels)
    name, persona = split_persona(vector_spec)
    loaded = load_for_model(workspace, name, lm, persona)
    rows = check_steering_layers(layers, lm.num_layers) if layers else [r for r in loaded.vector.rows if r >= 1]
    units = {}
    for row in rows:
        units[row] = unit_direction(loaded, row, position, aggregator)
    prompt_ids = [encode_prompt(lm.tokenizer, chat_messages(p.system, p.text)) for p in prompts]
    start = time.perf_counter()
    projections = prompt_projections(lm, prompt_ids, units, settings.extract_batch_tokens)
    fits = {row: best_threshold(projections[row], labels) for row in rows}
    best = best_layer(fits)
    when = None
    if best is not None:
        when = ConditionSpec(vector_spec, best, fits[best].threshold, position, aggregator).spec()
    document = {
        "vector": str(loaded.path),
        "trait": loaded.label,
        "position": position,
        "aggregator": aggregator,
        "source": source,
        "prompts": len(labels),
        "positives": sum(labels),
        "baseline_f1": baseline_f1(labels),
        "layers": [layer_row(row, fits[row]) for row in rows],
        "best": layer_row(best, fits[best]) if best is not None else None,
        "when": when,
        "reads": "projection of the last prompt token on the unit direction; a prompt passes when above",
    }
    path = workspace.condition_fit_path(lm.source.slug, loaded.label)
    out = RunArtifact(workspace, path, "condition-fit", summary={"when": when})
    out.commit(
        lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8"),
        settings=settings,
        model=lm.describe(),
        trait={"name": loaded.label},
        run={k: document[k] for k in ("vector", "position", "aggregator", "source", "when")},
        counts={"prompts": len(labels), "positives": sum(labels), "layers": len(rows)},
        timings={"seconds": round(time.perf_counter() - start, 2)},
    )
    warnings = [loaded.warning] if loaded.warning else []
    return document, out.done(warnings=warnings)


def best_layer(fits: dict[int, ThresholdFit | None]) -> int | None:
    """The layer with the highest F1; the shallowest among equals; None when no layer splits at all."""
    scored = [(fit.f1, -row) for row, fit in fits.items() if fit is not None]
    return -max(scored)[1] if scored else None


def layer_row(row: int, fit: ThresholdFit | None) -> dict[str, Any]:
    """One layer of the fit as the table and the JSON show it (F1 null: every projection equal)."""
    if fit is None:
        return {"layer": row, "f1": None, "threshold": None}
    return {
        "layer": row,
        "f1": fit.f1,
        "threshold": fit.threshold,
        "precision": fit.precision,
        "recall": fit.recall,
        "below": fit.below,
        "above": fit.above,
        "tp": fit.tp,
        "fp": fit.fp,
        "fn": fit.fn,
        "tn": fit.tn,
    }
