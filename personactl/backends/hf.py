"""Hugging Face transformers generation: batched, left-padded, reproducible for a seed; steered
grids through `personactl.model.steering`; one streamed reply at a time for the chat."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from personactl.backends import Generation, Sampling, Steering, end_of_turn_ids, finish_generation
from personactl.backends.hf_rows import RowRequest, RowSampler, RowStops, RowStreamer
from personactl.core.choices import POSITION_MODES, STEER_OPS
from personactl.errors import InputError
from personactl.model.loading import input_device
from personactl.model.steering import GridRow, Plan, Steerer, run_grid


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    return end_of_turn_ids(model.generation_config.eos_token_id, tokenizer)


@contextlib.contextmanager
def contiguous_lm_head_input(model: Any) -> Iterator[None]:
    """Make the lm_head's input contiguous while generating.

    `generate` feeds the lm_head a strided slice (`hidden[:, -1:, :]`) at prefill; for bf16 on CPU,
    torch's matmul then materialises the weight once per row (a [B, H, vocab] copy): 6 s instead of
    0.03 s for 64 rows of SmolLM2. A contiguous input takes the plain GEMM path; values are unchanged."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, left-padded: every row's next token is at column `width`."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[i, width - len(prompt) :] = 1
    return ids, mask


class _StopOnEvent:
    """A stopping criterion (transformers calls it after every token) that reads a threading.Event."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenPusher:
    """A transformers streamer that hands each generated token (not the prompt) to `on_token`."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # transformers hands over the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


class HFBackend:
    """The Hugging Face engine (`personactl.backends.Engine`) over a loaded model and tokenizer."""

    name = "hf"
    position_modes = POSITION_MODES
    plan_ops = STEER_OPS  # every steering-plan operation (`model.steering_ops`, in the Steerer's hooks)
    full_distributions = True
    reads_activations = True

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> list[Generation]:
        """One batched `generate` call. Same prompts, sampling and seed give the same tokens."""
        device = input_device(self.model)
        width = max(len(p) for p in prompts)
        ids, mask = left_padded(prompts, self.tokenizer.pad_token_id)
        torch.manual_seed(seed)
        with torch.inference_mode(), contiguous_lm_head_input(self.model):
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=self._config(sampling)
            )
        return [self._finish(row[width:].tolist()) for row in out.cpu()]

    def _config(self, sampling: Sampling) -> Any:
        """Exactly temperature + top_p (0 = greedy): no top-k and no repetition penalty from the
        model's defaults, so the sampling recorded in the responses table is the sampling that ran."""
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,
            repetition_penalty=1.0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
        )

    def steerer(self, directions: Mapping[int, torch.Tensor], **options: Any) -> Steerer:
        """A `Steerer` on this model (hooks while entered), for `run_grid`."""
        return Steerer(self.model, directions, **options)

    def run_grid(
        self,
        prompts: Sequence[Sequence[int]],
        rows: Sequence[GridRow],
        directions: Mapping[int, torch.Tensor],
        *,
        sampling: Sampling,
        seed: int,
        batch_size: int = 0,
        positions: str = "all",
        on_chunk: Any = None,
        plan: Plan | None = None,
    ) -> Iterator[tuple[GridRow, Generation]]:
        """`personactl.model.steering.run_grid` with this engine: per-row coefficients, batches of
        `batch_size`, `plan` on the rows marked `planned`."""
        return run_grid(
            self,
            prompts,
            rows,
            directions,
            sampling=sampling,
            seed=seed,
            batch_size=batch_size,
            positions=positions,
            on_chunk=on_chunk,
            plan=plan,
        )

    def stream(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        seed: int,
        on_token: Callable[[int], None],
        stop: threading.Event,
        steering: Steering | None = None,
    ) -> list[int]:
        """One reply, steered by `Steerer` (hooks only for the call), handed over token by token."""
        from transformers import StoppingCriteriaList

        device = input_device(self.model)
        ids = torch.tensor([list(prompt)], device=device)
        steerer = (
            Steerer(
                self.model,
                steering.directions,
                coefficient=steering.alpha,
                positions=steering.positions,
                plan=steering.plan,
            )
            if steering is not None
            else contextlib.nullcontext()
        )
        torch.manual_seed(seed)
        with torch.inference_mode(), contiguous_lm_head_input(self.model), steerer:
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=self._config(sampling),
                streamer=_TokenPusher(on_token),
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
            )
        return out[0, len(prompt) :].tolist()

    max_stream_batch = 64  # rows of one mixed batch (`stream_batch`)

    def stream_batch(self, rows: Sequence[RowRequest]) -> list[list[int]]:
        """Generate every row in one batched call, each with its own sampling, seed, budget, stop
        signal and steering (`Steerer.per_row`), handing tokens to each row as they come. Returns
        each row's generated tokens (its end-of-turn token included)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        device = input_device(self.model)
        width = max(len(row.prompt) for row in rows)
        ids, mask = left_padded([row.prompt for row in rows], self.tokenizer.pad_token_id)
        streamer = RowStreamer(rows, self.stop_ids)
        config = self._config(Sampling(max(row.sampling.max_new_tokens for row in rows), 0.0, 1.0))
        steered = [row.steering for row in rows]
        steerer = (
            Steerer.per_row(self.model, steered) if any(s is not None for s in steered) else contextlib.nullcontext()
        )
        with torch.inference_mode(), contiguous_lm_head_input(self.model), steerer:
            self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList([RowSampler(rows, device)]),
                stopping_criteria=StoppingCriteriaList([RowStops(rows, width)]),
                streamer=streamer,
            )
        return streamer.tokens

    def check_positions(self, positions: str) -> None:
        if positions not in self.position_modes:
            raise InputError(f"unknown steering positions {positions!r}", hint=f"choose {', '.join(POSITION_MODES)}")

    def close(self) -> None:
        """Nothing to release: the model belongs to its `LoadedModel`."""

    def _finish(self, tokens: list[int]) -> Generation:
        return finish_generation(tokens, self.stop_ids, self.tokenizer)
