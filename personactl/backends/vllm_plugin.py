"""Per-request steering inside stock vLLM: static tables on the decoder layers, and a per-token index
that maps every token of each forward to its request's steering configuration.

vLLM traces its model once; a forward hook added afterwards (`llm.apply_model`) is silently left out
of the compiled graph. So `register`, the `vllm.general_plugins` entry point that vLLM calls in every
process, wraps the model loader: right after an engine's weights are loaded, and only for an engine
created with `additional_config={"personactl_steering": {"v": 3, "projections": P}}`, `install`
preallocates

- one int64 index `[T]` (T = the most tokens one forward takes), shared by every layer, and
- per decoder layer of this rank a table `[R, hidden]` (R = max_num_seqs + 1) whose row 0 is zeros,
- and, for steering plans (P > 0), per layer P projection slots (a float32 unit table `[R, hidden]`
  and a float32 bounds table `[R, 2]` of lo, hi) with P - 1 more add tables between them,

and hooks each layer to add `table.index_select(0, index[:tokens])` to its output, then to run the
slots in order: projection 1, add 2, projection 2, ... (the alternating add/projection slots of
`personactl.model.steering_ops.slots`, the base table being the first add). A projection slot moves
each token's stream (the layer's `hidden + residual`) to clamp(p, lo, hi) along its unit, p the
float32 projection, with `steering_ops.change`'s arithmetic; a neutral slot (unit 0, lo -inf, hi +inf)
adds exact zeros, so a row without a plan gets exactly what an add-only engine gives it. P = 0 (an
add-only engine) installs the add-only hook and nothing else. The compiled graph (and a CUDA graph)
reads these buffers by address; only their contents change, by `copy_`; the hook has no
data-dependent branch (P is fixed when the engine starts).

Before each forward, vLLM's V1 model runner builds the flattened batch in `_prepare_inputs` (the CPU
runner inherits it); `patch_v1_runner` wraps that method so that, after it returns, each token's
index entry is its request's table row: the request carries a configuration key in
`SamplingParams.extra_args["personactl_steering"]`, which `SteeringTables.rows` maps to a row. Rows
are written beforehand through the worker extension (`vllm_worker`). No key, an unknown key, padding
and the start-up's dummy runs all read row 0: nothing is added. Nothing here raises for a request.

The flag is part of vLLM's compile-cache key, so a graph compiled without the hooks (or with an
older hook) is never reused for an engine that needs these. Engines without the flag are untouched.

This module is imported in vLLM's worker processes and must not import personactl's heavy modules.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

FLAG = "personactl_steering"  # the additional_config key that asks for steering tables
FLAG_VERSION = 3  # bump when the hook's arithmetic changes (the flag keys vLLM's compile cache)
KEY = "personactl_steering"  # the SamplingParams.extra_args key naming a request's configuration
TABLE = "personactl_steering_table"  # the `[R, hidden]` buffer on each decoder layer
INDEX = "personactl_steering_index"  # the shared `[T]` token → row buffer, also on each layer
UNIT = "personactl_steering_unit"  # + slot number: a projection slot's `[R, hidden]` float32 unit table
BOUNDS = "personactl_steering_bounds"  # + slot number: a projection slot's `[R, 2]` float32 (lo, hi)
ADD = "personactl_steering_add"  # + slot number: the add table before projection slot k (k >= 1)
STATE = "personactl_steering_state"  # the model attribute holding the `SteeringTables`
DEFAULT_PROJECTIONS = 2  # projection slots per layer of a plan engine (see `flag_value`)

log = logging.getLogger("personactl.vllm")


def flag_value(projections: int = DEFAULT_PROJECTIONS) -> dict[str, int]:
    """What personactl puts under `additional_config[FLAG]` when it opens a steering engine:
    `projections` slots per layer for steering plans (0: add-only)."""
    return {"v": FLAG_VERSION, "projections": int(projections)}


def projection_slots(vllm_config: Any) -> int:
    """How many projection slots per layer the engine's flag asks for (0 for an add-only flag)."""
    extra = getattr(vllm_config, "additional_config", None)
    flag = extra.get(FLAG) if isinstance(extra, Mapping) else None
    return max(0, int(flag.get("projections", 0))) if isinstance(flag, Mapping) else 0


