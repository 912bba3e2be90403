"""`personactl export`: one position/aggregator of a vector file, at chosen rows, in another format;
or a steering plan (`--steer` terms, `plan_file`).

What lands in the file is `scale · v`, with `v` as extracted (`raw`), unit norm (`unit`) or the
layer's mean residual-stream norm (`stream`), the same norm modes as `steer`. Files with room for
metadata (GGUF's `personactl.metadata`, the JSON record) say where the vector acts (`hook_site`: the
output of decoder block l for row l) and how (`operation`: `add`, the only one these formats have)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl import __version__
from personactl.core.choices import NORM_MODES
from personactl.errors import InputError, VectorFileError
from personactl.store.vectors import HOOK_SITE, LAYER_CONVENTION, PersonaVector

if TYPE_CHECKING:
    from personactl.store.workspace import Workspace

EXPORT_FORMATS = ("gguf", "steering-vectors", "pt", "json", "plan")
SUFFIXES = {".gguf": "gguf", ".json": "json", ".safetensors": "plan"}
# the first row each format can hold, and why
MIN_ROW = {"gguf": 2, "steering-vectors": 1, "pt": 0, "json": 0, "plan": 1}
WHY_MIN_ROW = {
    "gguf": "llama.cpp has no slot for the embeddings (row 0) and rejects direction.0 (row 1)",
    "steering-vectors": "it hooks decoder blocks, so the embeddings (row 0) have no slot",
}
FILE_INDEX = {
    "gguf": lambda row: f"direction.{row - 1}",
    "steering-vectors": lambda row: f"layer_activations[{row - 1}]",
    "pt": lambda row: f"[{row}]",
    "json": lambda row: f"layer {row}",
}


def resolve_format(fmt: str | None, output: Path) -> str:
    if fmt is None:
        fmt = SUFFIXES.get(output.suffix.lower())
        if fmt is None:
            raise InputError(
                f"cannot tell the format from {output.name!r}", hint=f"pass --format ({', '.join(EXPORT_FORMATS)})"
            )
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {fmt!r}", hint=f"choose from {', '.join(EXPORT_FORMATS)}")
    if fmt == "plan" and output.suffix.lower() != ".safetensors":
        raise InputError("a plan file is a safetensors file", hint="pass -o NAME.safetensors")
    if fmt == "json" and output.suffix.lower() != ".json":
        raise InputError("the json format writes NAME.json beside NAME.pt", hint="pass -o NAME.json")
    return fmt


def export_plan(
    specs: list[str],
    *,
    workspace: Workspace,
    model_slug: str,
    fmt: str,
    output: Path,
    position: str,
    aggregator: str,
    norm: str,
) -> dict[str, Any]:
    """`export --steer`: the plan as a plan file, or (add terms only, summed per row) in another format."""
    from personactl.store.interop.plan_file import resolve_terms, summed_adds, write_plan

    entries = resolve_terms(
        specs, workspace=workspace, model_slug=model_slug, position=position, aggregator=aggregator, norm=norm
    )
    if fmt == "plan":
        return write_plan(output, entries, norm)
    rows = summed_adds(entries, fmt)
    check_rows(fmt, sorted(rows), "steer rows")
    first = entries[0]
    plan = [{"spec": e.term.spec(), "vector": str(e.source)} for e in entries]
    choice = {"position": first.position, "aggregator": first.aggregator, "norm": norm, "scale": 1.0}
    return export_vector(first.vector, source=first.source, fmt=fmt, output=output, rows=rows, plan=plan, **choice)


def usable_rows(vector: PersonaVector, position: str, aggregator: str) -> list[int]:
    """Extracted rows whose vector is finite and not zero (a zero row has no direction to export)."""
    table = vector.get(position, aggregator)
    return [r for r in vector.rows if torch.isfinite(table[r]).all() and table[r].abs().sum() > 0]


def select_rows(
    vector: PersonaVector,
    fmt: str,
    layers: list[int] | None,
    *,
    position: str,
    aggregator: str,
    norm: str,
    scale: float,
) -> dict[int, torch.Tensor]:
    """`{row: scale · v}` for the chosen rows (default: every usable row the format can hold)."""
    import math

    if norm not in NORM_MODES:
        raise InputError(f"--norm {norm!r} is not one of {', '.join(NORM_MODES)}")
    if not math.isfinite(scale):
        raise InputError(f"--scale {scale} is not finite")
    if norm == "stream" and "stream_norm" not in vector.tensors:
        raise VectorFileError(
            "this vector file has no stream norms (it was imported), so --norm stream cannot scale it",
            hint="use --norm raw or --norm unit",
        )
    vector.get(position, aggregator)  # a clear error when that tensor is missing
    first = MIN_ROW[fmt]
    if layers is None:
        layers = [r for r in usable_rows(vector, position, aggregator) if r >= first]
        if not layers:
            raise VectorFileError(f"no extracted row ≥ {first} has a direction for {aggregator}.{position}")
    check_rows(fmt, layers, "choose rows")
    return {row: vector.direction(row, position, aggregator, norm) * scale for row in layers}


def check_rows(fmt: str, rows: list[int], remedy: str) -> None:
    """Refuse rows the format has no slot for (and more than one row for json)."""
    first = MIN_ROW[fmt]
    low = [r for r in rows if r < first]
    if low:
        raise InputError(f"row {low[0]} cannot be exported as {fmt}: {WHY_MIN_ROW[fmt]}", hint=f"{remedy} ≥ {first}")
    if fmt == "json" and len(rows) != 1:
        raise InputError("the json format holds one layer", hint=f"{remedy}: a single row")


def export_vector(
    vector: PersonaVector,
    *,
    source: Path,
    fmt: str,
    output: Path,
    rows: dict[int, torch.Tensor],
    position: str,
    aggregator: str,
    norm: str,
    scale: float,
    plan: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write `rows` in `fmt` to `output` (atomically) and say what went where (`plan`: the terms
    whose add vectors were summed into `rows`)."""
    meta = vector.metadata
    provenance = {
        "model": meta.get("model"),
        "model_fingerprint": meta.get("model_fingerprint"),
        "trait": meta.get("trait"),
        "position": position,
        "aggregator": aggregator,
        "norm": norm,
        "scale": scale,
        "rows": sorted(rows),
        "layer_convention": LAYER_CONVENTION,
        "hook_site": HOOK_SITE,
        "operation": "add",
        **({"plan": plan} if plan else {}),
        "source_vector": str(source),
        "personactl_version": __version__,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    extra: dict[str, Any] = {}
    if fmt == "gguf":
        from personactl.store.interop.gguf_cv import write_control_vector

        write_control_vector(output, {row - 1: v for row, v in rows.items()}, str(meta.get("model")), provenance)
    elif fmt == "steering-vectors":
        from personactl.store.interop.torch_files import steering_vector_payload
        from personactl.store.workspace import atomic_path

        with atomic_path(output) as tmp:
            torch.save(steering_vector_payload(rows), tmp)
    elif fmt == "pt":
        from personactl.store.workspace import atomic_path

        table = torch.full((vector.num_layers + 1, vector.hidden_size), float("nan"))
        for row, v in rows.items():
            table[row] = v
        with atomic_path(output) as tmp:
            torch.save(table, tmp)
    else:
        from personactl.store.interop.json_pair import write_json_pair

        ((row, v),) = rows.items()
        fields = {**provenance, "hidden_size": vector.hidden_size, "num_layers": vector.num_layers}
        extra["tensor_file"] = str(write_json_pair(output, row, v, fields))
    return {
        "output": str(output),
        "format": fmt,
        "rows": sorted(rows),
        "file_index": {row: FILE_INDEX[fmt](row) for row in sorted(rows)},
        "norms": {row: float(v.norm()) for row, v in sorted(rows.items())},
        **{k: provenance[k] for k in ("model", "trait", "position", "aggregator", "norm", "scale")},
        "hook_site": HOOK_SITE,
        "operation": "add",
        **({"plan": plan} if plan else {}),
        **extra,
    }
