"""`personactl show`: what a vector file holds, as plain data (metadata, tensor shapes, norms per row)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from personactl.core.choices import AGGREGATORS
from personactl.store.vectors import PersonaVector

DIRECTION_PREFIXES = tuple(f"{a}." for a in AGGREGATORS)  # directions; pos_mean/neg_mean are means


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def describe_vector(vector: PersonaVector, path: Path) -> dict[str, Any]:
    """Norms per extracted row of every direction tensor (None where a row has no direction)."""
    directions = sorted(k for k in vector.tensors if k.startswith(DIRECTION_PREFIXES))
    stream = vector.tensors.get("stream_norm")
    layers = []
    for row in vector.rows:
        norms = {key: _number(float(torch.linalg.vector_norm(vector.tensors[key][row]))) for key in directions}
        layers.append(
            {"layer": row, "stream_norm": _number(float(stream[row])) if stream is not None else None, **norms}
        )
    return {
        "path": str(path),
        "metadata": vector.metadata,
        "tensors": [
            {"name": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in sorted(vector.tensors.items())
        ],
        "directions": directions,
        "layers": layers,
    }
