"""`personactl export`: a vector as llama.cpp/repeng GGUF, steering-vectors, a `[L+1, H]` .pt or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console


@guarded
def export(
    vector: Annotated[str, typer.Argument(help="Vector file, or a trait name extracted in the workspace for --model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    fmt: Annotated[
        Optional[str],
        typer.Option(
            "--format",
            "-f",
            help="gguf (llama.cpp, repeng), steering-vectors, pt (an L+1 × hidden tensor) or json (default: from the -o suffix).",
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
    from personactl.model.loading import resolve_model
    from personactl.store.interop.exporting import export_vector, resolve_format, select_rows
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

    settings = settings_from(config, workspace=workspace, model=model)
    fmt = resolve_format(fmt, output)
    path = Workspace(settings.workspace).find_vector(vector, resolve_model(settings.model).slug)
    loaded = PersonaVector.load(path)
    choice = {"position": position, "aggregator": aggregator.value, "norm": norm.value, "scale": scale}
    rows = select_rows(loaded, fmt, parse_ranges(layers) if layers else None, **choice)
    summary = export_vector(loaded, source=path, fmt=fmt, output=output, rows=rows, **choice)
    if json:
        emit_json(summary)
        return
    from rich.markup import escape

    mapping = ", ".join(f"row {row} → {index}" for row, index in summary["file_index"].items())
    stdout_console().print(
        f"wrote {escape(summary['output'])} ({fmt}; {aggregator.value}.{position}, norm {norm.value}, scale {scale:g}): "
        f"{escape(mapping)}",
        soft_wrap=True,
    )
