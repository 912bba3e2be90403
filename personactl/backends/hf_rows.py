"""Mixed batches on Hugging Face transformers: rows that each have their own sampling, seed, token
budget, stop signal and steering, generated in one `generate` call.

`generate` samples a batch with one temperature and one random stream, so a row's sampled tokens
would depend on its neighbours. Here each row draws from its own seeded `torch.Generator` with its
own temperature and top-p (`RowSampler`), and hands its choice to greedy decoding as the only
finite score; greedy rows keep their scores untouched. A row's reply is thus the same whether it
runs alone or beside others (in float32; bf16 kernels may differ in the last bits across batch
shapes, see docs/commands/serve.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personactl.backends import Sampling, Steering


@dataclass
class RowRequest:
    """One row of a mixed batch: its prompt and everything it decides for itself."""

    prompt: Sequence[int]
    sampling: Sampling
    seed: int
    on_token: Callable[[int], None]
    stop: threading.Event = field(default_factory=threading.Event)
    steering: Steering | None = None
    on_done: Callable[[list[int]], None] = lambda tokens: None  # called once, as soon as the row ends


class RowSampler:
    """A logits processor that samples each row with its own temperature, top-p and generator."""

    def __init__(self, rows: Sequence[RowRequest], device: Any):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.rows = rows
        self.generators = []
        self.warpers: list[list[Any]] = []
        for row in rows:
            generator = torch.Generator(device=device)
            generator.manual_seed(row.seed)
            self.generators.append(generator)
            warpers = []
            if row.sampling.temperature > 0:
                warpers.append(TemperatureLogitsWarper(row.sampling.temperature))
                if row.sampling.top_p < 1:
                    warpers.append(TopPLogitsWarper(row.sampling.top_p))
            self.warpers.append(warpers)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        for b, row in enumerate(self.rows):
            if row.sampling.temperature == 0:
                continue  # greedy: generate's own argmax on the untouched scores
            logits = scores[b : b + 1].float()
            for warp in self.warpers[b]:
                logits = warp(input_ids[b : b + 1], logits)
            choice = torch.multinomial(logits.softmax(-1)[0], 1, generator=self.generators[b])
            out[b].fill_(float("-inf"))
            out[b, choice] = 0.0
        return out


class RowStops:
    """A stopping criterion: a row ends at its own token budget or when its `stop` is set."""

    def __init__(self, rows: Sequence[RowRequest], prompt_width: int):
        self.rows, self.width = rows, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        generated = input_ids.shape[1] - self.width
        done = [generated >= row.sampling.max_new_tokens or row.stop.is_set() for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class RowStreamer:
    """A transformers streamer that hands each row's tokens to that row, up to and including its
    end-of-turn token or its budget (what `generate` adds for a finished row is padding), and tells
    the row it is done as soon as it ends, not when the whole batch does. A row whose `stop` is set
    gets no token after that (the one in flight is dropped)."""

    def __init__(self, rows: Sequence[RowRequest], stop_ids: Sequence[int]):
        self.rows, self.stop_ids = rows, set(stop_ids)
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.finished = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # transformers hands over the prompt first
            self.prompt_seen = True
            return
        for b, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[b]:
                continue
            row = self.rows[b]
            if row.stop.is_set():
                self._done(b)
                continue
            self.tokens[b].append(int(token))
            row.on_token(int(token))
            if token in self.stop_ids or len(self.tokens[b]) >= row.sampling.max_new_tokens:
                self._done(b)

    def _done(self, b: int) -> None:
        self.finished[b] = True
        self.rows[b].on_done(self.tokens[b])

    def end(self) -> None:
        """transformers' end of generation: every row still open is done."""
        for b, finished in enumerate(self.finished):
            if not finished:
                self._done(b)
