"""Conditions for steering as users write them: `--when VECTOR[@position[/aggregator]]:LAYER:THRESHOLD`.

A row is steered only when its prompt's projection (last prompt token, residual row LAYER, on the
unit direction of the condition vector) is above THRESHOLD. A vector may itself hold `:` (a
user-persona trait such as `optimistic:user`), so a spec is read from the right: THRESHOLD last,
then LAYER; everything left of LAYER is the vector.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from personactl.core.steer_plan import vector_part
from personactl.errors import InputError

_GRAMMAR = "VECTOR[@position[/aggregator]]:LAYER:THRESHOLD, e.g. evil:12:3.5 or evil@prompt_end:12:-0.8"


@dataclass(frozen=True)
class ConditionSpec:
    """A condition as written (the vector by name or file; the threshold in projection units)."""

    vector: str
    layer: int
    threshold: float
    position: str | None = None  # extraction position of the vector (None: the command's default)
    aggregator: str | None = None  # aggregator (None: the command's default)

    def spec(self) -> str:
        """The condition written back in its grammar (`parse_condition(c.spec()) == c`)."""
        vector = self.vector
        if self.position is not None:
            vector += f"@{self.position}" + (f"/{self.aggregator}" if self.aggregator else "")
        return f"{vector}:{self.layer}:{self.threshold!r}"


def parse_condition(spec: str) -> ConditionSpec:
    """One `--when` spec → a `ConditionSpec`; anything malformed is one InputError naming the part."""
    parts = spec.strip().split(":")
    if len(parts) < 3 or not all(p.strip() for p in parts[-2:]):
        raise InputError(f"bad --when {spec!r}", hint=f"write {_GRAMMAR}")
    threshold_text, layer_text = parts.pop().strip(), parts.pop().strip()
    vector, position, aggregator = vector_part(":".join(parts).strip(), spec, "--when", _GRAMMAR)
    if not re.fullmatch(r"\d+", layer_text):
        raise InputError(f"bad layer {layer_text!r} in --when {spec!r}", hint="one layer row, e.g. 12")
    layer = int(layer_text)
    if layer == 0:
        raise InputError(
            f"--when {spec!r} reads layer 0 (the embeddings, which see only the token itself)",
            hint="use a row l ≥ 1 (the output of decoder block l)",
        )
    try:
        threshold = float(threshold_text)
    except ValueError:
        raise InputError(
            f"bad threshold {threshold_text!r} in --when {spec!r}",
            hint="a number: a projection on the vector's unit direction (`personactl condition fit` finds one)",
        ) from None
    if not math.isfinite(threshold):
        raise InputError(f"threshold {threshold_text!r} in --when {spec!r} is not finite", hint="give a number")
    return ConditionSpec(vector, layer, threshold, position, aggregator)
