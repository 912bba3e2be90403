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

from personactl.backends.vllm_plugin import install, log, patch_v1_runner, steering_state, v1_runner_class

# One configuration as sent: [row, key, [[block number, delta bytes in the table dtype], ...]]
Entry = Sequence[Any]


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
        }

    def personactl_steering_put(self, entries: Sequence[Entry]) -> int:
        """Write configurations into their table rows; returns how many were written (a malformed
        entry is skipped and logged, never raised: an exception here would reach the engine)."""
        import torch

        state = steering_state(self.model_runner.get_model())
        if state is None:
            return 0
        written = 0
        for row, key, layers in entries:
            deltas = {}
            for number, data in layers:
                table = state.tables.get(int(number))
                if table is None:
                    continue  # a layer of another pipeline rank
                if len(data) != table.shape[1] * table.element_size() or not 0 < row < table.shape[0]:
                    log.warning("personactl: malformed steering configuration %r skipped", key)
                    break
                deltas[int(number)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(table.dtype)
            else:
                state.put(int(row), str(key), deltas)
                written += 1
        return written
