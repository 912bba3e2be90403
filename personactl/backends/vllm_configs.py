"""Steering configurations as the vLLM engine's requests carry them, and which table row holds each.

A configuration is what one request adds (block number → α·v in the engine's dtype). Its key is a
hash of exactly that, and serves twice: as `SamplingParams.extra_args["personactl_steering"]`, which
the workers map to a table row (`vllm_plugin`), and as the request's prefix-cache salt, so the two can
never disagree and one configuration's prompt KV is never reused for another. A configuration that
adds nothing has no key: its requests are plain unsteered requests and share the unsteered cache.

`ConfigRows` decides which configuration sits in which of the engine's R - 1 table rows (row 0 is
the zero row), keeps rows that requests in flight use, and evicts the least recently used others.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from personactl.errors import ModelError


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def salt_for(deltas: Mapping[int, torch.Tensor]) -> str | None:
    """A key unique to a steering configuration; None when nothing is added."""
    active = {layer: d for layer, d in sorted(deltas.items()) if bool(d.ne(0).any())}
    if not active:
        return None
    h = hashlib.sha256(b"personactl-steering-v1")
    for layer, delta in active.items():
        h.update(f"{layer}:{delta.dtype}:".encode())
        h.update(_raw_bytes(delta))
    return h.hexdigest()


@dataclass(frozen=True)
class SteeringConfig:
    """One configuration: its key and what it adds (only non-zero layers)."""

    key: str
    deltas: Mapping[int, torch.Tensor]

    @staticmethod
    def of(deltas: Mapping[int, torch.Tensor]) -> SteeringConfig | None:
        key = salt_for(deltas)
        if key is None:
            return None
        return SteeringConfig(key, {layer: d for layer, d in deltas.items() if bool(d.ne(0).any())})

    def entry(self, row: int) -> list[object]:
        """The configuration as the worker extension's `personactl_steering_put` takes it."""
        return [row, self.key, [[layer, _raw_bytes(d)] for layer, d in self.deltas.items()]]


class ConfigRows:
    """Configuration key → table row, for one engine's `num_rows` rows (row 0 stays zero)."""

    def __init__(self, num_rows: int):
        self.capacity = num_rows - 1
        self._rows: collections.OrderedDict[str, int] = collections.OrderedDict()  # least recent first
        self._in_use: collections.Counter[str] = collections.Counter()

    def place(self, configs: Iterable[SteeringConfig]) -> list[list[object]]:
        """Give each configuration a row and mark it in use; returns the entries the workers must
        write (configurations not already in a row). Raises ModelError when more distinct
        configurations are in use at once than the engine has rows."""
        entries = []
        for config in {c.key: c for c in configs}.values():
            if config.key in self._rows:
                self._rows.move_to_end(config.key)
            else:
                self._rows[config.key] = self._free_row()
                entries.append(config.entry(self._rows[config.key]))
            self._in_use[config.key] += 1
        return entries

    @property
    def available(self) -> int:
        """How many more distinct configurations can be in use at once."""
        return self.capacity - len(self._in_use)

    def has_room(self, config: SteeringConfig | None) -> bool:
        """Whether `place([config])` can give it a row now (it is unsteered, in use, or a row is free)."""
        return config is None or config.key in self._in_use or self.available > 0

    def release(self, configs: Iterable[SteeringConfig]) -> None:
        for key in {c.key for c in configs}:
            self._in_use[key] -= 1
            if self._in_use[key] <= 0:
                del self._in_use[key]

    def forget(self, entries: Sequence[Sequence[object]]) -> None:
        """Drop placements whose write did not reach the workers."""
        for _row, key, _layers in entries:
            self._rows.pop(str(key), None)

    def _free_row(self) -> int:
        if len(self._rows) < self.capacity:
            return min(set(range(1, self.capacity + 1)) - set(self._rows.values()))
        for key in self._rows:
            if key not in self._in_use:
                return self._rows.pop(key)
        raise ModelError(
            f"more than {self.capacity} distinct steering configurations at once in this vLLM engine",
            hint="send fewer at once (the engine's table has one row per request it runs, max_num_seqs)",
        )
