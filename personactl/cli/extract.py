"""`personactl extract`: persona vectors from a trait's responses or a pairs file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    LazyProgress,
    check_choices,
    comma_list,
    emit_json,
    guarded,
    load_reader_from,
    log,
    open_workspace,
    settings_from,
    stdout_console,
    trait_lock,
)
from personactl.core.choices import AGGREGATORS, DEFAULT_AGGREGATORS

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

POSITIONS_HELP = (
    "Comma list of prompt_end, response_start, response_avg, prompt_avg "
    "(default: all; response_start,response_avg for pairs without prompts); answer_start, answer_avg "
    "read the answer after a thinking model's <think> section."
)
TraitOrNone = Annotated[
    Optional[str], typer.Option("--trait", "-t", help="Trait whose generated responses to use.", show_default=False)
]
Pairs = Annotated[
    Optional[Path],
    typer.Option(
        "--pairs", help='JSON lines {"positive","negative"[,"prompt"]} instead of a trait.', show_default=False
    ),
]
Name = Annotated[
    Optional[str], typer.Option("--name", help="Artifact name for --pairs (default: file stem).", show_default=False)
]
Positions = Annotated[Optional[str], typer.Option("--positions", help=POSITIONS_HELP, show_default=False)]
AGGREGATORS_HELP = (
    "Comma list of mean_diff, pca, probe (mean_diff is always saved). probe: a logistic-regression "
    "direction per layer with its held-out accuracy; it reads the pairs a second time."
)
Aggregators = Annotated[str, typer.Option("--aggregators", help=AGGREGATORS_HELP)]
ShowPosition = Annotated[str, typer.Option("--show", help="Position whose norms the table shows.")]
KeepPairs = Annotated[
    bool,
    typer.Option(
        "--keep-pairs", help="Also save per-pair differences, for compare --bootstrap (size grows with pairs)."
    ),
]
Quantiles = Annotated[
    bool,
    typer.Option(
        "--quantiles",
        help="Also save percentiles of each response's projection on every direction, so --steer …:pNN:cap "
        "can take τ from data (a second pass over the pairs).",
    ),
]
IThou = Annotated[
    bool, typer.Option("--i-thou", help="Save the I-Thou vector (model minus user persona) of --trait; no model run.")
]


@guarded
def extract(
    trait: TraitOrNone = None,
    pairs: Pairs = None,
    name: Name = None,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    layers: o.AllLayers = None,
    positions: Positions = None,
    aggregators: Aggregators = ",".join(DEFAULT_AGGREGATORS),
    show_position: ShowPosition = "response_avg",
    backend: o.ReadingBackend = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    trust_remote_code: o.TrustRemoteCode = None,
    persona: o.Persona = o.PersonaChoice.model,
    keep_pairs: KeepPairs = False,
    quantiles: Quantiles = False,
    i_thou: IThou = False,
    force: o.Force = False,
    json: o.Json = False,
) -> None:
    """Per-layer mean-difference, PCA (and probe) vectors at exact token positions, saved as safetensors."""
    from personactl.core.ranges import parse_ranges
    from personactl.errors import InputError
    from personactl.steps.extract import extract_step
    from personactl.store.traits import load_trait

    if (trait is None) == (pairs is None):
        raise InputError("pass exactly one of --trait or --pairs")
    aggregator_list = comma_list(aggregators)
    check_choices(*((a, AGGREGATORS, "--aggregators") for a in aggregator_list))
    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        backend=backend,
        revision=revision,
        dtype=dtype,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        trust_remote_code=trust_remote_code,
    )
    rows = parse_ranges(layers) if layers else None
    trait_obj = load_trait(trait) if trait else None
    ws = open_workspace(settings)
    if i_thou:
        write_ithou(settings, ws, trait_obj, json)
        return
    label = trait_obj.name if trait_obj is not None else (name or Path(pairs).stem)
    with trait_lock(ws, settings, label), LazyProgress("extract pairs") as bar:
        vector, summary = extract_step(
            settings=settings,
            workspace=ws,
            load=lambda: load_reader_from(settings),
            trait=trait_obj,
            pairs_file=pairs,
            name=name,
            rows=rows,
            positions=comma_list(positions) if positions else None,
            aggregators=aggregator_list,
            force=force,
            on_start=bar.start,
            on_batch=bar.advance,
            persona=persona.value,
            keep_pairs=keep_pairs,
            on_note=log,
            quantiles=quantiles,
        )
    if summary["skipped"]:
        log(f"skipped: {summary['artifact']} is already complete; --force to recompute")
    print_vectors(vector, summary, show_position, json)


def write_ithou(settings: Settings, ws: Workspace, trait: Trait | None, json: bool) -> None:
    """`extract --i-thou`: the model-minus-user vector of a trait, from its two persona files."""
    from personactl.errors import InputError
    from personactl.steps.ithou import ithou_step

    if trait is None:
        raise InputError("--i-thou needs --trait")
    with trait_lock(ws, settings, trait.name):
        vector, summary = ithou_step(settings=settings, workspace=ws, trait=trait)
    if json:
        emit_json({**summary, "positions": vector.positions, "rows": vector.rows, "recipe": vector.metadata["recipe"]})
    else:
        typer.echo(f"wrote the I-Thou vector of {trait.name} (model minus user persona) to {summary['artifact']}")


def layer_rows(vector: PersonaVector, show: str) -> list[dict[str, Any]]:
    """Per extracted row: ‖mean_diff‖ at `show`, the stream norm, their ratio, the diagnostics and,
    with a probe, its held-out accuracy."""
    norms = vector.norms(show, "mean_diff")
    stream = vector.tensors["stream_norm"]
    per_layer = diagnostics_by_layer(vector.metadata.get("diagnostics"), show)
    probe = probe_accuracy_by_layer(vector.metadata.get("probe"), show)
    return [
        {
            "layer": r,
            "norm": float(norms[r]),
            "stream_norm": float(stream[r]),
            "relative": float(norms[r] / stream[r]),
            **per_layer.get(r, {}),
            **({"probe_accuracy": probe.get(r)} if probe else {}),
        }
        for r in vector.rows
    ]


def probe_accuracy_by_layer(probe: dict | None, position: str) -> dict[int, float | None]:
    """`{layer: held-out accuracy}` of the probe at `position` (empty without a probe there)."""
    stats = (probe or {}).get("positions", {}).get(position)
    return dict(zip(probe["rows"], stats["accuracy"], strict=True)) if stats else {}


def print_vectors(vector: PersonaVector, summary: dict[str, Any], show_position: str, json: bool) -> None:
    """The diagnostics' warnings (stderr), then per-layer norms and diagnostics as JSON or a table."""
    show = show_position if show_position in vector.positions else vector.positions[0]
    rows = layer_rows(vector, show)
    diagnostics = vector.metadata.get("diagnostics")
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
                "layers": rows,
                "diagnostics": diagnostics,
            }
        )
        return
    from rich.markup import escape
    from rich.table import Table

    probe = any("probe_accuracy" in r for r in rows)
    table = Table(
        "layer",
        f"‖mean_diff‖ ({show})",
        "stream norm",
        "relative",
        *DIAGNOSTIC_COLUMNS.values(),
        *(["probe acc"] if probe else []),
        title=escape(f"vectors {summary['name']}  ·  {vector.metadata['n_pairs']} pairs  ·  {summary['artifact']}"),
    )
    for r in rows:
        table.add_row(
            str(r["layer"]),
            f"{r['norm']:.3f}",
            f"{r['stream_norm']:.2f}",
            f"{r['relative']:.3f}",
            *diagnostic_cells(r),
            *(diagnostic_cells(r, ["probe_accuracy"]) if probe else []),
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


def diagnostic_cells(row: dict, keys: Sequence[str] = tuple(DIAGNOSTIC_COLUMNS)) -> list[str]:
    """Two-decimal cells of `keys` (the diagnostics by default), a dash where a value is missing."""
    cell = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    return [cell(row.get(key)) for key in keys]
