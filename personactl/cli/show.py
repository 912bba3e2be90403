"""`personactl show`: a vector file's metadata, tensor shapes and norms per layer."""

from __future__ import annotations

from typing import Annotated

import typer

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console

SUMMARY_KEYS = (
    "model",
    "model_fingerprint",
    "architecture",
    "num_layers",
    "hidden_size",
    "trait",
    "persona",
    "source",
    "positions",
    "aggregators",
    "n_pairs",
    "n_tokens",
    "judge",
    "filter",
    "sinks",
    "personactl_version",
    "created",
)


@guarded
def show(
    vector: Annotated[str, typer.Argument(help="Vector file, or a trait name extracted in the workspace for --model.")],
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    json: o.Json = False,
) -> None:
    """Metadata, tensor shapes and per-layer norms of a vector file."""
    from personactl.core.ranges import format_ranges
    from personactl.model.loading import resolve_model
    from personactl.store.vector_report import describe_vector
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

    settings = settings_from(config, workspace=workspace, model=model)
    path = Workspace(settings.workspace).find_vector(vector, resolve_model(settings.model).slug)
    report = describe_vector(PersonaVector.load(path), path)
    if json:
        emit_json(report)
        return
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    meta = report["metadata"]
    console.print(f"[bold]{escape(str(path))}[/]")
    for key in SUMMARY_KEYS:
        if meta.get(key) is not None:
            console.print(f"  {key}: {escape(str(meta[key]))}")
    console.print(f"  rows: {format_ranges(meta.get('rows', []))}")
    if meta.get("imported_from"):
        source = meta["imported_from"]
        console.print(f"  imported from: {escape(str(source.get('path')))} ({escape(str(source.get('format')))})")
    console.print(f"  layer convention: {escape(str(meta.get('layer_convention')))}")
    console.print("  tensors: " + ", ".join(escape(f"{t['name']} {t['shape']}") for t in report["tensors"]))
    from personactl.cli.tables import NUMBER, Col, print_fitted

    columns = [
        Col("layer", key=True, options=NUMBER),
        Col("stream\nnorm", options=NUMBER),
        # aggregator over position (mean_diff / response_avg): a header as narrow as its numbers
        *[Col(escape(d.replace(".", "\n")), options=NUMBER) for d in report["directions"]],
    ]
    rows = [
        [str(row["layer"]), _cell(row["stream_norm"], ".2f"), *[_cell(row[d], ".4f") for d in report["directions"]]]
        for row in report["layers"]
    ]
    print_fitted(console, "norms per layer: ‖v‖ by aggregator and position", columns, rows)
    from personactl.cli.extract import DIAGNOSTIC_COLUMNS, diagnostic_cells, diagnostics_by_layer

    diagnostics = meta.get("diagnostics")
    if diagnostics:
        position = (
            "response_avg" if "response_avg" in diagnostics["positions"] else next(iter(diagnostics["positions"]))
        )
        per_layer = diagnostics_by_layer(diagnostics, position)
        table = Table("layer", *DIAGNOSTIC_COLUMNS.values(), "top dim", title=f"diagnostics ({position}, mean_diff)")
        for layer, row in per_layer.items():
            table.add_row(str(layer), *diagnostic_cells(row), _cell(row.get("top_dim"), "d"))
        console.print(table)
        for warning in diagnostics.get("warnings", []):
            console.print(f"  [yellow]warning:[/] {escape(warning)}")
    elif meta.get("source") in ("responses", "pairs_file"):
        console.print("  diagnostics: none (extracted before personactl wrote them)")


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)  # a row without a direction
