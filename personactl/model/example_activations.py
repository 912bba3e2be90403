"""Per-example residual-stream readings (not just the sums `extract_vectors` keeps).

For bootstrap CIs (per-pair differences), readout training (one vector per text) and monitoring
(projections per text and per token). The same hooks, padding and position reductions as
extraction (`residual_hooks`, `collate`, `reduce_positions`), so a reading here is exactly the quantity a
vector was averaged from. Memory is N × positions × rows × hidden fp32: callers keep N moderate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personactl.errors import InputError
from personactl.model.activations import (
    ALL_POSITIONS,
    POSITIONS,
    collate,
    model_width,
    reduce_positions,
    release_free_heap,
    row_reading,
    token_sinks,
)
from personactl.model.chat_format import EncodedExample
from personactl.model.loading import input_device


@dataclass
class Readings:
    values: torch.Tensor  # [N, P, R, H] fp32, examples in input order
    positions: list[str]
    rows: list[int]
    tokens: list[torch.Tensor] | None = None  # per example [T, R, K]: projections of every token


def length_batches(examples: Sequence[EncodedExample], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length, each batch at most ~batch_tokens padded tokens (at least one)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(examples[i].input_ids) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def read_examples(
    model: Any,
    layers: Any,
    examples: Sequence[EncodedExample],
    *,
    pad_id: int,
    rows: Sequence[int],
    positions: Sequence[str] = POSITIONS,
    batch_tokens: int = 8192,
    directions: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Readings:
    """Activations of every example at `positions` and `rows`; with `directions` `[R, K, H]` (unit
    vectors, one set per row), also every token's projection onto them (pads excluded; NaN at a
    row where the token is an attention sink, `personactl.core.sinks`)."""
    unknown = set(positions) - set(ALL_POSITIONS)
    if unknown:
        raise InputError(f"unknown position(s) {sorted(unknown)}", hint=f"choose from {', '.join(ALL_POSITIONS)}")
    if not examples:
        raise InputError("no texts to read")
    rows = sorted(set(rows))
    device = input_device(model)  # the batch; a block elsewhere (a device map) hands its rows over (`on_row`)
    hidden_size = model_width(model)
    values = torch.zeros(len(examples), len(positions), len(rows), hidden_size)
    tokens: list[torch.Tensor | None] = [None] * len(examples)
    row_index = {row: i for i, row in enumerate(rows)}
    dirs = directions.to(device, torch.float32) if directions is not None else None
    per_token: dict[int, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def on_row(row: int, hidden: torch.Tensor) -> None:
        batch, index = state["batch"], state["index"]
        hidden = hidden.to(device)  # once per row: under a device map the block may run elsewhere
        reduced, _ = reduce_positions(hidden, batch, positions, norms=False)  # [P, B, H]
        values[index, :, row_index[row]] = reduced.transpose(0, 1).cpu()
        if dirs is not None:
            projections = torch.einsum("bth,kh->btk", hidden.float(), dirs[row_index[row]])
            projections[token_sinks(hidden, batch)] = float("nan")
            per_token[row] = projections.cpu()

    with torch.inference_mode(), row_reading(model, layers, rows, on_row) as read:
        for batch_indices in length_batches(examples, batch_tokens):
            batch = collate([examples[i] for i in batch_indices], pad_id, "right", device)
            state.update(batch=batch, index=torch.tensor(batch_indices))
            per_token.clear()
            read(batch)
            if dirs is not None:
                stacked = torch.stack([per_token[r] for r in rows], dim=2)  # [B, T, R, K]
                for b, i in enumerate(batch_indices):
                    tokens[i] = stacked[b, : len(examples[i].input_ids)]
            if device.type == "cpu":
                release_free_heap()
            if on_batch:
                on_batch(len(batch_indices))
    return Readings(values, list(positions), rows, tokens if dirs is not None else None)  # type: ignore[arg-type]
