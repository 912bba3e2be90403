"""`personactl export`: a vector as llama.cpp/repeng GGUF, steering-vectors, a `[L+1, H]` .pt or JSON;
`--steer` terms as a plan file (or, add terms only, in those formats)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console

Steer = Annotated[
    Optional[list[str]],
    typer.Option(
        "--steer",
        metavar="SPEC",
        help="Export a steering plan instead of one vector: repeatable VECTOR[@position[/aggregator]]:LAYERS:VALUE[:OP] "
        "(add, ablate, cap, mean-ablate). --format plan keeps every term; gguf, steering-vectors, pt and json "
        "take add terms only, summed per layer.",
        show_default=False,
    ),
]


@guarded
def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    vector: Annotated[
        Optional[str],
        typer.Argument(help="Vector file, or a trait name extracted in the workspace for --model (not with --steer)."),
    ] = None,
    steer: Steer = None,
    fmt: Annotated[
        Optional[str],
        typer.Option(
            "--format",
            "-f",
            help="gguf (llama.cpp, repeng), steering-vectors, pt (an L+1 × hidden tensor), json, or plan "
            "(a .safetensors plan file, with --steer) (default: from the -o suffix).",
            show_default=False,
        ),
    ] = None,
    layers: o.Layers = None,
    scale: Annotated[float, typer.Option("--scale", help="Multiply the vectors by this.")] = 1.0,
    norm: o.Norm = o.NormMode.raw,
    position: o.FileVectorPosition = "response_avg",
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    json: o.Json = False,
) -> None:
    """Write a vector for another tool; row l becomes direction.{l-1} in GGUF (see docs/guides/interop.md)."""
    from personactl.core.ranges import parse_ranges
    from personactl.errors import InputError
    from personactl.model.loading import resolve_model
    from personactl.store.interop.exporting import export_plan, export_vector, resolve_format, select_rows
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

    settings = settings_from(config, workspace=workspace, model=model)
    check_request(vector, steer, layers, scale)
    fmt = resolve_format(fmt, output)
    ws, slug = Workspace(settings.workspace), resolve_model(settings.model).slug
    if steer:
        plan = {"position": position, "aggregator": aggregator.value, "norm": norm.value}
        print_exported(export_plan(list(steer), workspace=ws, model_slug=slug, fmt=fmt, output=output, **plan), json)
        return
    if fmt == "plan":
        raise InputError(
            "the plan format writes --steer terms", hint="add --steer SPEC (one per term), or pick --format"
        )
    path = ws.find_vector(vector, slug)
    loaded = PersonaVector.load(path)
    choice = {"position": position, "aggregator": aggregator.value, "norm": norm.value, "scale": scale}
    rows = select_rows(loaded, fmt, parse_ranges(layers) if layers else None, **choice)
    print_exported(export_vector(loaded, source=path, fmt=fmt, output=output, rows=rows, **choice), json)


def check_request(vector: str | None, steer: list[str] | None, layers: str | None, scale: float) -> None:
    """One vector or a plan, never both; a plan's terms carry their own layers and values."""
    from personactl.errors import InputError

    if steer and vector is not None:
        raise InputError(
            "give either a VECTOR or --steer terms, not both", hint="a plan names its vectors in each term"
        )
    if not steer and vector is None:
        raise InputError("nothing to export", hint="name a VECTOR (a file or trait), or give --steer SPEC terms")
    if steer and (layers is not None or scale != 1.0):
        raise InputError(
            "--layers and --scale do not apply to --steer: each term carries its layers and value",
            hint="write them in the terms, e.g. --steer happy:2-3:1.5",
        )


def print_exported(summary: dict[str, Any], json: bool) -> None:
    if json:
        emit_json(summary)
        return
    from rich.markup import escape

    if summary["format"] == "plan":
        terms = "; ".join(f"{t['spec']}" for t in summary["terms"])
        text = f"wrote {escape(summary['output'])} (plan, norm {summary['norm']}): {escape(terms)}"
    else:
        mapping = ", ".join(f"row {row} → {index}" for row, index in summary["file_index"].items())
        what = (
            f"add terms summed: {'; '.join(t['spec'] for t in summary['plan'])}"
            if summary.get("plan")
            else f"{summary['aggregator']}.{summary['position']}, norm {summary['norm']}, scale {summary['scale']:g}"
        )
        text = f"wrote {escape(summary['output'])} ({summary['format']}; {escape(what)}): {escape(mapping)}"
    stdout_console().print(text, soft_wrap=True)
