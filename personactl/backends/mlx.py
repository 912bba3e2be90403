"""The MLX engine (`--backend mlx`): Apple silicon's array framework, through mlx-lm's models.

It generates, steers (sweeps in one batch, every steering-plan operation, every position mode),
streams chat replies, mixes serving rows and reads activations, behind the same `Engine` interface
and with the same tokenizer, stop tokens, layer convention and vector files as the other engines.

Generation is personactl's own loop over mlx-lm's model: prompts left-padded into one batch whose
padding mlx-lm's batch cache masks (positions start at each row's first token), greedy or sampled
per row (temperature, top-p, the row's own seeded key), each row ending at its own end of turn or
budget. Sampled tokens follow MLX's random numbers, so they differ from the other engines' for the
same seed; greedy decoding in float32 gives the Hugging Face engine's tokens."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from personactl.backends import Generation, Sampling, Steering, finish_generation, generation_stop_ids
from personactl.backends.mlx_model import (
    MLXRows,
    check_padded_batches,
    decoder_blocks,
    import_mlx,
    load_mlx_net,
    model_directory,
    net_dtype,
)
from personactl.backends.mlx_steering import MLXSteerer
from personactl.core.choices import POSITION_MODES, STEER_OPS
from personactl.errors import InputError
from personactl.model.steering import GridRow, Plan, run_grid

if TYPE_CHECKING:
    from personactl.backends.hf_rows import RowRequest
    from personactl.settings import Settings


@dataclass
class _Row:
    """One row of the decode loop: how it samples, its random key, its budget and listeners."""

    sampling: Sampling
    key: Any
    on_token: Callable[[int], None] = lambda token: None
    stop: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[list[int]], None] = lambda tokens: None


class MLXBackend:
    """The MLX engine (`personactl.backends.Engine`), and the model handle steps read facts from."""

    name = "mlx"
    position_modes = POSITION_MODES
    plan_ops = STEER_OPS  # every plan operation, in the wrapped blocks (`mlx_steering`)
    full_distributions = False  # kl_neutral measures with the Hugging Face model
    reads_activations = True  # `model` is a RowReader: extract, monitor and readouts read it here
    max_stream_batch = 64

    def __init__(self, net: Any, tokenizer: Any, source: Any, config: Any, fingerprint: str, stop_ids: list[int]):
        import mlx.core as mx

        self.net = net
        self.layers = decoder_blocks(net)  # the model's own list: wrapped in place while steering or reading
        self.tokenizer = tokenizer
        self.source = source
        self.config = config
        self.fingerprint = fingerprint
        self.stop_ids = stop_ids
        self.dtype = net_dtype(net)
        self.mx_dtype = getattr(mx, str(self.dtype).removeprefix("torch."))
        self.model = MLXRows(net, self.layers, self.hidden_size, self.dtype)
        self.device = MLXRows.device
        self.notes: list[str] = []
        self.active_steerer: MLXSteerer | None = None  # set while an `MLXSteerer` is entered

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def describe(self) -> dict[str, Any]:
        import mlx.core as mx

        return {
            "model": self.source.spec,
            "model_kind": self.source.kind,
            "model_fingerprint": self.fingerprint,
            "architecture": (getattr(self.config, "architectures", None) or ["unknown"])[0],
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "backend": "mlx",
            "mlx_device": str(mx.default_device()),
        }

    # --- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> list[Generation]:
        """One batched decode; the same prompts, sampling and seed give the same tokens."""
        import mlx.core as mx

        keys = mx.random.split(mx.random.key(seed), len(prompts))
        rows = [_Row(sampling, keys[b]) for b in range(len(prompts))]
        return [finish_generation(tokens, self.stop_ids, self.tokenizer) for tokens in self._decode(prompts, rows)]

    def steerer(self, directions: Mapping[int, torch.Tensor], **options: Any) -> MLXSteerer:
        """Steering for the generations made while it is entered (`Steerer`'s arguments)."""
        return MLXSteerer.build(self, directions, **options)

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
        """`personactl.model.steering.run_grid` on this engine: per-row coefficients in one batch."""
        return run_grid(
            self,
            prompts,
            rows,
            directions,
            sampling=sampling,
            seed=seed,
            batch_size=batch_size or self.max_stream_batch,
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
        """One reply, steered while it generates, handed over token by token."""
        import mlx.core as mx

        row = _Row(sampling, mx.random.key(seed), on_token, stop)
        if steering is None:
            return self._decode([prompt], [row])[0]
        options = {"coefficient": steering.alpha, "positions": steering.positions, "plan": steering.plan}
        with self.steerer(steering.directions, **options):
            return self._decode([prompt], [row])[0]

    def stream_batch(self, rows: Sequence[RowRequest]) -> list[list[int]]:
        """Every row in one batch, each with its own sampling, seed, budget, stop signal and steering."""
        import mlx.core as mx

        decode_rows = [_Row(r.sampling, mx.random.key(r.seed), r.on_token, r.stop, r.on_done) for r in rows]
        prompts = [row.prompt for row in rows]
        steered = [row.steering for row in rows]
        if all(s is None for s in steered):
            return self._decode(prompts, decode_rows)
        with MLXSteerer.per_row(self, steered):
            return self._decode(prompts, decode_rows)

    def check_positions(self, positions: str) -> None:
        if positions not in self.position_modes:
            raise InputError(f"unknown steering positions {positions!r}", hint=f"choose {', '.join(POSITION_MODES)}")

    def close(self) -> None:
        """Return MLX's cached buffers; the weights go with the engine."""
        import mlx.core as mx

        mx.clear_cache()

    # --- the decode loop -----------------------------------------------------------------------
    def _decode(self, prompts: Sequence[Sequence[int]], rows: Sequence[_Row]) -> list[list[int]]:
        """Generated tokens per row (its end-of-turn token included), each handed to `on_token` as
        it comes and the whole to `on_done` as soon as the row ends."""
        import mlx.core as mx
        from mlx_lm.models.cache import BatchKVCache

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = mx.array([[pad] * (width - len(p)) + list(p) for p in prompts])
        cache = [BatchKVCache([width - len(p) for p in prompts]) for _ in self.layers]
        tokens: list[list[int]] = [[] for _ in rows]
        open_rows = [True] * len(rows)
        logits = self._forward(ids, cache, 0)
        for step in range(max(row.sampling.max_new_tokens for row in rows)):
            choices = _sample(logits, rows)
            for b, row in enumerate(rows):
                if not open_rows[b]:
                    continue
                if row.stop.is_set():
                    open_rows[b] = False
                    row.on_done(tokens[b])
                    continue
                tokens[b].append(choices[b])
                row.on_token(choices[b])
                if choices[b] in self.stop_ids or len(tokens[b]) >= row.sampling.max_new_tokens:
                    open_rows[b] = False
                    row.on_done(tokens[b])
            if not any(open_rows):
                break
            logits = self._forward(mx.array(choices)[:, None], cache, width + step)
        for b, row in enumerate(rows):
            if open_rows[b]:
                row.on_done(tokens[b])
        return tokens

    def _forward(self, ids: Any, cache: list[Any], offset: int) -> Any:
        """Float32 logits of each row's last position, after one forward pass starting at `offset`."""
        import mlx.core as mx

        steerer = self.active_steerer
        if steerer is not None:
            steerer.at(offset, ids.shape[0])
        logits = self.net(ids, cache=cache)[:, -1, :].astype(mx.float32)
        mx.eval(logits)
        if steerer is not None and offset == 0:
            steerer.check_ran()
        return logits


def _sample(logits: Any, rows: Sequence[_Row]) -> list[int]:
    """Each row's next token: the argmax for a greedy row, else a draw from its own key after its
    temperature and top-p (the smallest set of tokens whose probability reaches top_p)."""
    import mlx.core as mx

    choices = mx.argmax(logits, axis=-1).tolist()
    for b, row in enumerate(rows):
        sampling = row.sampling
        if sampling.temperature == 0:
            continue
        scaled = logits[b] / sampling.temperature
        if sampling.top_p < 1:
            probs = mx.softmax(scaled, axis=-1)
            ordered = mx.sort(probs)[::-1]
            kept = int(mx.sum((mx.cumsum(ordered) - ordered) < sampling.top_p).item())
            scaled = mx.where(probs >= ordered[kept - 1], scaled, -float("inf"))
        row.key, draw = mx.random.split(row.key)
        choices[b] = int(mx.random.categorical(scaled, key=draw).item())
    return choices


def open_mlx_from(settings: Settings, log: Callable[[str], None] = lambda message: None) -> MLXBackend:
    """Load the model `settings` names into MLX (the `mlx` extra); settings that only the Hugging
    Face engine has are refused before anything loads."""
    for name, flag in (("device_map", "--device-map"), ("max_memory", "--max-memory")):
        if getattr(settings, name, None):
            raise InputError(f"{flag} places a transformers model; the mlx backend has none", hint="use --backend hf")
    mx = import_mlx()
    if settings.device == "cpu":
        mx.set_default_device(mx.cpu)
    elif settings.device not in ("auto", "gpu"):
        raise InputError(f"--device {settings.device} is not an MLX device", hint="use --device auto, cpu or gpu")
    elif settings.device == "gpu":
        if not mx.is_available(mx.gpu):  # MLX's Linux CPU build
            raise InputError(
                "--device gpu: this MLX build has no GPU", hint="use --device cpu (or auto: MLX's default)"
            )
        mx.set_default_device(mx.gpu)
    from transformers import AutoConfig, AutoTokenizer

    from personactl.model.loading import default_dtype, model_fingerprint, prepare_tokenizer, resolve_model
    from personactl.settings import _default_cache_dir

    source = resolve_model(settings.model)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    directory = model_directory(source, Path(settings.cache_dir or _default_cache_dir()), settings.revision, token, log)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=settings.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=settings.trust_remote_code)
    notes: list[str] = []
    prepare_tokenizer(tokenizer, notes)
    dtype = default_dtype("cpu") if settings.dtype == "auto" else settings.dtype
    log(f"loading {settings.model} into MLX ({dtype})")
    net = load_mlx_net(directory, dtype, settings.trust_remote_code)
    check_padded_batches(net)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fingerprint = model_fingerprint(source, SimpleNamespace(config=config), directory if source.kind != "hub" else None)
    stop_ids = generation_stop_ids(str(directory), config, tokenizer)
    backend = MLXBackend(net, tokenizer, source, text_config, fingerprint, stop_ids)
    backend.notes = notes
    for note in notes:
        log(f"note: {note}")
    return backend
