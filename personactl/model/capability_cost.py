"""Capability cost of steering without a judge: `kl_neutral`, the mean per-token KL divergence
(nats) of the steered next-token distribution from the unsteered one, KL(steered ‖ unsteered),
teacher-forced on a fixed set of neutral texts shipped with personactl (`data/neutral_texts.json`).

Steering that changes how a model continues a recipe, a letter or a line of code is damage, not
persona: the judge's coherence score sees that damage only through sampled replies, noisily and at
the price of a judge call; this is exact, deterministic and costs one forward per cell.

How it is computed:
- Each text is tokenized as the tokenizer encodes plain text (its BOS, when it adds one); every
  real position's next-token distribution counts once, padding never does; the mean is over all
  positions of all texts.
- Steering is added at every position (`positions="all"`), as every generated token is steered.
- Several cells share one forward: each batch row carries its own layer and α (zero at the other
  hooked layers). Every forward has the same shape (rows × the longest text), and the unsteered
  reference is a forward of that same shape, so a row's logits depend only on its own text and α:
  α = 0 gives exactly 0, whatever the batch around it.
- Blocks below the steering layer compute nothing new: the reference forward keeps every block's
  output, and a steered forward whose lowest steered layer is `l` takes blocks 1..l from there
  (same shape, same values), so a cell at a middle layer costs about half a forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch

NEUTRAL_TEXTS = "neutral_texts.json"


@cache
def neutral_texts() -> tuple[str, ...]:
    """The shipped neutral texts (a few hundred tokens in all)."""
    raw = resources.files("personactl").joinpath("data", NEUTRAL_TEXTS).read_text(encoding="utf-8")
    return tuple(json.loads(raw)["texts"])


def texts_sha256(texts: Sequence[str]) -> str:
    """Identifies the text set in eval fingerprints: other texts, other numbers."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


@dataclass(frozen=True)
class NeutralBatch:
    """The texts right-padded to one width; `mask` marks real tokens (the positions that count)."""

    input_ids: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] bool

    @property
    def n_texts(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> NeutralBatch:
    ids = [list(tokenizer(text)["input_ids"]) for text in texts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return NeutralBatch(input_ids, mask)


def kl_sum(steered_logits: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(p_steered ‖ p_unsteered), in float32, from [P, V] logits and log-probs."""
    logp = torch.log_softmax(steered_logits.float(), dim=-1)
    return (logp.exp() * (logp - reference_logprobs)).sum()


@contextlib.contextmanager
def reused_blocks(blocks: Sequence[Any], outputs: Sequence[Any]) -> Iterator[None]:
    """Blocks 0..len(outputs)-1 return their saved outputs instead of computing (their hooks still
    run); on exit each has the `forward` it had (a wrapper set on the instance, e.g. by accelerate, too)."""
    chosen = list(blocks[: len(outputs)])
    previous = [block.__dict__.get("forward") for block in chosen]
    try:
        for block, output in zip(chosen, outputs, strict=True):
            block.forward = lambda *args, _saved=output, **kwargs: _saved
        yield
    finally:
        for block, before in zip(chosen, previous, strict=True):
            if before is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = before


def _row_coefficients(cells: Sequence[tuple[int, float]], layer: int, n_texts: int) -> torch.Tensor:
    """Per-row α at `layer`: each cell's α on its block of texts where the cell is at that layer, else 0."""
    return torch.tensor([a if at == layer else 0.0 for at, a in cells]).repeat_interleave(n_texts)


class NeutralKL:
    """kl_neutral for (layer, α) cells of one model: the unsteered reference is computed once,
    then each call steers one set of directions (one per layer) over many cells.

    `rows_per_forward` bounds a forward's batch (it holds ⌊rows / #texts⌋ cells, at least one)."""

    def __init__(self, model: Any, tokenizer: Any, texts: Sequence[str] | None = None, rows_per_forward: int = 32):
        from personactl.model.loading import decoder_layers, input_device

        self.model = model
        self.blocks = decoder_layers(model)
        self.texts = tuple(texts if texts is not None else neutral_texts())
        self.batch = encode_texts(tokenizer, self.texts)
        self.cells_per_forward = max(1, rows_per_forward // self.batch.n_texts)
        self.device = input_device(model)  # where inputs go (logits may come back elsewhere: a device map)
        self._reference: torch.Tensor | None = None
        self._block_outputs: list[Any] = []

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    def _forward(self) -> torch.Tensor:
        """Logits of every text, `cells_per_forward` copies stacked: the one shape every forward has."""
        k = self.cells_per_forward
        ids = self.batch.input_ids.repeat(k, 1).to(self.device)
        mask = self.batch.mask.repeat(k, 1).long().to(self.device)
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def reference(self) -> torch.Tensor:
        """Unsteered log-probabilities at the real positions of the texts, [P, V] float32; keeps
        every block's output of that forward for `__call__` to reuse."""
        if self._reference is None:
            outputs: list[Any] = [None] * len(self.blocks)

            def keep(index: int):
                return lambda _module, _args, output: outputs.__setitem__(index, output)

            handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(self.blocks)]
            try:
                logits = self._forward()
            finally:
                for handle in handles:
                    handle.remove()
            self._block_outputs = outputs
            n = self.batch.n_texts
            self._reference = torch.log_softmax(logits[:n][self.batch.mask.to(logits.device)].float(), dim=-1)
        return self._reference

    def __call__(self, directions: Mapping[int, torch.Tensor], cells: Sequence[tuple[int, float]]) -> list[float]:
        """kl_neutral (nats per token) of each (layer, α) cell, steering with `directions[layer]`."""
        from personactl.model.steering import Steerer

        if not cells:
            return []
        reference = self.reference()
        n, k = self.batch.n_texts, self.cells_per_forward
        mask = self.batch.mask.to(reference.device)  # the logits' device, as the reference's
        layers = sorted({layer for layer, _ in cells})
        order = sorted(range(len(cells)), key=lambda i: cells[i][0])  # a forward's cells share low layers
        out: dict[int, float] = {}
        with Steerer(
            self.model, {layer: directions[layer] for layer in layers}, coefficient=0.0, decoder_layers=self.blocks
        ) as steerer:
            for start in range(0, len(order), k):
                chunk = [cells[i] for i in order[start : start + k]]
                per_row = chunk + [(chunk[0][0], 0.0)] * (k - len(chunk))  # α = 0 rows keep the shape fixed
                steerer.set_coefficients({layer: _row_coefficients(per_row, layer, n) for layer in layers})
                with reused_blocks(self.blocks, self._block_outputs[: chunk[0][0]]):
                    logits = self._forward()
                for c, index in enumerate(order[start : start + k]):
                    out[index] = float(kl_sum(logits[c * n : (c + 1) * n][mask], reference)) / self.n_tokens
        return [out[i] for i in range(len(cells))]
