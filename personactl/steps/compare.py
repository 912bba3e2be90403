"""`personactl compare`: cosine similarity per layer between vectors of one model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl.core.directions import cosine
from personactl.core.reliability import compare_uncertainty
from personactl.errors import InputError, VectorFileError
from personactl.model.loading import resolve_model
from personactl.store.pair_diffs_file import load_pair_diffs
from personactl.store.vectors import PersonaVector

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.store.workspace import Workspace


@dataclass(frozen=True)
class VectorRef:
    """`NAME_OR_FILE[:persona][@position[/aggregator]]`, e.g. `evil@prompt_end/pca`, `evil:user@user_avg`."""

    spec: str
    name: str
    position: str
    aggregator: str
    persona: str = "model"

    @classmethod
    def parse(cls, text: str, position: str, aggregator: str) -> VectorRef:
        name, _, rest = text.partition("@")
        if rest:
            position, _, agg = rest.partition("/")
            aggregator = agg or aggregator
        persona = "model"
        base, colon, suffix = name.rpartition(":")
        if colon and suffix in ("model", "user", "ithou"):
            name, persona = base, suffix
        return cls(text, name, position, aggregator, persona)


def compare_vectors(vectors: list[tuple[VectorRef, PersonaVector]], agree: float, diverge: float) -> dict[str, Any]:
    """Per-layer norms and pairwise cosines over the layers every vector has, with a summary."""
    if len(vectors) < 2:
        raise VectorFileError("compare needs at least two vectors")
    first = vectors[0][1]
    for ref, vec in vectors[1:]:
        same_shape = (vec.hidden_size, vec.num_layers) == (first.hidden_size, first.num_layers)
        if not same_shape or vec.metadata.get("model") != first.metadata.get("model"):
            raise VectorFileError(
                f"{ref.spec} is for {vec.metadata.get('model')} (hidden {vec.hidden_size}) but {vectors[0][0].spec} "
                f"is for {first.metadata.get('model')} (hidden {first.hidden_size})",
                hint="compare vectors of the same model",
            )
    tensors = [(ref, vec.get(ref.position, ref.aggregator)) for ref, vec in vectors]
    shared = sorted(set.intersection(*(set(v.rows) for _, v in vectors)))
    # a row with no direction (NaN, or all zeros: e.g. prompt_end at the embeddings, where pos and
    # neg end with the same token) has no meaningful cosine: leave it out and say so
    usable = [r for r in shared if all(torch.isfinite(t[r]).all() and t[r].abs().sum() > 0 for _, t in tensors)]
    skipped = sorted(set(shared) - set(usable))
    rows = usable
    if not rows:
        raise VectorFileError("the vectors share no extracted layer with a direction")
    norms = {ref.spec: [float(x) for x in torch.linalg.vector_norm(t[rows], dim=-1)] for ref, t in tensors}
    pairs = []
    for (ref_a, a), (ref_b, b) in combinations(tensors, 2):
        cos = [float(c) for c in cosine(a[rows], b[rows])]
        best = max(range(len(rows)), key=lambda i: cos[i])
        worst = min(range(len(rows)), key=lambda i: cos[i])
        pairs.append(
            {
                "a": ref_a.spec,
                "b": ref_b.spec,
                "cosine": cos,
                "mean_cosine": sum(cos) / len(cos),
                "max": {"layer": rows[best], "cosine": cos[best]},
                "min": {"layer": rows[worst], "cosine": cos[worst]},
                "agree_layers": [r for r, c in zip(rows, cos, strict=True) if c >= agree],
                "diverge_layers": [r for r, c in zip(rows, cos, strict=True) if abs(c) < diverge],
                "opposed_layers": [r for r, c in zip(rows, cos, strict=True) if c <= -agree],
            }
        )
    return {
        "model": first.metadata.get("model"),
        "layers": rows,
        "skipped_layers": skipped,
        "norms": norms,
        "pairs": pairs,
        "thresholds": {"agree": agree, "diverge": diverge},
        "vectors": [
            {
                "spec": r.spec,
                "position": r.position,
                "aggregator": r.aggregator,
                "trait": v.metadata.get("trait"),
                "persona": v.metadata.get("persona"),
            }
            for r, v in vectors
        ],
    }


def compare_step(
    *,
    settings: Settings,
    workspace: Workspace,
    specs: Sequence[str],
    position: str,
    aggregator: str,
    agree: float,
    diverge: float,
    bootstrap: int = 0,
    splits: int = 50,
    level: float = 0.95,
    seed: int = 0,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Compare the vectors `specs` name (files, or traits extracted for the model, see `VectorRef`);
    with `bootstrap` replicates, add cosine CIs and split-half reliability from the pair differences
    `extract --keep-pairs` saved; with `plot`, write a cosine heatmap there."""
    slug = resolve_model(settings.model).slug
    refs = [VectorRef.parse(spec, position, aggregator) for spec in specs]
    paths = [workspace.find_vector(ref.name, slug, ref.persona) for ref in refs]
    vectors = [(ref, PersonaVector.load(path)) for ref, path in zip(refs, paths, strict=True)]
    result = compare_vectors(vectors, agree, diverge)
    if bootstrap:
        diffs = pair_diffs_of(workspace, refs, paths)
        result = compare_uncertainty(result, diffs, n_boot=bootstrap, n_splits=splits, level=level, seed=seed)
    if plot is not None:
        from personactl.steps.plots import plot_cosines

        result["plot"] = str(plot_cosines(result, plot))
    return result


def pair_diffs_of(
    workspace: Workspace, refs: Sequence[VectorRef], paths: Sequence[Path]
) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """Each vector's saved pair differences at its position (`extract --keep-pairs`), with their rows."""
    if any(ref.aggregator != "mean_diff" for ref in refs):
        raise InputError("--bootstrap applies to mean_diff vectors only")
    diffs = {}
    for ref, path in zip(refs, paths, strict=True):
        tensor, meta = load_pair_diffs(workspace.pair_diffs_path(path), ref.position)
        diffs[ref.spec] = (tensor, meta["rows"])
    return diffs
