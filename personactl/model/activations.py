"""Residual-stream capture and streamed extraction of persona vectors.

Layer convention (the same everywhere in personactl): row `l` in 0..L is the residual stream
*after* decoder block `l` (1-based); row 0 is the input to block 1 (the embeddings, after any
model-specific scaling). Rows 0..L-1 equal Hugging Face's `hidden_states[l]`; row L is the raw
output of the last block, before the final norm (HF's `hidden_states[L]` is after it), because
that is the stream steering at layer L acts on.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personactl.core.choices import POSITIONS
from personactl.core.diagnostics import sample_slots, summarize, unit_rows, warnings_for
from personactl.core.directions import principal_direction, principal_direction_of_rows
from personactl.core.sinks import median_span_norm, sink_mask, without_sinks
from personactl.errors import InputError
from personactl.model.chat_format import EncodedExample, PairExample
from personactl.model.loading import input_device
from personactl.model.row_reader import RowReader

# the answer after a thinking section (`<think>…</think>`); the response itself when there is none
THINKING_POSITIONS = ("answer_start", "answer_avg")
ALL_POSITIONS = POSITIONS + THINKING_POSITIONS


class _StopForward(Exception):
    """Raised by the deepest hook so nothing past the last needed layer is computed."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def residual_hooks(
    layers: Any, rows: Sequence[int], on_row: Callable[[int, torch.Tensor], None], stop_after_last: bool = True
) -> Iterator[None]:
    """Call `on_row(row, hidden[B,T,H])` for each requested row during a forward pass.

    Hooks are removed on exit, also after an exception. With `stop_after_last`, the forward pass
    is cut off right after the deepest requested row (use `run_to_last_row`)."""
    wanted = sorted(set(rows))
    if not wanted or wanted[0] < 0 or wanted[-1] > len(layers):
        raise InputError(f"layer rows must be within 0..{len(layers)}, got {list(rows)}")
    deepest = wanted[-1]
    handles = []

    def post_hook(row: int):
        def hook(_module, _args, output):
            on_row(row, _hidden(output))
            if stop_after_last and row == deepest:
                raise _StopForward

        return hook

    def embeddings_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        on_row(0, hidden)
        if stop_after_last and deepest == 0:
            raise _StopForward

    try:
        if 0 in wanted:
            handles.append(layers[0].register_forward_pre_hook(embeddings_hook, with_kwargs=True))
        for row in wanted:
            if row > 0:
                handles.append(layers[row - 1].register_forward_hook(post_hook(row)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_to_last_row(model: Any, **inputs: Any) -> None:
    """Forward pass that ends at the deepest hooked row (no final norm, no lm_head, no logits)."""
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass


@contextlib.contextmanager
def row_reading(
    model: Any, layers: Any, rows: Sequence[int], on_row: Callable[[int, torch.Tensor], None]
) -> Iterator[Callable[[Batch], None]]:
    """`read(batch)`: one forward pass over `batch` that hands each of `rows` to `on_row` and stops
    after the deepest: hooks on a torch model, the model's own pass on a `RowReader` (MLX)."""
    if isinstance(model, RowReader):
        wanted = sorted(set(rows))
        if not wanted or wanted[0] < 0 or wanted[-1] > len(layers):
            raise InputError(f"layer rows must be within 0..{len(layers)}, got {list(rows)}")
        yield lambda batch: model.read_rows(batch, wanted, on_row)
        return
    with residual_hooks(layers, rows, on_row):
        yield lambda batch: run_to_last_row(
            model,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            position_ids=batch.position_ids,
        )


def model_width(model: Any) -> int:
    """The hidden size of a torch model or a `RowReader`."""
    if isinstance(model, RowReader):
        return model.hidden_size
    return int(model.get_input_embeddings().weight.shape[1])


def model_dtype(model: Any) -> torch.dtype:
    """The dtype a torch model or a `RowReader` computes its stream in."""
    return model.dtype if isinstance(model, RowReader) else next(model.parameters()).dtype


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] bool
    position_ids: torch.Tensor  # [B, T]
    prompt_end: torch.Tensor  # [B] index of the last prompt token
    response_start: torch.Tensor  # [B] index of the first response token
    prompt_mask: torch.Tensor  # [B, T] bool
    response_mask: torch.Tensor  # [B, T] bool
    first: torch.Tensor  # [B] column of each sequence's first real token (always a sink)
    answer_start: torch.Tensor  # [B] index of the first answer token (after any thinking section)
    answer_mask: torch.Tensor  # [B, T] bool
    pad_rows: torch.Tensor  # [n_pads] flat indices (b * T + t) of the padding positions
    sinks_so_far: torch.Tensor | None = None  # [B, T] sinks found at the rows read so far this pass
    scratch: torch.Tensor | None = None  # [B, T, H] fp32 buffer reused by every row of this batch


def collate(examples: Sequence[EncodedExample], pad_id: int, padding_side: str = "right", device: Any = "cpu") -> Batch:
    """Pad a batch and compute exact spans. Position ids follow the mask, so either side is exact."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    starts = []
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        start = width - n if padding_side == "left" else 0
        ids[i, start : start + n] = torch.tensor(example.input_ids)
        mask[i, start : start + n] = True
        starts.append(start)
    start = torch.tensor(starts)
    prompt_len = torch.tensor([e.prompt_len for e in examples])
    answer_begin = torch.tensor([e.answer_begin for e in examples])
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    cols = torch.arange(width)[None, :]
    rel = cols - start[:, None]  # position of each column within its own sequence
    prompt_mask = (rel >= 0) & (rel < prompt_len[:, None])
    response_mask = (rel >= prompt_len[:, None]) & (rel < lengths[:, None])
    answer_mask = (rel >= answer_begin[:, None]) & (rel < lengths[:, None])
    position_ids = rel.clamp(min=0)
    to = lambda t: t.to(device)  # noqa: E731
    return Batch(
        to(ids),
        to(mask),
        to(position_ids),
        to(start + prompt_len - 1),
        to(start + prompt_len),
        to(prompt_mask),
        to(response_mask),
        to(start),
        to(start + answer_begin),
        to(answer_mask),
        to((~mask).view(-1).nonzero().squeeze(1)),
    )


def row_sinks(token_norms: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`[B, T]` sinks at this row: the rule's own flags plus every sink of the rows read before it
    in this forward pass (rows arrive in order; a massive activation persists once it appears)."""
    sinks = sink_mask(token_norms, batch.attention_mask, batch.first)
    if batch.sinks_so_far is not None:
        sinks |= batch.sinks_so_far
    batch.sinks_so_far = sinks
    return sinks


def token_sinks(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`[B, T]` sink flags of one row's hidden states (`personactl.core.sinks`), pads never flagged."""
    norms = torch.linalg.vector_norm(hidden.float(), dim=-1).masked_fill(~batch.attention_mask, 0.0)
    return row_sinks(norms, batch)


TOKEN_POSITIONS = ("prompt_end", "response_start")  # one token each, right after the prompt; cut-able


def reduce_positions(
    hidden: torch.Tensor, batch: Batch, positions: Sequence[str], norms: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example vectors [P, B, H] in fp32 at each position, and each example's stream norm [B]
    (the median norm of its response tokens; None with `norms=False`). Averaged spans and norms
    leave out sink positions (`personactl.core.sinks`). Single-token positions alone gather before
    upcasting, so no fp32 copy of the whole [B, T, H] batch is made; the values are the same
    (both index real tokens)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    index = {"prompt_end": batch.prompt_end, "response_start": batch.response_start, "answer_start": batch.answer_start}
    if not norms and set(positions) <= set(TOKEN_POSITIONS):
        return torch.stack([hidden[rows, index[p]].to(torch.float32) for p in positions]), None
    # a private fp32 copy (the model's own tensor is never touched), into a buffer the batch reuses
    # row after row: a fresh 20 MB allocation per row cost 3x the copy itself in page faults
    if batch.scratch is None or batch.scratch.shape != hidden.shape or batch.scratch.device != hidden.device:
        batch.scratch = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    h32 = batch.scratch.copy_(hidden)
    # pad rows may hold anything, even NaN: zero them (indexing the few pad rows is ~10x cheaper
    # than a broadcast masked_fill over the whole batch)
    h32.view(-1, h32.shape[-1]).index_fill_(0, batch.pad_rows, 0.0)
    token_norms = torch.linalg.vector_norm(h32, dim=-1)
    sinks = row_sinks(token_norms, batch)
    example_norms = median_span_norm(token_norms, batch.response_mask & ~sinks) if norms else None
    spans = {"response_avg": batch.response_mask, "prompt_avg": batch.prompt_mask, "answer_avg": batch.answer_mask}
    averaged = [p for p in positions if p not in index]
    means = {}
    if averaged:  # every span's mean in one batched matmul: h32 is read once, not once per span
        span = torch.stack([without_sinks(spans[p], sinks) for p in averaged], dim=1)  # [B, S, T]
        weights = span.float() / span.sum(2, keepdim=True).clamp(min=1)
        means = dict(zip(averaged, torch.einsum("bst,bth->sbh", weights, h32), strict=True))
    out = [h32[rows, index[p]] if p in index else means[p] for p in positions]
    return torch.stack(out), example_norms


def cut_after_read_tokens(pairs: Sequence[PairExample], positions: Sequence[str]) -> list[PairExample]:
    """Each example cut right after the last token that single-token `positions` read.

    In a causal model no hidden state depends on later tokens, so the readings are the same and the
    tokens after them need not run (for a response-start reading, typically most of the text)."""
    if not set(positions) <= set(TOKEN_POSITIONS):
        raise InputError(f"only {', '.join(TOKEN_POSITIONS)} read a single token, got {list(positions)}")
    extra = 1 if "response_start" in positions else 0

    def cut(ex: EncodedExample) -> EncodedExample:
        return EncodedExample(ex.input_ids[: ex.prompt_len + extra], ex.prompt_len)

    return [PairExample(cut(pair.pos), cut(pair.neg)) for pair in pairs]


@dataclass
class ExtractionResult:
    """Per-position `[L+1, H]` tensors; rows that were not computed are NaN."""

    mean_diff: dict[str, torch.Tensor]
    pos_mean: dict[str, torch.Tensor]
    neg_mean: dict[str, torch.Tensor]
    pca: dict[str, torch.Tensor]
    stream_norm: torch.Tensor  # [L+1] typical response-token residual norm (`STREAM_NORM_RULE`; NaN: not computed)
    rows: list[int]
    n_pairs: int
    n_tokens: int
    diagnostics: dict[str, Any] = field(default_factory=dict)  # see personactl.core.diagnostics
    extras: dict[str, Any] = field(default_factory=dict)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc only; elsewhere a no-op).

    Batches of different widths leave freed blocks that the next batch's slightly different
    sizes cannot reuse, and glibc keeps them, so a process's RSS climbed with every batch
    (1,000 pairs peaked 1.6× higher than 100). Trimming after each batch keeps RSS at what the
    batch really uses; it costs one heap walk and re-faulting the pages the next batch touches."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def length_sorted_batches(pairs: Sequence[PairExample], batch_tokens: int) -> list[list[int]]:
    """Pair indices grouped so each batch holds whole pairs and at most ~batch_tokens padded tokens."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].max_len)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = pairs[i].max_len  # sorted ascending, so this is the batch's width
        if current and 2 * (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def extract_vectors(
    model: Any,
    layers: Any,
    pairs: Sequence[PairExample],
    *,
    pad_id: int,
    rows: Sequence[int] | None = None,
    positions: Sequence[str] = POSITIONS,
    pca: bool = True,
    batch_tokens: int = 8192,
    padding_side: str = "right",
    on_batch: Callable[[int], None] | None = None,
    stream_norm: bool = True,
    diagnostics: bool = True,
) -> ExtractionResult:
    """Mean-difference (and PCA) vectors at every requested row and position, in one streamed pass.

    `stream_norm=False` skips the response-token norms (`result.stream_norm` is then NaN). With
    it off and only single-token positions (prompt_end, response_start), each example runs only up
    to the last token read (`cut_after_read_tokens`): the same vectors from a fraction of the
    tokens; `n_tokens` counts the tokens that ran.

    Means and stream norms leave out attention sinks (`personactl.core.sinks`); stream norms are medians,
    so one outlier token cannot move them. `diagnostics` (`personactl.core.diagnostics`) come from the
    same per-pair differences at almost no cost.

    Memory does not grow with the number of pairs beyond one float per example and row: per
    (position, row) we keep fp32 sums of the positive and negative examples, the sum of the pairs'
    unit differences, and the pair differences themselves while there are fewer pairs than hidden
    units (else an evenly spaced sample of H−1 of them, plus, for PCA, their H×H scatter). On CPU
    the C heap is trimmed after each batch (`release_free_heap`), or allocator fragmentation
    would make RSS climb with the number of batches all the same."""
    n_rows = len(layers) + 1
    rows = _checked_request(pairs, positions, rows, n_rows)
    if not stream_norm and set(positions) <= set(TOKEN_POSITIONS):
        pairs = cut_after_read_tokens(pairs, positions)
    device = input_device(model)  # the batch and the sums; a block elsewhere hands its rows over (`on_row`)
    hidden_size = model_width(model)
    sums = _PairSums.allocate(len(positions), len(rows), hidden_size, len(pairs), pca, diagnostics, device)
    n_tokens = _stream_batches(
        model, layers, pairs, rows, positions, sums, pad_id, batch_tokens, padding_side, stream_norm, on_batch
    )
    result = ExtractionResult({}, {}, {}, {}, torch.full((n_rows,), float("nan")), rows, len(pairs), n_tokens)
    if stream_norm:
        result.stream_norm[rows] = sums.example_norms.nanmedian(dim=1).values.cpu()
    _fill_vectors(result, sums, positions, n_rows, pca, diagnostics)
    if diagnostics:
        result.diagnostics["warnings"] = warnings_for(result.diagnostics, model_dtype(model))
    return result


def _checked_request(
    pairs: Sequence[PairExample], positions: Sequence[str], rows: Sequence[int] | None, n_rows: int
) -> list[int]:
    """The requested rows, sorted; a clear error for an unknown position, no pairs, a row out of
    range, or an example lacking the span a position reads."""
    unknown = set(positions) - set(ALL_POSITIONS)
    if unknown:
        raise InputError(f"unknown position(s) {sorted(unknown)}", hint=f"choose from {', '.join(ALL_POSITIONS)}")
    if not pairs:
        raise InputError("no pairs to extract from", hint="generate responses first, or check the filter")
    rows = sorted(set(range(n_rows) if rows is None else rows))
    if rows[0] < 0 or rows[-1] >= n_rows:
        raise InputError(f"layer {rows[-1] if rows[-1] >= n_rows else rows[0]} out of range 0..{n_rows - 1}")
    for pair in pairs:
        for ex in (pair.pos, pair.neg):
            if ex.response_len < 1 and {"response_start", "response_avg"} & set(positions):
                raise InputError("an example has an empty response", hint="drop empty responses first")
            if ex.prompt_len < 1 and {"prompt_end", "prompt_avg"} & set(positions):
                raise InputError("an example has no prompt tokens; use response positions only")
            if ex.answer_len < 1 and set(THINKING_POSITIONS) & set(positions):
                raise InputError(
                    "an example has no answer after its thinking section",
                    hint="generate with more --max-new-tokens, or with thinking off (PERSONACTL_THINKING=off)",
                )
    return rows


@dataclass
class _BatchInFlight:
    """The batch whose forward pass is running, as the row hook needs it."""

    batch: Batch
    k: int  # pairs in the batch: examples 0..k-1 are their positives, k..2k-1 their negatives
    sides: torch.Tensor  # [2k] each example's column in `_PairSums.example_norms`
    slots: torch.Tensor  # the kept pairs' slots in `_PairSums.kept_diffs`
    keep: torch.Tensor | None  # [k] which of the batch's pairs are kept (None: all)


@dataclass
class _PairSums:
    """What extraction keeps between batches, per (position, row): fp32 sums of the positive and
    negative examples, and of the pairs' unit differences (diagnostics); the pair differences
    themselves (all, or an evenly spaced sample) or, for PCA over many pairs, their H×H scatter;
    and every example's stream norm."""

    sum_pos: torch.Tensor  # [P, R, H]
    sum_neg: torch.Tensor  # [P, R, H]
    example_norms: torch.Tensor  # [R, 2n]: positives, then negatives
    slots: torch.Tensor  # [n] each pair's slot in `kept_diffs`, -1 when it is not kept
    n_kept: int
    kept_diffs: torch.Tensor | None  # [P, R, n_kept, H]
    scatter: torch.Tensor | None  # [P, R, H, H]
    unit_sum: torch.Tensor | None  # [P, R, H]

    @classmethod
    def allocate(
        cls, n_positions: int, n_rows: int, hidden_size: int, n: int, pca: bool, diagnostics: bool, device: Any
    ) -> _PairSums:
        """Zeroed sums. PCA needs the scatter of pair differences: with fewer pairs than hidden units
        the differences themselves are smaller than their H×H scatter, and the eigh runs on the N×N
        side instead. The diagnostics count anti-steerable pairs on the kept differences."""
        P, R, H = n_positions, n_rows, hidden_size
        sum_pos = torch.zeros(P, R, H, dtype=torch.float32, device=device)
        slots = sample_slots(n, H - 1).to(device)
        n_kept = int((slots >= 0).sum())
        kept_diffs = scatter = unit_sum = None
        if diagnostics or (pca and n < H):
            kept_diffs = torch.zeros(P, R, n_kept, H, dtype=torch.float32, device=device)
        if pca and n >= H:
            scatter = torch.zeros(P, R, H, H, dtype=torch.float32, device=device)
        if diagnostics:
            unit_sum = torch.zeros(P, R, H, dtype=torch.float32, device=device)
        example_norms = torch.full((R, 2 * n), float("nan"), dtype=torch.float32, device=device)
        return cls(sum_pos, torch.zeros_like(sum_pos), example_norms, slots, n_kept, kept_diffs, scatter, unit_sum)

    def add(self, r: int, values: torch.Tensor, norms: torch.Tensor | None, current: _BatchInFlight) -> None:
        """Add one row's `[P, 2k, H]` example vectors (and `[2k]` stream norms) of the batch in flight."""
        k = current.k
        self.sum_pos[:, r] += values[:, :k].sum(1)
        self.sum_neg[:, r] += values[:, k:].sum(1)
        if norms is not None:
            self.example_norms[r, current.sides] = norms
        if self.kept_diffs is None and self.scatter is None:
            return
        diffs = values[:, :k] - values[:, k:]  # [P, k, H]
        if self.unit_sum is not None:
            self.unit_sum[:, r] += unit_rows(diffs).sum(1)
        if self.kept_diffs is not None:
            self.kept_diffs[:, r, current.slots] = diffs if current.keep is None else diffs[:, current.keep]
        if self.scatter is not None:
            self.scatter[:, r] += diffs.transpose(1, 2) @ diffs


def _stream_batches(
    model: Any,
    layers: Any,
    pairs: Sequence[PairExample],
    rows: list[int],
    positions: Sequence[str],
    sums: _PairSums,
    pad_id: int,
    batch_tokens: int,
    padding_side: str,
    stream_norm: bool,
    on_batch: Callable[[int], None] | None,
) -> int:
    """Run every length-sorted batch up to the deepest row, adding each row to `sums` as the
    forward pass reaches it; the number of tokens that ran."""
    device = sums.sum_pos.device
    row_index = {row: i for i, row in enumerate(rows)}
    current: _BatchInFlight | None = None

    def on_row(row: int, hidden: torch.Tensor) -> None:
        assert current is not None
        hidden = hidden.to(device)  # once per row: under a device map the block may run elsewhere
        values, norms = reduce_positions(hidden, current.batch, positions, norms=stream_norm)  # [P, 2k, H]
        sums.add(row_index[row], values, norms, current)

    n_tokens = 0
    with torch.inference_mode(), row_reading(model, layers, rows, on_row) as read:
        for batch_indices in length_sorted_batches(pairs, batch_tokens):
            current = _batch_in_flight(pairs, batch_indices, sums.slots, pad_id, padding_side, device)
            batch = current.batch
            read(batch)
            n_tokens += int(batch.attention_mask.sum())
            del batch
            current = None
            if device.type == "cpu":
                release_free_heap()
            if on_batch:
                on_batch(len(batch_indices))
    return n_tokens


def _batch_in_flight(
    pairs: Sequence[PairExample],
    batch_indices: list[int],
    slots: torch.Tensor,
    pad_id: int,
    padding_side: str,
    device: Any,
) -> _BatchInFlight:
    """The collated batch of these pairs (positives, then negatives) and where its rows go."""
    examples = [pairs[i].pos for i in batch_indices] + [pairs[i].neg for i in batch_indices]
    batch = collate(examples, pad_id, padding_side, device)
    index = torch.tensor(batch_indices, device=device)
    batch_slots = slots[index]
    keep = None if bool((batch_slots >= 0).all()) else batch_slots >= 0
    sides = torch.cat([index, index + len(pairs)])
    return _BatchInFlight(batch, len(batch_indices), sides, batch_slots if keep is None else batch_slots[keep], keep)


def _fill_vectors(
    result: ExtractionResult, sums: _PairSums, positions: Sequence[str], n_rows: int, pca: bool, diagnostics: bool
) -> None:
    """Means, mean differences and PCA directions per position as `[L+1, H]` (NaN where a row was
    not read), and the diagnostics of each position's pair differences."""
    rows, n = result.rows, result.n_pairs
    full = lambda t: _scatter_rows(t.cpu(), rows, n_rows)  # noqa: E731
    per_position = {}
    for p, position in enumerate(positions):
        pos_mean, neg_mean = sums.sum_pos[p] / n, sums.sum_neg[p] / n
        diff = pos_mean - neg_mean
        result.pos_mean[position] = full(pos_mean)
        result.neg_mean[position] = full(neg_mean)
        result.mean_diff[position] = full(diff)
        if pca and sums.scatter is None:
            result.pca[position] = full(principal_direction_of_rows(sums.kept_diffs[p], diff))
        elif pca:
            result.pca[position] = full(principal_direction(sums.scatter[p].cpu(), diff.cpu()))
        if diagnostics:
            midpoint = (pos_mean + neg_mean) / 2
            per_position[position] = summarize(diff, midpoint, sums.unit_sum[p], sums.kept_diffs[p], n)
    if diagnostics:
        result.diagnostics = {"rows": rows, "n_pairs": n, "anti_steerable_pairs": sums.n_kept}
        result.diagnostics["positions"] = per_position


def _scatter_rows(values: torch.Tensor, rows: list[int], n_rows: int) -> torch.Tensor:
    out = torch.full((n_rows, values.shape[-1]), float("nan"), dtype=torch.float32)
    out[rows] = values.float()
    return out
