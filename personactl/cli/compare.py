"""`personactl compare`: cosine similarity per layer between two or more vectors."""

from __future__ import annotations

from typing import Annotated

import typer

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console


@guarded
def compare(
    vectors: Annotated[
        list[str], typer.Argument(help="Vector files or trait names, each optionally @position[/aggregator].")
    ],
    position: Annotated[
        str, typer.Option("--position", help="Default position for vectors without @position.")
    ] = "response_avg",
    aggregator: Annotated[
        str, typer.Option("--aggregator", help="Default aggregator (mean_diff or pca).")
    ] = "mean_diff",
    agree: Annotated[float, typer.Option("--agree", help="Cosine at or above which layers count as agreeing.")] = 0.5,
    diverge: Annotated[float, typer.Option("--diverge", help="|cosine| below which layers count as diverging.")] = 0.2,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    json: o.Json = False,
) -> None:
    """Cosine per layer, norms, and the layers where vectors agree, diverge or oppose."""
    from personactl.comparison import VectorRef, compare_vectors
    from personactl.models import resolve_model
    from personactl.ranges import format_ranges
    from personactl.vectors import PersonaVector
    from personactl.workspace import Workspace

    settings = settings_from(config, workspace=workspace, model=model)
    ws = Workspace(settings.workspace)
    slug = resolve_model(settings.model).slug
    refs = [VectorRef.parse(v, position, aggregator) for v in vectors]
    loaded = [(ref, PersonaVector.load(ws.find_vector(ref.name, slug))) for ref in refs]
    result = compare_vectors(loaded, agree, diverge)
    if json:
        emit_json(result)
        return
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    table = Table(
        "layer",
        *[escape(f"‖{r.spec}‖") for r in refs],
        *[escape(f"cos {p['a']} · {p['b']}") for p in result["pairs"]],
        title=escape(f"compare ({result['model']})"),
    )
    for i, layer in enumerate(result["layers"]):
        table.add_row(
            str(layer),
            *[f"{result['norms'][r.spec][i]:.3f}" for r in refs],
            *[f"{p['cosine'][i]:+.3f}" for p in result["pairs"]],
        )
    console.print(table)
    if result["skipped_layers"]:
        console.print(f"left out (no direction in some vector): layers {format_ranges(result['skipped_layers'])}")
    for p in result["pairs"]:
        console.print(
            f"{p['a']} vs {p['b']}: mean cos {p['mean_cosine']:+.3f}, max {p['max']['cosine']:+.3f} at layer "
            f"{p['max']['layer']}, min {p['min']['cosine']:+.3f} at layer {p['min']['layer']}; "
            f"agree (≥{agree:g}) {format_ranges(p['agree_layers']) or 'none'}; "
            f"diverge (|cos|<{diverge:g}) {format_ranges(p['diverge_layers']) or 'none'}; "
            f"opposed {format_ranges(p['opposed_layers']) or 'none'}",
            soft_wrap=True,
            markup=False,
        )
