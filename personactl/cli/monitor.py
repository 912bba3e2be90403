"""`personactl monitor`: projections of activations onto a persona vector or a readout."""

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
    import polars as pl

VectorName = Annotated[
    Optional[str], typer.Option("--vector", "-v", help="Vector file or trait name.", show_default=False)
]
ReadoutFile = Annotated[
    Optional[Path], typer.Option("--readout", help="Readout file (readout train).", show_default=False)
]
Texts = Annotated[
    Optional[list[str]], typer.Option("--text", help="A user message to read (repeatable).", show_default=False)
]
Replies = Annotated[
    Optional[list[str]],
    typer.Option(
        "--reply",
        help="The assistant's reply to the --text of the same place (repeatable, one per --text): read as response_avg.",
        show_default=False,
    ),
]
Conversation = Annotated[
    Optional[Path],
    typer.Option(
        "--conversation",
        help="JSON list of role/content messages; a last assistant turn is the reply.",
        show_default=False,
    ),
]
Responses = Annotated[
    Optional[str], typer.Option("--responses", help="A trait whose responses table to read.", show_default=False)
]
Output = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="With --responses: write the table plus projection columns here (parquet).",
        show_default=False,
    ),
]
Position = Annotated[str, typer.Option("--position", help="Which vector of the file to project on.")]
Tokens = Annotated[
    bool,
    typer.Option(
        "--tokens",
        help="Also project every token: a table per input, coloured by sign "
        "(every layer when it fits, else the middle one: narrow with --layers).",
    ),
]


@guarded
def monitor(
    vector: VectorName = None,
    readout: ReadoutFile = None,
    text: Texts = None,
    reply: Replies = None,
    conversation: Conversation = None,
    responses: Responses = None,
    persona: o.Persona = o.PersonaChoice.model,
    output: Output = None,
    position: Position = "response_avg",
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    layers: o.Layers = None,
    tokens: Tokens = False,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    backend: o.ReadingBackend = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    json: o.Json = False,
) -> None:
    """Project activations at prompt_end and response_avg (and per token) onto vectors, per layer."""
    from personactl.core.ranges import parse_ranges
    from personactl.errors import InputError
    from personactl.steps.monitor import monitor_step
    from personactl.store.traits import load_trait

    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        backend=backend,
        dtype=dtype,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
    )
    ws = open_workspace(settings)
    messages = read_conversation(conversation) if conversation is not None else None
    if output is not None and responses is None:
        raise InputError("--output needs --responses")
    doc, table = monitor_step(
        settings=settings,
        workspace=ws,
        load=lambda: load_reader_from(settings),
        vector=vector,
        readout=readout,
        texts=list(text or []),
        replies=list(reply or []),
        conversation=messages,
        responses=load_trait(responses) if responses else None,
        persona=persona.value,
        position=position,
        aggregator=aggregator.value,
        rows=parse_ranges(layers) if layers else None,
        tokens=tokens,
    )
    if output is not None:
        write_table(table, output)
    if json:
        emit_json(doc)
    else:
        print_projections(doc, tokens)


def read_conversation(path: Path) -> Any:
    import json as jsonlib

    from personactl.errors import InputError

    try:
        return jsonlib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read conversation {path}: {exc}") from None


def write_table(table: pl.DataFrame, output: Path) -> None:
    from personactl.store.workspace import atomic_path

    with atomic_path(output) as tmp:
        table.write_parquet(tmp)
    log(f"wrote {table.height} rows with projection columns to {output}")


def print_projections(doc: dict[str, Any], tokens: bool) -> None:
    """The effect table of a responses table, else one layers table (and token table) per input."""
    from personactl.cli import monitor_render as render

    console = stdout_console()
    if "effect" in doc:
        console.print(render.effect_table(doc))
        return
    token_layers = render.token_layers(doc["layers"], len(doc["labels"])) if tokens else []
    if tokens and token_layers != doc["layers"]:
        log(f"per-token values at layer {token_layers[0]} (pick layers with --layers; --json has every layer)")
    for item in doc["items"]:
        console.print(render.layers_table(doc, item))
        if tokens:
            console.print(render.token_table(doc, item, token_layers))
