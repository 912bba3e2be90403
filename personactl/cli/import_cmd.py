"""`personactl import`: a llama.cpp/repeng GGUF, steering-vectors, .pt or JSON vector into the workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    emit_json,
    guarded,
    load_model_from,
    log,
    open_workspace,
    settings_from,
    stdout_console,
)


@guarded
def import_vector(
    source: Annotated[Path, typer.Argument(help="A .gguf control vector, a .pt file, or a JSON + tensor pair.")],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="The model the vectors are for (built-in name, hub id, local HF dir or .gguf file)."
        ),
    ],
    name: Annotated[
        Optional[str],
        typer.Option("--name", help="Name in the workspace (default: the file stem).", show_default=False),
    ] = None,
    position: Annotated[
        Optional[str],
        typer.Option("--position", help="Position slot to store it under (default: response_avg).", show_default=False),
    ] = None,
    aggregator: Annotated[
        Optional[str],
        typer.Option(
            "--aggregator", help="Aggregator slot to store it under (default: mean_diff).", show_default=False
        ),
    ] = None,
    layer: Annotated[
        Optional[int],
        typer.Option("--layer", help="Row of a file holding one bare 1-D vector.", show_default=False),
    ] = None,
    layer_index: Annotated[
        Optional[str],
        typer.Option(
            "--layer-index",
            help="How a single-vector file numbers layers: row (hidden_states index) or block (0-based block).",
            show_default=False,
        ),
    ] = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    trust_remote_code: o.TrustRemoteCode = None,
    force: o.Force = False,
    json: o.Json = False,
) -> None:
    """Import another tool's steering vectors as a personactl vector file (steer, compare, show)."""
    from personactl.core.ranges import format_ranges
    from personactl.errors import InputError
    from personactl.steps.import_vector import import_step
    from personactl.store.interop.foreign import INDEX_KINDS

    if layer_index is not None and layer_index not in INDEX_KINDS:
        raise InputError(f"--layer-index {layer_index!r} is not one of {', '.join(INDEX_KINDS)}")
    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    ws = open_workspace(settings)
    vector, summary = import_step(
        settings=settings,
        workspace=ws,
        load=lambda: load_model_from(settings),
        source=source,
        name=name,
        position=position,
        aggregator=aggregator,
        layer=layer,
        layer_index=layer_index,
        force=force,
    )
    for warning in summary["warnings"]:
        log(f"warning: {warning}")
    if summary["skipped"]:
        log(f"skipped: {summary['artifact']} was already imported from this file; --force to redo it")
    if json:
        emit_json({**summary, "rows": vector.rows, "positions": vector.positions, "aggregators": vector.aggregators})
        return
    from rich.markup import escape

    stdout_console().print(
        f"imported {escape(str(source))} ({summary['format']}) as {escape(summary['name'])} for "
        f"{escape(settings.model)}: rows {format_ranges(vector.rows)} as "
        f"{vector.aggregators[0]}.{vector.positions[0]} → {escape(summary['artifact'])}",
        soft_wrap=True,
    )
