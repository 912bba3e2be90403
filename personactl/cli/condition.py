"""`personactl condition fit`: the layer and threshold of a `steer --when` condition, by F1."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

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

app = typer.Typer(help="Conditional steering: fit the condition `steer --when` reads.", no_args_is_help=True)

Labels = Annotated[
    Optional[Path],
    typer.Option(
        "--labels",
        help='JSON lines {"text": USER MESSAGE, "label": 1 (steer) or 0 (do not)}.',
        show_default=False,
    ),
]
TraitPrompts = Annotated[
    Optional[str],
    typer.Option(
        "--trait",
        "-t",
        help="Use a trait's prompts instead: pos instructions label 1, neg label 0.",
        show_default=False,
    ),
]
System = Annotated[
    Optional[str], typer.Option("--system", help="System prompt for every --labels message.", show_default=False)
]


@app.command("fit")
@guarded
def fit(
    vector: o.VectorSpec,
    labels: Labels = None,
    trait: TraitPrompts = None,
    system: System = None,
    layers: o.Layers = None,
    position: o.VectorPosition = o.PositionChoice.response_avg,
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    backend: o.ReadingBackend = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    trust_remote_code: o.TrustRemoteCode = None,
    json: o.Json = False,
) -> None:
    """Fit the layer and threshold of a condition on labelled prompts: F1 per layer, and the --when to use."""
    from personactl.core.ranges import parse_ranges
    from personactl.steps.condition_fit import fit_condition_step

    prompts, source = _labelled(labels, trait, system)
    layer_list = parse_ranges(layers) if layers else None
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
    ws = open_workspace(settings)
    lm = load_reader_from(settings)
    document, summary = fit_condition_step(
        settings=settings,
        workspace=ws,
        lm=lm,
        vector_spec=vector,
        prompts=prompts,
        source=source,
        layers=layer_list,
        position=position.value,
        aggregator=aggregator.value,
    )
    for warning in summary["warnings"]:
        log(f"warning: {warning}")
    if json:
        return emit_json({**document, "artifact": summary["artifact"]})
    _print_fit(document, summary["artifact"])


def _labelled(labels: Path | None, trait: str | None, system: str | None) -> tuple[list[Any], dict[str, Any]]:
    """The labelled prompts from exactly one of --labels and --trait, and where they came from."""
    from personactl.errors import InputError
    from personactl.steps.condition_fit import file_prompts, trait_prompts

    if (labels is None) == (trait is None):
        raise InputError("give labelled prompts", hint="pass exactly one of --labels FILE.jsonl and --trait NAME")
    if labels is not None:
        return file_prompts(labels, system), {"labels": str(labels), "system": system}
    if system is not None:
        raise InputError("--system goes with --labels", hint="a trait's prompts carry its own system prompts")
    from personactl.store.traits import load_trait

    loaded = load_trait(trait)
    prompts, which = trait_prompts(loaded)
    return prompts, {"trait": loaded.name, "trait_sha256": loaded.sha256, "questions": which}


def _print_fit(document: dict[str, Any], artifact: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    best = document["best"]
    table = Table("layer", "F1", "threshold", "precision", "recall", "gap", title="F1 of `projection > threshold`")
    for row in document["layers"]:
        if row["f1"] is None:
            table.add_row(str(row["layer"]), "—", "all projections equal", "", "", "")
            continue
        table.add_row(
            str(row["layer"]),
            f"{row['f1']:.3f}",
            f"{row['threshold']:g}",
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['above'] - row['below']:.3g}",
            style="bold" if best and row["layer"] == best["layer"] else None,
        )
    console = stdout_console()
    console.print(table)
    counts = f"{document['prompts']} prompts, {document['positives']} labelled 1"
    console.print(f"{counts}; steering every prompt scores F1 {document['baseline_f1']:.3f}", soft_wrap=True)
    if document["when"]:
        console.print(f"best: layer {best['layer']}, F1 {best['f1']:.3f}  ·  use: --when {escape(document['when'])}")
    console.print(f"saved {artifact}", soft_wrap=True)
