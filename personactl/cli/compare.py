"""`personactl compare`: cosine similarity per layer between two or more vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console


@guarded
def compare(
    vectors: Annotated[
        list[str],
        typer.Argument(
            help="Vector files or trait names (NAME:user for the user persona), each optionally @position[/aggregator]."
        ),
    ],
    position: Annotated[
        str, typer.Option("--position", help="Default position for vectors without @position.")
    ] = "response_avg",
    aggregator: Annotated[
        str, typer.Option("--aggregator", help="Default aggregator (mean_diff or pca).")
    ] = "mean_diff",
    agree: Annotated[float, typer.Option("--agree", help="Cosine at or above which layers count as agreeing.")] = 0.5,
    diverge: Annotated[float, typer.Option("--diverge", help="|cosine| below which layers count as diverging.")] = 0.2,
    bootstrap: Annotated[
        int,
        typer.Option(
            "--bootstrap", min=0, help="Bootstrap replicates for cosine CIs; needs extract --keep-pairs (0 = off)."
        ),
    ] = 0,
    splits: Annotated[int, typer.Option("--splits", min=1, help="Random splits for split-half reliability.")] = 50,
    level: Annotated[float, typer.Option("--level", min=0.5, max=0.999, help="Confidence level of the CIs.")] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the resampling.")] = 0,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", help="Also write a cosine heatmap PNG here.", show_default=False)
    ] = None,
    json: o.Json = False,
) -> None:
    """Cosine per layer, norms, and the layers where vectors agree, diverge or oppose."""
    from personactl.core.ranges import format_ranges
    from personactl.model.loading import resolve_model
    from personactl.steps.compare import VectorRef, compare_vectors
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

    settings = settings_from(config, workspace=workspace, model=model)
    ws = Workspace(settings.workspace)
    slug = resolve_model(settings.model).slug
    refs = [VectorRef.parse(v, position, aggregator) for v in vectors]
    paths = [ws.find_vector(ref.name, slug, ref.persona) for ref in refs]
    loaded = [(ref, PersonaVector.load(path)) for ref, path in zip(refs, paths, strict=True)]
    result = compare_vectors(loaded, agree, diverge)
    if bootstrap:
        from personactl.core.reliability import compare_uncertainty
        from personactl.errors import InputError
        from personactl.steps.pair_diffs import load_pair_diffs

        if any(ref.aggregator != "mean_diff" for ref in refs):
            raise InputError("--bootstrap applies to mean_diff vectors only")
        diffs = {}
        for ref, path in zip(refs, paths, strict=True):
            tensor, meta = load_pair_diffs(ws.pair_diffs_path(path), ref.position)
            diffs[ref.spec] = (tensor, meta["rows"])
        result = compare_uncertainty(result, diffs, n_boot=bootstrap, n_splits=splits, level=level, seed=seed)
    if plot is not None:
        from personactl.steps.plots import plot_cosines

        result["plot"] = str(plot_cosines(result, plot))
    if json:
        emit_json(result)
        return
    from rich.markup import escape

    console = stdout_console()
    from personactl.cli.tables import NUMBER, Col, needed_width, print_fitted

    specs = [r.spec for r in refs]
    names = {s: s for s in specs}

    def headers() -> list[Col]:
        return [
            Col("layer", key=True, options=NUMBER),
            *[Col(escape(f"‖{names[s]}‖"), options=NUMBER) for s in specs],
            *[Col(escape(f"cos {names[p['a']]}\n· {names[p['b']]}"), options=NUMBER) for p in result["pairs"]],
        ]

    columns = headers()
    if needed_width(columns) > console.width:  # too wide with the names: letters, and a key to them
        letters = [chr(ord("A") + i) if i < 26 else f"V{i + 1}" for i in range(len(specs))]
        names = dict(zip(specs, letters, strict=True))
        columns = headers()
        for spec, letter in names.items():
            console.print(f"  {letter} = {escape(spec)}", soft_wrap=True)
    rows = [
        [
            str(layer),
            *[f"{result['norms'][r.spec][i]:.3f}" for r in refs],
            *[f"{p['cosine'][i]:+.3f}" for p in result["pairs"]],
        ]
        for i, layer in enumerate(result["layers"])
    ]
    print_fitted(console, escape(f"compare ({result['model']})"), columns, rows)
    if bootstrap:
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
        print_fitted(console, "uncertainty", columns, rows)
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
