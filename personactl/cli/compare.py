"""`personactl compare`: cosine similarity per layer between two or more vectors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console
from personactl.cli.tables import NUMBER, Col, needed_width, print_fitted
from personactl.core.ranges import format_ranges

if TYPE_CHECKING:
    from rich.console import Console


Vectors = Annotated[
    list[str],
    typer.Argument(
        help="Vector files or trait names (NAME:user for the user persona), each optionally @position[/aggregator]."
    ),
]
DefaultPosition = Annotated[str, typer.Option("--position", help="Default position for vectors without @position.")]
DefaultAggregator = Annotated[
    o.AggregatorChoice, typer.Option("--aggregator", help="Default aggregator (mean_diff, pca or probe).")
]
Agree = Annotated[float, typer.Option("--agree", help="Cosine at or above which layers count as agreeing.")]
Diverge = Annotated[float, typer.Option("--diverge", help="|cosine| below which layers count as diverging.")]
Bootstrap = Annotated[
    int,
    typer.Option(
        "--bootstrap", min=0, help="Bootstrap replicates for cosine CIs; needs extract --keep-pairs (0 = off)."
    ),
]
Splits = Annotated[int, typer.Option("--splits", min=1, help="Random splits for split-half reliability.")]
Level = Annotated[float, typer.Option("--level", min=0.5, max=0.999, help="Confidence level of the CIs.")]
ResamplingSeed = Annotated[int, typer.Option("--seed", help="Seed of the resampling.")]
Plot = Annotated[
    Optional[Path], typer.Option("--plot", help="Also write a cosine heatmap PNG here.", show_default=False)
]


@guarded
def compare(
    vectors: Vectors,
    position: DefaultPosition = "response_avg",
    aggregator: DefaultAggregator = o.AggregatorChoice.mean_diff,
    agree: Agree = 0.5,
    diverge: Diverge = 0.2,
    bootstrap: Bootstrap = 0,
    splits: Splits = 50,
    level: Level = 0.95,
    seed: ResamplingSeed = 0,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    plot: Plot = None,
    json: o.Json = False,
) -> None:
    """Cosine per layer, norms, and the layers where vectors agree, diverge or oppose."""
    from personactl.steps.compare import compare_step
    from personactl.store.workspace import Workspace

    settings = settings_from(config, workspace=workspace, model=model)
    result = compare_step(
        settings=settings,
        workspace=Workspace(settings.workspace),
        specs=vectors,
        position=position,
        aggregator=aggregator.value,
        agree=agree,
        diverge=diverge,
        bootstrap=bootstrap,
        splits=splits,
        level=level,
        seed=seed,
        plot=plot,
    )
    if json:
        emit_json(result)
        return
    console = stdout_console()
    names = short_names(console, result, vectors)
    print_fitted(console, escape(f"compare ({result['model']})"), *cosine_table(result, vectors, names))
    if bootstrap:
        print_fitted(console, "uncertainty", *uncertainty_table(result, names, level))
    if result["skipped_layers"]:
        console.print(f"left out (no direction in some vector): layers {format_ranges(result['skipped_layers'])}")
    for line in pair_lines(result, agree, diverge):
        console.print(line, soft_wrap=True, markup=False)


def short_names(console: Console, result: dict[str, Any], specs: list[str]) -> dict[str, str]:
    """Each vector's column name: its spec, or a letter (with a key printed first) when the specs
    make the cosine table wider than the terminal."""
    names = {s: s for s in specs}
    if needed_width(cosine_table(result, specs, names)[0]) <= console.width:
        return names
    letters = [chr(ord("A") + i) if i < 26 else f"V{i + 1}" for i in range(len(specs))]
    names = dict(zip(specs, letters, strict=True))
    for spec, letter in names.items():
        console.print(f"  {letter} = {escape(spec)}", soft_wrap=True)
    return names


def cosine_table(result: dict[str, Any], specs: list[str], names: dict[str, str]) -> tuple[list[Col], list[list[str]]]:
    """Columns and rows: per layer, each vector's norm and each pair's cosine."""
    columns = [
        Col("layer", key=True, options=NUMBER),
        *[Col(escape(f"‖{names[s]}‖"), options=NUMBER) for s in specs],
        *[Col(escape(f"cos {names[p['a']]}\n· {names[p['b']]}"), options=NUMBER) for p in result["pairs"]],
    ]
    rows = [
        [
            str(layer),
            *[f"{result['norms'][s][i]:.3f}" for s in specs],
            *[f"{p['cosine'][i]:+.3f}" for p in result["pairs"]],
        ]
        for i, layer in enumerate(result["layers"])
    ]
    return columns, rows


def uncertainty_table(result: dict[str, Any], names: dict[str, str], level: float) -> tuple[list[Col], list[list[str]]]:
    """Columns and rows: per layer, each pair's cosine with its CI and each vector's split-half reliability."""
    columns = [
        Col("layer", key=True, options=NUMBER),
        *[
            Col(escape(f"cos {names[p['a']]}\n· {names[p['b']]}\n({level:.0%} CI)"), options=NUMBER)
            for p in result["pairs"]
        ],
        *[Col(escape(f"split-half\n{names.get(s, s)}\n(S-B)"), options=NUMBER) for s in result["reliability"]],
    ]
    rows = [
        [
            str(layer),
            *[
                f"{p['cosine'][i]:+.3f} [{p['ci']['low'][i]:+.3f},\u00a0{p['ci']['high'][i]:+.3f}]"
                for p in result["pairs"]
            ],
            *[
                f"{r['split_half'][i]:+.3f}\u00a0({r['spearman_brown'][i]:+.3f})"
                for r in result["reliability"].values()
            ],
        ]
        for i, layer in enumerate(result["layers"])
    ]
    return columns, rows


def pair_lines(result: dict[str, Any], agree: float, diverge: float) -> list[str]:
    """Per pair, in words: mean, max and min cosine, and the layers that agree, diverge or oppose."""
    return [
        f"{p['a']} vs {p['b']}: mean cos {p['mean_cosine']:+.3f}, max {p['max']['cosine']:+.3f} at layer "
        f"{p['max']['layer']}, min {p['min']['cosine']:+.3f} at layer {p['min']['layer']}; "
        f"agree (≥{agree:g}) {format_ranges(p['agree_layers']) or 'none'}; "
        f"diverge (|cos|<{diverge:g}) {format_ranges(p['diverge_layers']) or 'none'}; "
        f"opposed {format_ranges(p['opposed_layers']) or 'none'}"
        for p in result["pairs"]
    ]
