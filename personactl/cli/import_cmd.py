"""`personactl import`: a llama.cpp/repeng GGUF, steering-vectors, assistant-axis, .pt or JSON vector into
the workspace."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    emit_json,
    guarded,
    load_reader_from,
    log,
    open_workspace,
    settings_from,
    stdout_console,
)

if TYPE_CHECKING:
    from personactl.store.vectors import PersonaVector


Source = Annotated[
    Path,
    typer.Argument(
        help="A .gguf control vector, a .pt file (steering-vectors, a tensor, an assistant-axis axis or capping "
        "config), or a JSON + tensor pair."
    ),
]
ForModel = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="The model the vectors are for (built-in name, hub id, local HF dir or .gguf file)."
    ),
]
Name = Annotated[
    Optional[str], typer.Option("--name", help="Name in the workspace (default: the file stem).", show_default=False)
]
PositionSlot = Annotated[
    Optional[o.PositionChoice],
    typer.Option(
        "--position",
        metavar="POSITION",
        help="Position slot to store it under: prompt_end, response_start, response_avg, prompt_avg "
        "(default: response_avg).",
        show_default=False,
    ),
]
AggregatorSlot = Annotated[
    Optional[o.AggregatorChoice],
    typer.Option("--aggregator", help="Aggregator slot to store it under (default: mean_diff).", show_default=False),
]
Layer = Annotated[
    Optional[int], typer.Option("--layer", help="Row of a file holding one bare 1-D vector.", show_default=False)
]
LayerIndex = Annotated[
    Optional[o.IndexKindChoice],
    typer.Option(
        "--layer-index",
        help="How a single-vector file numbers layers: row (hidden_states index) or block (0-based block).",
        show_default=False,
    ),
]

Experiment = Annotated[
    Optional[str],
    typer.Option(
        "--experiment",
        help="An assistant-axis capping config's experiment to import (its capped vectors and thresholds τ); "
        "needed when the config holds more than one.",
        show_default=False,
    ),
]


@guarded
def import_vector(
    source: Source,
    model: ForModel,
    name: Name = None,
    position: PositionSlot = None,
    aggregator: AggregatorSlot = None,
    layer: Layer = None,
    layer_index: LayerIndex = None,
    experiment: Experiment = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    trust_remote_code: o.TrustRemoteCode = None,
    force: o.Force = False,
    json: o.Json = False,
) -> None:
    """Import another tool's steering vectors as a personactl vector file (steer, compare, show)."""
    from personactl.steps.import_vector import import_step

    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        revision=revision,
        dtype=dtype,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        trust_remote_code=trust_remote_code,
    )
    ws = open_workspace(settings)
    vector, summary = import_step(
        settings=settings,
        workspace=ws,
        load=lambda: load_reader_from(settings),
        source=source,
        name=name,
        position=o.plain(position),
        aggregator=o.plain(aggregator),
        layer=layer,
        layer_index=o.plain(layer_index),
        force=force,
        experiment=experiment,
    )
    for warning in summary["warnings"]:
        log(f"warning: {warning}")
    if summary["skipped"]:
        log(f"skipped: {summary['artifact']} was already imported from this file; --force to redo it")
    print_imported(source, settings.model, vector, summary, json)


def print_imported(source: Path, model: str, vector: PersonaVector, summary: dict[str, Any], json: bool) -> None:
    from rich.markup import escape

    from personactl.core.ranges import format_ranges

    if json:
        emit_json({**summary, "rows": vector.rows, "positions": vector.positions, "aggregators": vector.aggregators})
        return
    caps = summary.get("cap_thresholds")
    if caps:
        shown = ", ".join(f"row {row}: {tau:g}" for row, tau in caps.items())
        log(f"cap thresholds τ (experiment {summary['experiment']}; projection on the unit direction): {shown}")
    stdout_console().print(
        f"imported {escape(str(source))} ({summary['format']}) as {escape(summary['name'])} for "
        f"{escape(model)}: rows {format_ranges(vector.rows)} as "
        f"{vector.aggregators[0]}.{vector.positions[0]} → {escape(summary['artifact'])}",
        soft_wrap=True,
    )
