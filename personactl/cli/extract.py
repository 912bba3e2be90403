"""`personactl extract`: persona vectors from a trait's responses or a pairs file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    LazyProgress,
    emit_json,
    guarded,
    load_model_from,
    log,
    open_workspace,
    settings_from,
    stdout_console,
    trait_lock,
)
from personactl.cli.persona_options import Persona, check_persona

POSITIONS_HELP = (
    "Comma list of prompt_end, response_start, response_avg, prompt_avg "
    "(default: all; response_start,response_avg for pairs without prompts); answer_start, answer_avg "
    "read the answer after a thinking model's <think> section."
)


@guarded
def extract(
    trait: Annotated[
        Optional[str], typer.Option("--trait", "-t", help="Trait whose generated responses to use.", show_default=False)
    ] = None,
    pairs: Annotated[
        Optional[Path],
        typer.Option(
            "--pairs", help='JSON lines {"positive","negative"[,"prompt"]} instead of a trait.', show_default=False
        ),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option("--name", help="Artifact name for --pairs (default: file stem).", show_default=False),
    ] = None,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    layers: o.AllLayers = None,
    positions: Annotated[Optional[str], typer.Option("--positions", help=POSITIONS_HELP, show_default=False)] = None,
    aggregators: Annotated[str, typer.Option("--aggregators", help="mean_diff and/or pca.")] = "mean_diff,pca",
    show_position: Annotated[
        str, typer.Option("--show", help="Position whose norms the table shows.")
    ] = "response_avg",
    dtype: o.Dtype = None,
    device: o.Device = None,
    trust_remote_code: o.TrustRemoteCode = None,
    persona: Persona = "model",
    keep_pairs: Annotated[
        bool,
        typer.Option(
            "--keep-pairs", help="Also save per-pair differences, for compare --bootstrap (size grows with pairs)."
        ),
    ] = False,
    i_thou: Annotated[
        bool,
        typer.Option("--i-thou", help="Save the I-Thou vector (model minus user persona) of --trait; no model run."),
    ] = False,
    force: o.Force = False,
    json: o.Json = False,
) -> None:
    """Per-layer mean-difference and PCA vectors at exact token positions, saved as safetensors."""
    from personactl.core.ranges import parse_ranges
    from personactl.errors import InputError
    from personactl.steps.extract import extract_step
    from personactl.store.traits import load_trait

    if (trait is None) == (pairs is None):
        raise InputError("pass exactly one of --trait or --pairs")
    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    rows = parse_ranges(layers) if layers else None
    position_list = [p.strip() for p in positions.split(",") if p.strip()] if positions else None
    aggregator_list = [a.strip() for a in aggregators.split(",") if a.strip()]
    trait_obj = load_trait(trait) if trait else None
    ws = open_workspace(settings)
    if i_thou:
        from personactl.steps.ithou import ithou_step

        if trait_obj is None:
            raise InputError("--i-thou needs --trait")
        with trait_lock(ws, settings, trait_obj.name):
            vector, summary = ithou_step(settings=settings, workspace=ws, trait=trait_obj)
        if json:
            emit_json(
                {**summary, "positions": vector.positions, "rows": vector.rows, "recipe": vector.metadata["recipe"]}
            )
        else:
            typer.echo(
                f"wrote the I-Thou vector of {trait_obj.name} (model minus user persona) to {summary['artifact']}"
            )
        return
    label = trait_obj.name if trait_obj is not None else (name or Path(pairs).stem)
    with trait_lock(ws, settings, label), LazyProgress("extract pairs") as bar:
        vector, summary = extract_step(
            settings=settings,
            workspace=ws,
            load=lambda: load_model_from(settings),
            trait=trait_obj,
            pairs_file=pairs,
            name=name,
            rows=rows,
            positions=position_list,
            aggregators=aggregator_list,
            force=force,
            on_start=bar.start,
            on_batch=bar.advance,
            persona=check_persona(persona),
            keep_pairs=keep_pairs,
        )
    if summary["skipped"]:
        log(f"skipped: {summary['artifact']} is already complete; --force to recompute")
    show = show_position if show_position in vector.positions else vector.positions[0]
    norms = vector.norms(show, "mean_diff")
    stream = vector.tensors["stream_norm"]
    diagnostics = vector.metadata.get("diagnostics")
    per_layer = diagnostics_by_layer(diagnostics, show)
    layer_rows = [
        {
            "layer": r,
            "norm": float(norms[r]),
            "stream_norm": float(stream[r]),
            "relative": float(norms[r] / stream[r]),
            **per_layer.get(r, {}),
        }
        for r in vector.rows
    ]
    for warning in (diagnostics or {}).get("warnings", []):
        log(f"warning: {warning}")
    if json:
        emit_json(
            {
                **summary,
                "positions": vector.positions,
                "aggregators": vector.aggregators,
                "n_pairs": vector.metadata["n_pairs"],
                "norms_position": show,
                "layers": layer_rows,
                "diagnostics": diagnostics,
            }
        )
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        "layer",
        f"‖mean_diff‖ ({show})",
        "stream norm",
        "relative",
        *DIAGNOSTIC_COLUMNS.values(),
        title=escape(f"vectors {summary['name']}  ·  {vector.metadata['n_pairs']} pairs  ·  {summary['artifact']}"),
    )
    for r in layer_rows:
        table.add_row(
            str(r["layer"]),
            f"{r['norm']:.3f}",
            f"{r['stream_norm']:.2f}",
            f"{r['relative']:.3f}",
            *diagnostic_cells(r),
        )
    stdout_console().print(table)


DIAGNOSTIC_COLUMNS = {
    "consistency": "consistency",
    "anti_steerable": "anti-steerable",
    "top_dim_share": "top dim share",
}


def diagnostics_by_layer(diagnostics: dict | None, position: str) -> dict[int, dict]:
    """`{layer: {consistency, anti_steerable, top_dim, top_dim_share, relative_size}}` at `position`
    (empty for files extracted before diagnostics existed)."""
    stats = (diagnostics or {}).get("positions", {}).get(position)
    if not stats:
        return {}
    return {row: {key: values[i] for key, values in stats.items()} for i, row in enumerate(diagnostics["rows"])}


def diagnostic_cells(row: dict) -> list[str]:
    cell = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    return [cell(row.get(key)) for key in DIAGNOSTIC_COLUMNS]
