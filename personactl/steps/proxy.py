"""`eval --proxy`: a layer sweep without a judge, for offline use.

PROXY, not a judged steering effect: for each held-out evaluation question q, the model answers
under instruction pair q mod #pairs once with the `pos` and once with the `neg` system prompt
(same budget as one eval cell per side). Each answer's activation at the vector's position is
projected onto the unit vector at each layer, and the layer's score is Cohen's d of pos vs neg
projections. A large d says the direction separates trait from non-trait answers that were not
used to build it; it does not say that adding it steers well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch

from personactl.backends import require_activations
from personactl.core.ranges import check_in_range
from personactl.core.stats import cohens_d
from personactl.errors import InputError
from personactl.model.loading import resolve_model
from personactl.steps.skeleton import StepArtifact
from personactl.store.responses import fingerprint_of
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    from personactl.backends import Sampling
    from personactl.model.loading import LoadedModel
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

PROXY_LABEL = "proxy: Cohen's d of held-out pos vs neg answer projections onto the vector (no judge, no steering)"


def held_out_pairs(
    lm: LoadedModel, trait: Trait, questions: int | None, sampling: Sampling, seed: int, batch_size: int
):
    """Encoded (pos, neg) answers to the evaluation questions, generated unsteered."""
    from personactl.backends import engine_for
    from personactl.model.chat_format import chat_messages, encode_example, encode_prompt

    chosen = trait.questions.evaluation[:questions] if questions else list(trait.questions.evaluation)
    if not chosen:
        raise InputError(f"trait {trait.name} has no evaluation questions")
    messages = []
    for q, question in enumerate(chosen):
        pair = trait.instructions[q % len(trait.instructions)]
        messages += [chat_messages(pair.pos, question), chat_messages(pair.neg, question)]
    backend = engine_for(lm)
    prompts = [encode_prompt(lm.tokenizer, m) for m in messages]
    generations = []
    for start in range(0, len(prompts), batch_size):
        generations += backend.generate(prompts[start : start + batch_size], sampling, seed + start // batch_size)
    examples = [
        encode_example(lm.tokenizer, m, response_ids=g.token_ids) for m, g in zip(messages, generations, strict=True)
    ]
    return examples[0::2], examples[1::2]


def projections(
    lm: LoadedModel, examples: Sequence[Any], layers: Sequence[int], position: str, directions: dict[int, torch.Tensor]
) -> dict[int, list[float]]:
    """Scalar projection of each example's activation at `position` onto each layer's unit direction."""
    from personactl.core.directions import project
    from personactl.model.activations import (
        collate,
        reduce_positions,
        release_free_heap,
        row_reading,
    )

    out: dict[int, list[float]] = {layer: [] for layer in layers}
    state: dict[str, Any] = {}

    def on_row(row: int, hidden: torch.Tensor) -> None:
        hidden = hidden.to(lm.device)  # a block elsewhere (an accelerate device map): to the batch's device
        values, _ = reduce_positions(hidden, state["batch"], [position], norms=False)  # the extraction's own reduction
        out[row] += project(values[0], directions[row].to(values.device)).tolist()

    with torch.inference_mode(), row_reading(lm.model, lm.layers, layers, on_row) as read:
        for start in range(0, len(examples), 16):
            batch = collate(examples[start : start + 16], lm.tokenizer.pad_token_id, "right", lm.device)
            state["batch"] = batch
            read(batch)
            if lm.device.type == "cpu":
                release_free_heap()
    return out


def proxy_sweep(
    lm: LoadedModel,
    trait: Trait,
    vector: Any,
    *,
    layers: Sequence[int],
    position: str,
    aggregator: str,
    questions: int | None,
    sampling: Sampling,
    seed: int,
    batch_size: int,
    on_phase: Callable[[str, int | None], None] = lambda what, total: None,
) -> list[dict[str, Any]]:
    """One row per layer: Cohen's d, mean projections and counts (answers left empty are dropped)."""
    on_phase("eval --proxy: generate held-out pos/neg answers", None)
    pos, neg = held_out_pairs(lm, trait, questions, sampling, seed, batch_size)
    if position.startswith("response"):
        pos = [e for e in pos if e.response_len > 0]
        neg = [e for e in neg if e.response_len > 0]
    directions = {layer: vector.at(layer, position, aggregator) for layer in layers}
    on_phase("eval --proxy: project", None)
    pos_p = projections(lm, pos, layers, position, directions)
    neg_p = projections(lm, neg, layers, position, directions)
    rows = []
    for layer in layers:
        p, n = pos_p[layer], neg_p[layer]
        rows.append(
            {
                "layer": layer,
                "cohens_d": cohens_d(p, n),
                "pos_mean": sum(p) / len(p) if p else None,
                "neg_mean": sum(n) / len(n) if n else None,
                "n_pos": len(p),
                "n_neg": len(n),
            }
        )
    return rows


