"""Generation engines behind one interface, `Engine`: Hugging Face transformers (`hf.HFBackend`),
vLLM (`vllm.VLLMBackend`) and MLX (`mlx.MLXBackend`) all generate, steer a grid (`run_grid`),
stream one reply and close. `open_model` loads the model handle the `backend` setting names and
`open_engine` gives its engine; nobody outside this package asks which engine it holds: callers
ask capabilities (`position_modes`, `full_distributions`), and an engine refuses what it cannot do
with a project error. This module also holds what they share: `Sampling`, `Generation`,
`Steering`, the end-of-turn tokens and `finish_generation`.

May import: model, store, core, and the top-level errors and settings (layers: pyproject.toml, [tool.importlinter]).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from personactl.model.loading import ModelHandle
    from personactl.settings import Settings


def end_of_turn_ids(eos_token_id: int | list[int] | None, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the generation config's eos id(s), plus the tokenizer's eos."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generation_stop_ids(directory_or_id: str, config: Any, tokenizer: Any, **kwargs: Any) -> list[int]:
    """The stop tokens of a model read from its files (engines that do not load it with
    transformers): its generation config's eos ids plus the tokenizer's eos, as `end_of_turn_ids`."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(directory_or_id, **kwargs).eos_token_id
    except OSError:  # no generation_config.json
        ids = getattr(config, "eos_token_id", None)
    return end_of_turn_ids(ids, tokenizer)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens, end-of-turn token excluded
    text: str
    finish_reason: str  # "stop" (end of turn) or "length"


@dataclass(frozen=True)
class Steering:
    """What one generation adds: α · direction at each layer, at the positions of `positions`, then
    the terms of a steering plan (`plan`: layer → `personactl.model.steering_ops` terms, in order)."""

    directions: Mapping[int, torch.Tensor]
    alpha: float
    positions: str
    plan: Mapping[int, Sequence[Any]] | None = None


@runtime_checkable
class Engine(Protocol):
    """What callers outside `backends/` use of a generation engine."""

    name: str  # "hf" or "vllm": recorded in artifacts, never branched on outside backends/
    tokenizer: Any
    stop_ids: list[int]
    position_modes: tuple[str, ...]  # the steering position modes it can apply
    full_distributions: bool  # whether it gives full next-token distributions (kl_neutral needs them)
    reads_activations: bool  # whether this process can read its residual stream (readout, proxy)
    max_stream_batch: int  # how many rows `stream_batch` mixes in one batch (1: one at a time)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> list[Generation]:
        """One batched call; the same prompts, sampling and seed give the same tokens."""
        ...

    def run_grid(
        self,
        prompts: Sequence[Sequence[int]],
        rows: Sequence[Any],
        directions: Mapping[int, torch.Tensor],
        *,
        sampling: Sampling,
        seed: int,
        batch_size: int = 0,
        positions: str = "all",
        on_chunk: Any = None,
    ) -> Iterator[tuple[Any, Generation]]:
        """Every steering grid row (`personactl.model.steering.GridRow`) with its generation, in order."""
        ...

    def stream(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        seed: int,
        on_token: Callable[[int], None],
        stop: threading.Event,
        steering: Steering | None = None,
    ) -> list[int]:
        """Generate one reply with `steering` (None: unsteered), calling `on_token(id)` as each token
        is produced; `stop` ends it early. Returns every generated token (end of turn included)."""
        ...

    def stream_batch(self, rows: Sequence[Any]) -> list[list[int]]:
        """Generate `backends.hf_rows.RowRequest` rows, each with its own prompt, sampling, seed,
        budget, stop signal and steering; tokens reach each row's `on_token` as they come and
        `on_done` as soon as it ends. Returns each row's generated tokens (end of turn included)."""
        ...

    def check_positions(self, positions: str) -> None:
        """Refuse (InputError) a steering position mode this engine cannot apply."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory now."""
        ...


def engine_class(backend: str) -> type:
    """The engine class the `backend` setting names (vllm itself is not imported)."""
    if backend == "vllm":
        from personactl.backends.vllm import VLLMBackend

        return VLLMBackend
    if backend == "mlx":
        from personactl.backends.mlx import MLXBackend

        return MLXBackend
    from personactl.backends.hf import HFBackend

    return HFBackend


def require_activations(backend: str, message: str, hint: str | None = None) -> None:
    """Refuse, before any engine starts, work that reads activations in this process on an engine
    that has none here (vLLM's run inside its worker processes)."""
    if not engine_class(backend).reads_activations:
        from personactl.errors import InputError

        raise InputError(message, hint=hint)


def check_plan_ops(engine: Engine, ops: set[str]) -> None:
    """Refuse a steering plan whose operations this engine does not apply (`plan_ops`)."""
    missing = sorted(ops - set(getattr(engine, "plan_ops", ())))
    if missing:
        from personactl.errors import InputError

        raise InputError(
            f"this {engine.name} engine does not apply steering plans with {', '.join(missing)}",
            hint="use --backend hf, or on vllm an engine with plan slots (setting vllm_plan_projections ≥ 1)",
        )


def _quiet(message: str) -> None:
    pass


def open_model(
    settings: Settings,
    *,
    steering: bool = False,
    positions: str = "all",
    log: Callable[[str], None] = _quiet,
    status: Callable[[str], Any] | None = None,
) -> Any:
    """The model handle the `backend` setting names: a Hugging Face `LoadedModel`, or a started vLLM
    or MLX engine (`VLLMBackend`, `MLXBackend`: each carries the tokenizer and model facts itself). For vLLM,
    `positions` is checked before minutes of engine start-up, and `steering` asks for the buffers;
    `status(text)`, a context manager, shows while a Hugging Face model loads."""
    if settings.backend == "vllm":
        from personactl.backends.vllm import check_positions, open_vllm_from

        check_positions(positions)
        return open_vllm_from(settings, steering=steering, log=log)
    if settings.backend == "mlx":
        from personactl.backends.mlx import open_mlx_from

        return open_mlx_from(settings, log=log)
    import contextlib

    from personactl.model.loading import load_model

    with status(f"loading {settings.model} …") if status else contextlib.nullcontext():
        return load_model(
            settings.model,
            dtype=settings.dtype,
            device=settings.device,
            device_map=settings.device_map,
            max_memory=settings.max_memory,
            revision=settings.revision,
            trust_remote_code=settings.trust_remote_code,
            cache_dir=settings.cache_dir,
            token=settings.hf_token.get_secret_value() if settings.hf_token else None,
            log=log,
        )


def engine_for(lm: ModelHandle) -> Engine:
    """The engine of a loaded model handle: a vLLM engine is its own, a Hugging Face model gets one."""
    if isinstance(lm, Engine):
        return lm
    from personactl.backends.hf import HFBackend

    return HFBackend(lm.model, lm.tokenizer)


def open_engine(settings: Settings, lm: ModelHandle = None, **options: Any) -> Engine:
    """The engine for `lm` (a model handle from `open_model`), or for the model `settings` names
    (loaded with `options`, see `open_model`)."""
    return engine_for(lm if lm is not None else open_model(settings, **options))


def finish_generation(tokens: list[int], stop_ids: list[int], tokenizer: Any) -> Generation:
    """Generated tokens cut at the first end-of-turn token ("stop"), else kept whole ("length")."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            kept = tokens[:i]
            return Generation(kept, tokenizer.decode(kept, skip_special_tokens=True), "stop")
    return Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), "length")
