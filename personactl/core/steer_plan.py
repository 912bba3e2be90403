"""Steering plans as users write them: one term per `--steer SPEC`, parsed into `PlanTerm`s.

The grammar is `VECTOR[@position[/aggregator]]:LAYERS:VALUE[:OP]`. A vector may itself hold `:`
(a user-persona trait such as `optimistic:user`), so a spec is read from the right: an optional
known OP last, then VALUE, then LAYERS; everything left of LAYERS is the vector. LAYERS (`12`,
`5-10`, `4,8-9`) are applied together, as one term. VALUE is α for `add`, the added-back c of c·v
for `ablate` (0 = pure projection-out), the multiple of the mean projection added back for
`mean-ablate` (1 = the mean itself), and τ for `cap`, which may also be a percentile of the vector's
own projections (`p25`) or `saved`, the thresholds stored with the vector (an imported capping
configuration), both resolved later against the vector's file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from personactl.core.choices import AGGREGATORS, PERSONAS, POSITIONS, STEER_OPS
from personactl.core.ranges import parse_ranges
from personactl.errors import InputError

_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?|100)")
_GRAMMAR = "VECTOR[@position[/aggregator]]:LAYERS:VALUE[:OP], e.g. optimistic:12:4 or evil@response_avg:10-14:p25:cap"


@dataclass(frozen=True)
class PlanTerm:
    """One term of a steering plan, as written (vector by name or file; units not yet applied)."""

    vector: str
    layers: tuple[int, ...]
    op: str = "add"
    value: float | None = None  # α, c or τ; None for `cap` when `percentile` or the saved thresholds give τ
    percentile: float | None = None  # `cap` only: τ = this percentile of the vector's own projections
    position: str | None = None  # extraction position (None: the command's default)
    aggregator: str | None = None  # aggregator (None: the command's default)

    def spec(self) -> str:
        """The term written back in the grammar it was parsed from (`parse_term(t.spec()) == t`)."""
        from personactl.core.ranges import format_ranges

        vector = self.vector
        if self.position is not None:
            vector += f"@{self.position}" + (f"/{self.aggregator}" if self.aggregator else "")
        if self.percentile is not None:
            value = f"p{self.percentile:g}"
        else:
            value = "saved" if self.value is None else f"{self.value:g}"
        return f"{vector}:{format_ranges(list(self.layers))}:{value}:{self.op}"


def split_persona(vector: str) -> tuple[str, str]:
    """`name:user` → ("name", "user"): another persona's file of a trait (`ithou` too); else "model"."""
    base, colon, suffix = vector.rpartition(":")
    if colon and base and suffix in (*PERSONAS, "ithou"):
        return base, suffix
    return vector, "model"


def parse_term(spec: str) -> PlanTerm:
    """One `--steer` spec → a `PlanTerm`; anything malformed is one InputError naming the part."""
    parts = spec.strip().split(":")
    op = "add"
    if len(parts) >= 4 and parts[-1].strip() in STEER_OPS:
        op = parts.pop().strip()
    elif len(parts) >= 4 and _looks_like_op(parts[-1]):
        raise InputError(
            f"unknown steering operation {parts[-1]!r} in --steer {spec!r}", hint=f"use {', '.join(STEER_OPS)}"
        )
    if len(parts) == 3 and parts[-1].strip() in STEER_OPS:  # VECTOR:LAYERS:OP, the value left out
        raise InputError(f"--steer {spec!r} gives no VALUE for {parts[-1].strip()}", hint=f"write {_GRAMMAR}")
    if len(parts) < 3 or not all(p.strip() for p in parts[-2:]):
        raise InputError(f"bad --steer {spec!r}", hint=f"write {_GRAMMAR}")
    value_text, layers_text = parts.pop().strip(), parts.pop().strip()
    vector, position, aggregator = vector_part(":".join(parts).strip(), spec)
    value, percentile = _value(value_text, op, spec)
    try:
        layers = tuple(parse_ranges(layers_text))
    except InputError:
        raise InputError(
            f"bad layers {layers_text!r} in --steer {spec!r}", hint="write e.g. 12, 5-10 or 4,8-9"
        ) from None
    return PlanTerm(vector, layers, op, value, percentile, position, aggregator)


def _looks_like_op(text: str) -> bool:
    """A last part that is a word, not a number or percentile: a misspelt operation."""
    text = text.strip()
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z_-]*", text)) and not _PERCENTILE.fullmatch(text) and text != "saved"


def vector_part(
    text: str, spec: str, flag: str = "--steer", grammar: str = _GRAMMAR
) -> tuple[str, str | None, str | None]:
    """`name[@position[/aggregator]]` → its three parts, each checked (errors name `flag` and `spec`)."""
    if not text:
        raise InputError(f"no vector in {flag} {spec!r}", hint=f"write {grammar}")
    vector, at, where = text.partition("@")
    if not at:
        return vector, None, None
    position, _, aggregator = where.partition("/")
    if not re.fullmatch(r"[a-z][a-z_]*", position):  # which positions exist is the vector file's to say
        raise InputError(
            f"bad position {position!r} in {flag} {spec!r}",
            hint=f"e.g. {', '.join(POSITIONS)} (user_avg: user persona)",
        )
    if aggregator and aggregator not in AGGREGATORS:
        raise InputError(f"unknown aggregator {aggregator!r} in {flag} {spec!r}", hint=f"use {', '.join(AGGREGATORS)}")
    return vector, position, aggregator or None


def _value(text: str, op: str, spec: str) -> tuple[float | None, float | None]:
    """VALUE as (number, percentile): a finite number, or for `cap` `pNN` or `saved` (both None)."""
    if text == "saved":
        if op != "cap":
            raise InputError(f"`saved` thresholds are for cap only (--steer {spec!r})", hint="give a number")
        return None, None
    match = _PERCENTILE.fullmatch(text)
    if match:
        if op != "cap":
            raise InputError(
                f"a percentile ({text}) is a threshold: only `cap` takes one (--steer {spec!r})",
                hint="give add/ablate/mean-ablate a number",
            )
        return None, float(match.group(1))
    try:
        value = float(text)
    except ValueError:
        hint = "a number; for cap also pNN (a percentile of the vector's projections) or saved"
        raise InputError(f"bad value {text!r} in --steer {spec!r}", hint=hint) from None
    if not math.isfinite(value):
        raise InputError(f"value {text!r} in --steer {spec!r} is not finite")
    return value, None
