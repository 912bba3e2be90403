"""A readout file (`personactl.readout/1`, a tagged file: `store/tagged_file.py`), trained by
`steps/readout.py` and read by `monitor --readout` and chat's live readout.

Tensors: `vectors.<row>` `[n_concepts, hidden]` (unit norm) and `center.<row>` `[hidden]` (the mean
of all training texts; scores are `(h − center) · v`, so a common offset in the stream does not
favour one concept); metadata names the concepts and rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personactl.errors import VectorFileError
from personactl.store.tagged_file import read_tagged, write_tagged

FORMAT = "personactl.readout/1"
RETRAIN = "retrain it: personactl readout train DIR -o FILE"


def readout_metadata(path: Path) -> dict[str, Any]:
    """A readout file's metadata alone (no tensors read), e.g. for listing; a VectorFileError when
    the file is corrupt or not a readout."""
    return read_tagged(path, FORMAT, RETRAIN, what="personactl readout file", keys=()).metadata


@dataclass
class Readout:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return list(self.metadata["concepts"])

    @property
    def rows(self) -> list[int]:
        return list(self.metadata["rows"])

    def vectors(self, row: int) -> torch.Tensor:
        return self.tensors[f"vectors.{row}"]

    def center(self, row: int) -> torch.Tensor:
        return self.tensors[f"center.{row}"]

    def scores(self, values: torch.Tensor) -> torch.Tensor:
        """`[N, R, H]` activations at this readout's rows → `[N, R, C]` scores."""
        return torch.stack(
            [(values[:, i] - self.center(r)) @ self.vectors(r).T for i, r in enumerate(self.rows)], dim=1
        )

    def save(self, path: Path) -> None:
        write_tagged(path, self.tensors, FORMAT, self.metadata)

    @classmethod
    def load(cls, path: Path) -> Readout:
        """Read a readout file; a corrupt one, or one whose tensors disagree with its metadata, is a
        VectorFileError naming it."""
        if not Path(path).is_file():
            raise VectorFileError(f"readout file not found: {path}")
        file = read_tagged(path, FORMAT, RETRAIN, what="personactl readout file")
        readout = cls(file.tensors, file.metadata)
        readout.check_shapes(path)
        return readout

    def check_shapes(self, path: Path) -> None:
        """Every listed row has `vectors.<row>` [concepts, H] and `center.<row>` [H], one H for all."""
        try:
            concepts, rows = self.concepts, [int(r) for r in self.rows]
        except (KeyError, TypeError, ValueError):
            raise VectorFileError(f"{path}: readout metadata lacks concepts or rows", hint=RETRAIN) from None
        hidden = {t.shape[-1] for t in self.tensors.values() if t.ndim}
        for row in rows:
            vectors, center = self.tensors.get(f"vectors.{row}"), self.tensors.get(f"center.{row}")
            if (
                vectors is None
                or center is None
                or len(hidden) != 1
                or tuple(vectors.shape) != (len(concepts), *hidden)
                or tuple(center.shape) != tuple(hidden)
            ):
                raise VectorFileError(
                    f"{path}: the tensors at row {row} do not match its {len(concepts)} concepts", hint=RETRAIN
                )
