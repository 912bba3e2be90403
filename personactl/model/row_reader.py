"""The seam between activation reading and an engine whose model is not a torch module.

Every reader (extraction, `read_examples`, the proxy) runs one forward pass per batch and is handed
each requested residual row as the pass reaches it. On a torch model that is done with hooks
(`personactl.model.activations.residual_hooks`); a `RowReader` (the MLX engine's model) runs its own
forward pass and hands over the same rows as torch tensors, under the same layer convention."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class RowReader(Protocol):
    """A model that reads its own residual rows (row 0 = embeddings, row l = output of block l)."""

    hidden_size: int
    dtype: torch.dtype  # the dtype its stream is computed in
    device: torch.device  # where the torch tensors it hands over are (the batch goes there too)

    def read_rows(self, batch: Any, rows: Sequence[int], on_row: Callable[[int, torch.Tensor], None]) -> None:
        """One forward pass over `batch` (a `model.activations.Batch`: ids, mask, padding), calling
        `on_row(row, hidden)` with `hidden` [B, T, H] for each of `rows` in increasing order; nothing
        past the deepest runs."""
        ...
