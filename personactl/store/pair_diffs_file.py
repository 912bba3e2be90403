"""A pair-differences file (`personactl.pair_diffs/1`, a tagged file: `store/tagged_file.py`),
written beside a vector file by `extract --keep-pairs` (`steps/pair_diffs.py`) and read by
`compare --bootstrap/--splits`.

`pair-diffs-<persona>.safetensors` holds `diff.<position>` `[n_pairs, n_rows, hidden]` fp32
(pos − neg of each pair, only the extracted rows, in `rows` order) and metadata naming the pairs,
rows and positions. A reader loads one position only: the file can be gigabytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from personactl.errors import VectorFileError
from personactl.store.tagged_file import read_tagged, write_tagged

FORMAT = "personactl.pair_diffs/1"
KEEP_PAIRS = "remake it: personactl extract ... --keep-pairs --force"


def save_pair_diffs(path: Path, diffs: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write `{position: [n_pairs, n_rows, H]}` as fp32 `diff.<position>` tensors, atomically."""
    write_tagged(path, {f"diff.{pos}": t.float() for pos, t in diffs.items()}, FORMAT, metadata)


def load_pair_diffs(path: Path, position: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """`[n_pairs, n_rows, H]` at `position`, and the metadata (`rows`, `pair_ids`, …)."""
    if not Path(path).is_file():
        raise VectorFileError(
            f"no per-pair differences at {path}",
            hint="extract with --keep-pairs to get confidence intervals and split-half reliability",
        )
    key = f"diff.{position}"
    file = read_tagged(path, FORMAT, KEEP_PAIRS, what="personactl pair-diffs file", keys={key})
    if key not in file.tensors:
        raise VectorFileError(f"{path} has no per-pair differences at {position}", hint=KEEP_PAIRS)
    diffs, rows = file.tensors[key], file.metadata.get("rows")
    if diffs.ndim != 3 or not isinstance(rows, list) or diffs.shape[1] != len(rows):
        raise VectorFileError(
            f"{path}: {key} has shape {list(diffs.shape)}, not [pairs, {len(rows or [])} rows, hidden]",
            hint=KEEP_PAIRS,
        )
    return diffs, file.metadata