def register() -> None:
    """vLLM plugin entry point: wrap the model loader once per process."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, "_personactl_wrapped", False):
        return

    @functools.wraps(original)
    def load_model(self: Any, vllm_config: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
        model = original(self, vllm_config, model_config, *args, **kwargs)
        # the engine's own model only (a speculative-decoding drafter has its own model_config)
        if wants_steering(vllm_config) and model_config is vllm_config.model_config:
            install(model, vllm_config)
            patch_v1_runner()
        return model

    load_model._personactl_wrapped = True  # type: ignore[attr-defined]
    BaseModelLoader.load_model = load_model


def wants_steering(vllm_config: Any) -> bool:
    extra = getattr(vllm_config, "additional_config", None)
    return isinstance(extra, Mapping) and bool(extra.get(FLAG))


def text_config(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def decoder_layers(model: Any, num_layers: int) -> Any:
    """The decoder blocks: `model.model.layers` for most vLLM models, else the first block list of
    the configured length (multimodal wrappers nest the language model one level deeper)."""
    import torch.nn as nn

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
        return layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise RuntimeError(f"personactl: cannot find the {num_layers} decoder layers of {type(model).__name__}")


def _own_layers(layers: Any) -> dict[int, Any]:
    """Decoder block number (1-based, personactl's layer convention) → block, for the blocks this
    rank runs (pipeline parallelism leaves the others as `PPMissingLayer` placeholders)."""
    try:
        from vllm.model_executor.models.utils import PPMissingLayer
    except ImportError:  # pragma: no cover - every vLLM 0.32 has it
        PPMissingLayer = ()  # noqa: N806
    return {number: layer for number, layer in enumerate(layers, start=1) if not isinstance(layer, PPMissingLayer)}


def _add_steering(module: Any, _args: Any, output: Any) -> Any:
    """Add each token's row of the layer's table to the layer's output. vLLM decoder layers return
    `(hidden, residual)` over the flattened tokens of the batch, and the residual stream is their
    sum, so adding to `hidden` adds to the stream. Pure tensor ops on static buffers: traced once."""
    hidden = output[0] if isinstance(output, tuple) else output
    added = hidden + getattr(module, TABLE).index_select(0, getattr(module, INDEX)[: hidden.shape[0]])
    return (added, *output[1:]) if isinstance(output, tuple) else added


def _plan_hook(projections: int) -> Any:
    """The hook of a plan engine: the base table's add (as `_add_steering`), then `projections`
    projection slots with an add table before each but the first. `projections` is fixed per engine,
    so the loop unrolls when traced; neutral slots add exact zeros."""

    def hook(module: Any, _args: Any, output: Any) -> Any:
        import torch

        hidden = output[0] if isinstance(output, tuple) else output
        residual = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        index = getattr(module, INDEX)[: hidden.shape[0]]
        hidden = hidden + getattr(module, TABLE).index_select(0, index)
        for k in range(projections):
            if k:
                hidden = hidden + getattr(module, f"{ADD}{k}").index_select(0, index)
            stream = hidden if residual is None else hidden + residual
            unit = getattr(module, f"{UNIT}{k}").index_select(0, index)  # [T, H] float32
            bounds = getattr(module, f"{BOUNDS}{k}").index_select(0, index)  # [T, 2] float32
            projection = (stream.float() * unit).sum(-1)  # as `steering_ops.change`
            target = torch.maximum(torch.minimum(projection, bounds[:, 1]), bounds[:, 0])
            hidden = hidden + ((target - projection)[..., None] * unit).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


class LayerSlots:
    """One layer's buffers of a plan engine: the add tables before projection slots 1.. and the
    projection slots' unit and bounds tables (every list empty on an add-only engine)."""

    def __init__(self, adds: list[torch.Tensor], units: list[torch.Tensor], bounds: list[torch.Tensor]):
        self.adds, self.units, self.bounds = adds, units, bounds

    def neutral(self, row: int) -> None:
        for table in (*self.adds, *self.units):
            table[row].zero_()
        for table in self.bounds:
            table[row, 0] = -float("inf")
            table[row, 1] = float("inf")


class RowPlan:
    """What one configuration puts in one layer's slots beyond its base add: `projections[k]` =
    (unit [H] float32, bounds [2] float32) or None (neutral), `adds[k]` the add before projection
    slot k + 1 or None (zeros)."""

    def __init__(self, projections: Sequence[Any] = (), adds: Sequence[Any] = ()):
        self.projections, self.adds = list(projections), list(adds)


class SteeringTables:
    """One engine rank's steering state: the token index, the per-layer tables and which
    configuration key sits in which row. Lives in the worker process."""

    def __init__(
        self, index: torch.Tensor, tables: dict[int, torch.Tensor], slots: dict[int, LayerSlots] | None = None
    ):
        self.index = index  # [T] int64: each token's row (0 = nothing added)
        self.tables = tables  # block number → [R, hidden], row 0 all zeros
        self.slots = slots or {}  # block number → its plan slots (a plan engine only)
        self.rows: dict[str, int] = {}  # configuration key → row
        self.dirty = 0  # index[:dirty] may hold non-zero rows; index[dirty:] is zero
        self.unknown_warned: set[str] = set()

    @property
    def num_rows(self) -> int:
        return max((table.shape[0] for table in self.tables.values()), default=0)

    @property
    def projections(self) -> int:
        """Projection slots per layer (0: an add-only engine)."""
        return min((len(s.units) for s in self.slots.values()), default=0)

    def put(
        self, row: int, key: str, deltas: Mapping[int, torch.Tensor], plans: Mapping[int, RowPlan] | None = None
    ) -> None:
        """Write one configuration into `row` (every own layer: its delta, or zeros; its plan slots,
        or neutral ones) and name it `key`."""
        for old in [k for k, r in self.rows.items() if r == row]:
            del self.rows[old]
        for number, table in self.tables.items():
            delta = deltas.get(number)
            if delta is None:
                table[row].zero_()
            else:
                table[row].copy_(delta.to(device=table.device, dtype=table.dtype))
            layer_slots = self.slots.get(number)
            if layer_slots is not None:
                _put_plan(layer_slots, row, (plans or {}).get(number))
        self.rows[key] = row

    def row_of(self, key: Any) -> int:
        """The row of a request's configuration key; 0 (nothing added) for no key or an unknown one."""
        if key is None:
            return 0
        row = self.rows.get(key) if isinstance(key, str) else None
        if row is None:
            if key not in self.unknown_warned and len(self.unknown_warned) < 100:
                self.unknown_warned.add(str(key))
                log.warning("personactl: unknown steering configuration %r: request runs unsteered", key)
            return 0
        return row

    def map_tokens(self, keys: Sequence[Any], num_scheduled_tokens: np.ndarray) -> None:
        """Point each token of the flattened batch (request `i` owns `num_scheduled_tokens[i]`
        consecutive tokens) at its request's row; keep every entry past the batch at 0."""
        import numpy as np

        rows = np.fromiter((self.row_of(key) for key in keys), dtype=np.int64, count=len(keys))
        n = int(num_scheduled_tokens.sum())
        if not rows.any():
            n = 0
        else:
            _copy_to(self.index[:n], np.repeat(rows, num_scheduled_tokens))
        if self.dirty > n:
            self.index[n : self.dirty].zero_()
        self.dirty = n


def _put_plan(layer_slots: LayerSlots, row: int, plan: RowPlan | None) -> None:
    layer_slots.neutral(row)
    if plan is None:
        return
    for table, add in zip(layer_slots.adds, plan.adds, strict=False):
        if add is not None:
            table[row].copy_(add.to(device=table.device, dtype=table.dtype))
    for units, bounds, projection in zip(layer_slots.units, layer_slots.bounds, plan.projections, strict=False):
        if projection is not None:
            units[row].copy_(projection[0].to(device=units.device, dtype=units.dtype))
            bounds[row].copy_(projection[1].to(device=bounds.device, dtype=bounds.dtype))


def _copy_to(out: torch.Tensor, values: np.ndarray) -> None:
    """Host → `out` (CPU or accelerator), without waiting for the device: staged through fresh pinned
    memory, copied on the current stream, so it lands after the previous forward and before the next."""
    import torch

    source = torch.from_numpy(values)
    if out.device.type == "cpu":
        out.copy_(source)
    else:
        out.copy_(source.pin_memory(), non_blocking=True)


def table_sizes(vllm_config: Any) -> tuple[int, int]:
    """(T, R): the most tokens one forward takes, and the table rows (one per request a step can hold,
    plus the zero row)."""
    scheduler = vllm_config.scheduler_config
    capture = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
    return max(int(scheduler.max_num_batched_tokens), int(capture)), int(scheduler.max_num_seqs) + 1


def install(model: Any, vllm_config: Any) -> SteeringTables:
    """Give every decoder layer of this rank its zero table, the shared index and the hook that adds
    them. Idempotent. Called by the loader wrapper (before compilation) or, on an eager engine without
    the plugin, through the worker extension (hooks added late act only without compilation)."""
    import torch

    existing = steering_state(model)
    if existing is not None:
        return existing
    config = text_config(vllm_config.model_config.hf_config)
    param = next(p for p in model.parameters() if p.is_floating_point())  # not a quantized weight
    dtype, device = vllm_config.model_config.dtype, param.device
    num_tokens, num_rows = table_sizes(vllm_config)
    projections = projection_slots(vllm_config)
    index = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    tables, slots = {}, {}
    for number, layer in _own_layers(decoder_layers(model, config.num_hidden_layers)).items():
        tables[number] = torch.zeros(num_rows, config.hidden_size, dtype=dtype, device=device)
        layer.register_buffer(TABLE, tables[number], persistent=False)
        layer.register_buffer(INDEX, index, persistent=False)
        if projections:
            slots[number] = _install_slots(layer, projections, num_rows, config.hidden_size, dtype, device)
        layer.register_forward_hook(_plan_hook(projections) if projections else _add_steering)
    state = SteeringTables(index, tables, slots)
    object.__setattr__(model, STATE, state)  # a plain attribute, not a submodule
    return state


def _install_slots(layer: Any, projections: int, rows: int, hidden: int, dtype: Any, device: Any) -> LayerSlots:
    """One layer's plan slots, every row neutral, registered as buffers the plan hook reads."""
    import torch

    adds = [torch.zeros(rows, hidden, dtype=dtype, device=device) for _ in range(projections - 1)]
    units = [torch.zeros(rows, hidden, dtype=torch.float32, device=device) for _ in range(projections)]
    bounds = [torch.zeros(rows, 2, dtype=torch.float32, device=device) for _ in range(projections)]
    for k, table in enumerate(adds, start=1):
        layer.register_buffer(f"{ADD}{k}", table, persistent=False)
    for k, (unit, bound) in enumerate(zip(units, bounds, strict=True)):
        layer.register_buffer(f"{UNIT}{k}", unit, persistent=False)
        layer.register_buffer(f"{BOUNDS}{k}", bound, persistent=False)
    for bound in bounds:
        bound[:, 0], bound[:, 1] = -float("inf"), float("inf")
    return LayerSlots(adds, units, bounds)


def steering_state(model: Any) -> SteeringTables | None:
    """The tables `install` put on `model` (or on a module inside a wrapper), if any."""
    state = getattr(model, STATE, None)
    if state is None and hasattr(model, "modules"):
        state = next((getattr(m, STATE) for m in model.modules() if hasattr(m, STATE)), None)
    return state


def _runner_state(runner: Any) -> SteeringTables | None:
    """The runner's tables, looked up once found (None for engines that do not steer)."""
    state = runner.__dict__.get("_personactl_tables")
    if state is not None:
        return state
    if not wants_steering(getattr(runner, "vllm_config", None)):
        return None
    state = steering_state(runner.get_model()) if hasattr(runner, "model") else None
    if state is not None:
        runner.__dict__["_personactl_tables"] = state
    return state


def _request_keys(runner: Any) -> list[Any]:
    """Each batch row's configuration key, in the order `_prepare_inputs` flattens the batch."""
    batch = runner.input_batch
    keys = []
    for req_id in batch.req_ids[: batch.num_reqs]:
        params = runner.requests[req_id].sampling_params
        extra = getattr(params, "extra_args", None)
        keys.append(extra.get(KEY) if isinstance(extra, Mapping) else None)
    return keys


def v1_runner_class() -> Any:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def patch_v1_runner() -> None:
    """Wrap the V1 model runner's `_prepare_inputs` (once per process) so each forward's token index
    follows its batch. Any failure here only leaves the batch unsteered; it never fails a step."""
    runner_class = v1_runner_class()
    original = runner_class._prepare_inputs
    if getattr(original, "_personactl_wrapped", False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = _runner_state(self)
        if state is not None:
            try:
                state.map_tokens(_request_keys(self), num_scheduled_tokens)
            except Exception:  # never fail the engine for steering: this forward runs unsteered
                log.exception("personactl: steering index not updated; this step runs unsteered")
                state.index.zero_()
                state.dirty = 0
        return result

    _prepare_inputs._personactl_wrapped = True  # type: ignore[attr-defined]
    runner_class._prepare_inputs = _prepare_inputs
