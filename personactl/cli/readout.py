"""`personactl readout train`: concept vectors from first-person descriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, load_reader_from, open_workspace, settings_from

app = typer.Typer(help="Multi-concept readouts: train concept vectors, then `monitor --readout`.", no_args_is_help=True)


@app.command("train")
@guarded
def train(
    directory: Annotated[
        Path, typer.Argument(help="One NAME.txt per concept (blank-line separated texts); _*.txt = neutral pool.")
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Readout file to write (default: <workspace>/<model>/readouts/<dir name>.safetensors).",
            show_default=False,
        ),
    ] = None,
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    layers: o.AllLayers = None,
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
    """Train one unit vector per concept and layer, one-vs-rest, on the assistant turn (response_avg)."""
    from personactl.core.ranges import check_in_range, parse_ranges
    from personactl.model.loading import resolve_model
    from personactl.steps.readout import read_concept_dir, train_readout

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
    concepts, neutral = read_concept_dir(directory)
    ws = open_workspace(settings)
    lm = load_reader_from(settings)
    rows = parse_ranges(layers) if layers else list(range(lm.num_layers + 1))
    check_in_range(rows, lm.num_layers)
    readout = train_readout(
        lm,
        concepts,
        neutral,
        rows=rows,
        aggregator=aggregator.value,
        batch_tokens=settings.extract_batch_tokens,
        source=str(directory),
    )
    path = output or ws.readout_path(resolve_model(settings.model).slug, Path(directory).name)
    readout.save(path)
    from personactl.settings import masked_dump

    ws.write_manifest(  # `ls` lists it; `readout train` before this wrote none (ls reads those files)
        path,
        "readout",
        model=lm.describe(),
        settings=masked_dump(settings),
        counts={"concepts": len(readout.concepts), "layers": len(readout.rows)},
    )
    summary = {
        "artifact": str(path),
        "concepts": readout.concepts,
        "rows": readout.rows,
        "aggregator": aggregator.value,
        "n_neutral": len(neutral),
    }
    if json:
        emit_json(summary)
    else:
        typer.echo(
            f"wrote a readout of {len(readout.concepts)} concepts ({', '.join(readout.concepts)}) at {len(rows)} layers to {path}"
        )
