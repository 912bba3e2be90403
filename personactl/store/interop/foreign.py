"""A foreign vector before it meets a model: 1-D vectors keyed by the file's own layer index.

Files index layers two ways: by personactl row (= HF `hidden_states` index) or by 0-based decoder
block (row = block + 1). Negative indices count from the end, as in Python. The mapping needs the
model's layer count, which is why it happens only at import time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from personactl.errors import InputError

IndexKind = Literal["row", "block"]
# where a personactl vector row acts, written into vector files and exports that have room for it
INDEX_MEANING = {
    "row": "index l = personactl row l = HF hidden_states[l] (0 = embeddings, l = output of block l)",
    "block": "index k = output of 0-based decoder block k = personactl row k+1",
}


def as_vector(value: Any, what: str) -> torch.Tensor:
    """A finite fp32 1-D tensor from a tensor, array or list; `[1, 1, H]` shapes are squeezed."""
    try:
        tensor = torch.as_tensor(value).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what} is not a numeric vector ({exc})") from None
    if tensor.dim() > 1 and sum(s != 1 for s in tensor.shape) <= 1:
        tensor = tensor.reshape(-1)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise InputError(f"{what} has shape {list(tensor.shape)}, expected a 1-D vector [hidden]")
    if not torch.isfinite(tensor).all():
        raise InputError(f"{what} has non-finite values")
    return tensor.contiguous()


@dataclass
class ForeignVector:
    format: str
    vectors: dict[int, torch.Tensor]  # keyed by the file's index, see `index`
    index: IndexKind
    model_hint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)  # the file's own metadata, kept as provenance
    full_rows: int | None = None  # rows of an `[R, H]` tensor: L+1 when indexed by row, L by block
    caps: dict[int, float] | None = None  # a cap threshold per vector, keyed like `vectors` (assistant-axis)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise InputError(f"the {self.format} file holds no vectors")
        sizes = {v.numel() for v in self.vectors.values()}
        if len(sizes) != 1:
            raise InputError(f"the {self.format} file mixes vector sizes {sorted(sizes)}")

    @property
    def hidden_size(self) -> int:
        return next(iter(self.vectors.values())).numel()

    def to_rows(self, num_layers: int, hidden_size: int, model: str) -> dict[int, torch.Tensor]:
        """The vectors keyed by personactl row for a model with `num_layers` blocks."""
        if self.hidden_size != hidden_size:
            raise InputError(
                f"the vectors have {self.hidden_size} dimensions but {model} has hidden size {hidden_size}",
                hint="import them with --model set to the model they were made for",
            )
        self._check_full_rows(num_layers, hidden_size, model)
        rows: dict[int, torch.Tensor] = {}
        for key, vector in sorted(self.vectors.items()):
            row = self.row_of(key, num_layers, model)
            if row in rows:
                raise InputError(f"the {self.format} file has two vectors for row {row}")
            rows[row] = vector
        return rows

    def _check_full_rows(self, num_layers: int, hidden_size: int, model: str) -> None:
        """A full table must have one row per row (L+1) or one per block (L), as its index says."""
        if self.full_rows is None:
            return
        if self.index == "block" and self.full_rows != num_layers:
            raise InputError(
                f"the {self.format} file has {self.full_rows} rows (one per decoder block) but {model} has "
                f"{num_layers} blocks",
                hint="import it with --model set to the model it was made for",
            )
        if self.index == "row" and self.full_rows != num_layers + 1:
            hint = "a full vector has one row per hidden_states entry: the embeddings plus one per block"
            if self.full_rows == num_layers:
                hint = "this looks like one row per block without the embeddings row: pass --layer-index block"
            raise InputError(
                f"the tensor has {self.full_rows} rows but {model} has {num_layers} layers, so a full vector "
                f"is [{num_layers + 1}, {hidden_size}] (row 0 = embeddings)",
                hint=hint,
            )

    def cap_rows(self, num_layers: int, model: str) -> dict[int, float]:
        """The cap thresholds keyed by personactl row (empty when the file has none)."""
        return {self.row_of(k, num_layers, model): tau for k, tau in sorted((self.caps or {}).items())}

    def row_of(self, key: int, num_layers: int, model: str) -> int:
        """The personactl row of the file's index `key` (negative indices count from the end)."""
        count = num_layers if self.index == "block" else num_layers + 1
        position = key if key >= 0 else count + key
        if not 0 <= position < count:
            raise InputError(
                f"{self.index} {key} does not exist in {model}: it has {self.index}s 0..{count - 1}",
                hint=INDEX_MEANING[self.index],
            )
        return position + 1 if self.index == "block" else position