def proxy_fingerprint(
    settings: Settings,
    trait: Trait,
    vector_path: Path,
    layers: Sequence[int] | None,
    position: str,
    aggregator: str,
    questions: int | None,
    sampling: Sampling,
) -> dict[str, Any]:
    """Everything a proxy sweep depends on (`proxy_step` skips a finished one, `run --dry-run` says so)."""
    from dataclasses import asdict

    from personactl.steps.evaluate import file_sha256

    return {
        "kind": "eval-proxy",
        "vector_sha256": file_sha256(vector_path),
        "trait_sha256": trait.sha256,
        "layers": list(layers) if layers else None,
        "position": position,
        "aggregator": aggregator,
        "questions": questions,
        "sampling": asdict(sampling),
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "model": settings.model,
        "revision": settings.revision,
        "dtype": settings.dtype,
    }


PROXY_SCHEMA = {
    "layer": pl.Int32,
    "cohens_d": pl.Float64,
    "pos_mean": pl.Float64,
    "neg_mean": pl.Float64,
    "n_pos": pl.Int32,
    "n_neg": pl.Int32,
}


def proxy_step(
    *,
    settings: Settings,
    workspace: Workspace,
    trait: Trait,
    load: Callable[[], LoadedModel],
    layers: Sequence[int] | None,
    position: str,
    aggregator: str,
    questions: int | None,
    sampling: Sampling,
    vector_spec: str | None = None,
    plots: bool = True,
    force: bool = False,
    on_phase: Callable[[str, int | None], None] = lambda what, total: None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Skip when a proxy sweep with the same inputs exists; else sweep, save table, plot, manifest."""
    require_activations(settings.backend, "--proxy reads activations in this process, so it needs --backend hf or mlx")
    slug = resolve_model(settings.model).slug
    vector_path = workspace.find_vector(vector_spec or trait.name, slug)  # before loading: the fingerprint hashes it
    fingerprint = proxy_fingerprint(settings, trait, vector_path, layers, position, aggregator, questions, sampling)
    out = StepArtifact(
        workspace,
        workspace.eval_path(slug, trait.name, "proxy-" + fingerprint_of(fingerprint)),
        "eval-proxy",
        fingerprint,
        {"trait": trait.name, "vector": str(vector_path), "label": PROXY_LABEL},
    )
    if out.current(force):
        manifest = out.manifest()
        return pl.read_parquet(out.path), out.skipped(**{**manifest["summary"], "files": manifest["files"]})
    lm = load()
    vector = load_for_model(workspace, str(vector_path), lm).vector
    chosen = check_in_range(list(layers), lm.num_layers) if layers else [r for r in vector.rows if r > 0]
    rows = proxy_sweep(
        lm,
        trait,
        vector,
        layers=chosen,
        position=position,
        aggregator=aggregator,
        questions=questions,
        sampling=sampling,
        seed=settings.seed,
        batch_size=settings.batch_size,
        on_phase=on_phase,
    )
    table = pl.DataFrame(rows, schema=PROXY_SCHEMA)
    summary = _sweep_summary(rows)
    files: dict[str, Any] = {"table": str(out.path), "plots": []}
    if plots:
        title = f"{trait.name} · {position}/{aggregator} · {PROXY_LABEL}"
        files["plots"].append(str(_plot(out.path, rows, title, f"model {settings.model}")))
    out.commit(
        table.write_parquet,
        settings=settings,
        model=lm.describe(),
        trait={"name": trait.name, "sha256": trait.sha256},
        vector={"path": str(vector_path), "sha256": fingerprint["vector_sha256"]},
        summary=summary,
        files=files,
    )
    return table, out.done(**summary, files=files)


def _sweep_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's rows and its best layer: the largest Cohen's d (ties: the lower layer)."""
    scored = [r for r in rows if r["cohens_d"] is not None]
    best = max(scored, key=lambda r: (r["cohens_d"], -r["layer"])) if scored else None
    return {"label": PROXY_LABEL, "layers": list(rows), "best_layer": best["layer"] if best else None, "best": best}


def _plot(output: Path, rows: Sequence[dict[str, Any]], title: str, subtitle: str) -> Path:
    """Cohen's d per layer, as `<artifact stem>.png` beside the table."""
    from personactl.steps.plots import plot_proxy

    stem = output.name.removesuffix(".parquet")
    return plot_proxy(rows, output.with_name(f"{stem}.png"), title, subtitle)
