"""personactl's RPC methods in vLLM's workers, for per-request steering (`vllm_plugin`).

`SteeringWorkerExtension` is vLLM's `worker_extension_cls`: vLLM mixes it into its worker class in
every worker process, so `llm.collective_rpc("personactl_steering_put", args=...)` reaches each
rank by name. Arguments are plain data (ints, strings, bytes), so no function or pickle travels and
`VLLM_ALLOW_INSECURE_SERIALIZATION` is not needed. The frontend (`vllm.VLLMBackend`) validates
every configuration before it sends it; these methods never raise for one, they report.

Imported in vLLM's worker processes: it imports only `vllm_plugin` and torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from personactl.backends.vllm_plugin import (
    RowPlan,
    SteeringTables,
    install,
    log,
    patch_v1_runner,
    steering_state,
    v1_runner_class,
)

# One configuration as sent: [row, key, [layer, ...]], each layer [block number, delta bytes in the
# table dtype or None] or, with a plan, [block number, delta bytes or None, projections, adds]:
# projections[k] = [unit bytes (float32 [H]), bounds bytes (float32 lo, hi)] or None, adds[k] = the
# add before projection slot k + 1 (bytes in the table dtype) or None.
Entry = Sequence[Any]


class _Malformed(ValueError):
    pass


def _tensor(data: bytes, like: Any, count: int) -> Any:
    """`data` as `count` elements of `like`'s dtype (a copy); _Malformed when its size is wrong."""
    import torch

    if data is None or len(data) != count * like.element_size():
        raise _Malformed
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(like.dtype)


def _decode_layer(state: SteeringTables, layer: Sequence[Any]) -> tuple[Any, RowPlan | None]:
    """One sent layer as (delta or None, plan or None) for this rank's tables."""
    number = int(layer[0])
    table = state.tables[number]
    delta = None if layer[1] is None else _tensor(layer[1], table, table.shape[1])
    if len(layer) == 2:
        return delta, None
    slots = state.slots.get(number)
    projections, adds = layer[2], layer[3]
    if slots is None or len(projections) > len(slots.units) or len(adds) > len(slots.adds):
        raise _Malformed
    plan = RowPlan(
        [
            None if p is None else (_tensor(p[0], slots.units[0], table.shape[1]), _tensor(p[1], slots.bounds[0], 2))
            for p in projections
        ],
        [None if a is None else _tensor(a, table, table.shape[1]) for a in adds],
    )
    return delta, plan


class SteeringWorkerExtension:
    """RPC methods mixed into vLLM's worker (names prefixed, as vLLM refuses overlaps)."""

    model_runner: Any
    vllm_config: Any

    def personactl_steering_enable(self, install_hooks: bool) -> dict[str, Any]:
        """Check (and on an eager engine without the plugin, add) this rank's steering tables, and
        make sure the runner maps tokens to rows. Reports what it found; the frontend decides."""
        runner = self.model_runner
        kind = f"{type(runner).__module__}.{type(runner).__qualname__}"
        if not isinstance(runner, v1_runner_class()) or not hasattr(runner, "_prepare_inputs"):
            return {"runner": kind, "v1": False, "layers": 0, "rows": 0}
        state = steering_state(runner.get_model())
        if state is None and install_hooks:
            state = install(runner.get_model(), self.vllm_config)
        if state is not None:
            patch_v1_runner()
        return {
            "runner": kind,
            "v1": True,
            "layers": len(state.tables) if state else 0,
            "rows": state.num_rows if state else 0,
            "projections": state.projections if state else 0,
        }

    def personactl_steering_put(self, entries: Sequence[Entry]) -> int:
        """Write configurations into their table rows; returns how many were written (a malformed
        entry is skipped and logged, never raised: an exception here would reach the engine)."""
        state = steering_state(self.model_runner.get_model())
        if state is None:
            return 0
        written = 0
        for row, key, layers in entries:
            try:
                if not 0 < int(row) < state.num_rows:
                    raise _Malformed
                decoded = {
                    int(layer[0]): _decode_layer(state, layer) for layer in layers if int(layer[0]) in state.tables
                }
            except (_Malformed, TypeError, IndexError, ValueError):
                log.warning("personactl: malformed steering configuration %r skipped", key)
                continue
            deltas = {number: delta for number, (delta, _) in decoded.items() if delta is not None}
            plans = {number: plan for number, (_, plan) in decoded.items() if plan is not None}
            state.put(int(row), str(key), deltas, plans)
            written += 1
        return written
