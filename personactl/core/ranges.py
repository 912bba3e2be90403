"""Integer range lists as users type them: `10,12,14-16` <-> [10, 12, 14, 15, 16]."""

from __future__ import annotations

from personactl.errors import InputError


def parse_ranges(text: str) -> list[int]:
    values: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                values.update(range(lo_i, hi_i + 1))
            else:
                values.add(int(part))
        except ValueError:
            raise InputError(f"bad layer list {text!r} at {part!r}", hint="write e.g. 10,12,14-16") from None
    if not values:
        raise InputError(f"empty layer list {text!r}", hint="write e.g. 10,12,14-16")
    return sorted(values)


def format_ranges(values: list[int]) -> str:
    out, start = [], None
    values = sorted(values)
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def check_in_range(values: list[int], num_layers: int) -> list[int]:
    bad = [v for v in values if v < 0 or v > num_layers]
    if bad:
        raise InputError(
            f"layer {bad[0]} out of range: this model has rows 0..{num_layers}",
            hint=f"row 0 = embeddings, row l = output of block l (1..{num_layers})",
        )
    return values


def parse_floats(text: str, what: str = "coefficient list") -> list[float]:
    """`-2,-1,0,1.5` -> [-2.0, -1.0, 0.0, 1.5]; finite numbers only, order kept, duplicates dropped."""
    import math

    values: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"bad {what} {text!r} at {part!r}", hint="write e.g. --coefficients=-2,-1,0,1,2") from None
        if not math.isfinite(value):
            raise InputError(f"bad {what} {text!r}: {part!r} is not finite")
        if value not in values:
            values.append(value)
    return values


def check_steering_layers(values: list[int], num_layers: int) -> list[int]:
    """Layers a steering term may act on: 1..L (row 0 is the embeddings, which no block outputs)."""
    check_in_range(values, num_layers)
    if 0 in values:
        raise InputError("layer 0 is the embeddings, not a steering target", hint=f"steer at layers 1..{num_layers}")
    return values
