"""`personactl compare`: cosine similarity per layer between vectors of one model."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from personactl.core.directions import cosine
from personactl.errors import VectorFileError
from personactl.store.vectors import PersonaVector


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
