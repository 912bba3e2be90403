"""A vector file checked against its own metadata before anything steers or projects with it.

A file edited by hand or written by another tool can carry tensors that disagree with what its
metadata says (hidden 1024 labelled 576, 20 rows where the model has 31) or directions whose norm
is infinite (a vector ×1e30 overflows to ‖v‖ = inf in float32). Used as they are, these fail
deep inside torch, or worse, steer silently wrong; here they are one VectorFileError naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from personactl.core.choices import AGGREGATORS, QUANTILE_POINTS
from personactl.core.ranges import format_ranges
from personactl.errors import VectorFileError

DIRECTIONS = AGGREGATORS  # the tensors that steer; their rows must have finite norms
REMAKE = "the file was changed after it was written: re-extract it (personactl extract --force) or re-import it"


def validate_against_metadata(tensors: Mapping[str, Any], metadata: Mapping[str, Any], path: Path | str) -> None:
    """Every tensor has the shape the metadata implies ([L+1, H], or [L+1] per-row values) and every
    listed row of a direction has a finite norm."""
    import torch

    try:
        layers, hidden = int(metadata["num_layers"]), int(metadata["hidden_size"])
        rows = [int(r) for r in metadata["rows"]]
    except (KeyError, TypeError, ValueError):
        raise VectorFileError(f"{path}: metadata lacks num_layers, hidden_size or rows", hint=REMAKE) from None
    if layers < 1 or hidden < 1 or any(not 0 <= r <= layers for r in rows):
        raise VectorFileError(f"{path}: metadata rows {rows} do not fit {layers} layers", hint=REMAKE)
    for key, tensor in tensors.items():
        expected = (layers + 1,) if tensor.ndim == 1 else (layers + 1, hidden)
        if key.startswith("quantiles."):  # percentiles 0..100 of projections per row (store.plan_values)
            expected = (layers + 1, QUANTILE_POINTS)
        if tuple(tensor.shape) != expected:
            raise VectorFileError(
                f"{path}: tensor {key} has shape {list(tensor.shape)}, but its metadata says {layers} layers "
                f"and hidden size {hidden} (shape {list(expected)})",
                hint=REMAKE,
            )
        if key.split(".")[0] in DIRECTIONS and rows:
            # NaN marks a row where a direction is undefined (refused when used); infinity never is
            norms = torch.linalg.vector_norm(tensor[rows].float(), dim=-1).tolist()
            bad = [row for row, norm in zip(rows, norms, strict=True) if math.isinf(norm)]
            if bad:
                raise VectorFileError(
                    f"{path}: {key} has an infinite norm at rows {format_ranges(bad)} (float32 overflows)",
                    hint="a vector scaled by a huge factor cannot steer: " + REMAKE,
                )
