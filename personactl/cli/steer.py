"""`personactl steer`: a batched sweep over prompts × layers × coefficients."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    LazyProgress,
    check_choices,
    guarded,
    load_engine,
    log,
    open_workspace,
    settings_from,
    stdout_console,
)


@guarded
def steer(
    vector: Annotated[
        str, typer.Option("--vector", "-v", help="Vector file, or a trait name extracted in the workspace for --model.")
    ],
    prompt: Annotated[
        Optional[list[str]], typer.Option("--prompt", "-p", help="A user message (repeatable).", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts-file", help="One user message per line.", show_default=False)
    ] = None,
    layers: o.MiddleLayer = None,
    coefficients: Annotated[
        str, typer.Option("--coefficients", "-c", help="Comma list of α, e.g. --coefficients=-2,-1,0,1,2.")
    ] = "-1,0,1",
    position: o.VectorPosition = "response_avg",
    aggregator: o.Aggregator = "mean_diff",
    positions: o.SteerPositions = "all",
    norm: o.Norm = "raw",
    system: Annotated[
        Optional[str], typer.Option("--system", help="System prompt for every message.", show_default=False)
    ] = None,
    max_new_tokens: o.MaxNewTokens = None,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="0 = greedy (the default, for comparability).")
    ] = 0.0,
    top_p: o.TopP = None,
    seed: o.Seed = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option("--batch-size", min=1, help="Rows per batched call (default: 32).", show_default=False),
    ] = None,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    trust_remote_code: o.TrustRemoteCode = None,
    backend: o.Backend = None,
    tensor_parallel_size: o.TensorParallelSize = None,
    json: Annotated[bool, typer.Option("--json", help="JSON lines, one per generation, to stdout.")] = False,
) -> None:
    """Generate with α·v added at each chosen layer; the whole grid runs as batched generation."""
    from personactl.backends import Sampling
    from personactl.core.directions import NORM_MODES
    from personactl.core.ranges import parse_floats, parse_ranges
    from personactl.errors import InputError
    from personactl.model.activations import AGGREGATORS, POSITIONS
    from personactl.model.steering import POSITION_MODES
    from personactl.steps.steer import steer_step

    check_choices(
        (position, POSITIONS, "--position"),
        (aggregator, AGGREGATORS, "--aggregator"),
        (positions, POSITION_MODES, "--positions"),
        (norm, NORM_MODES, "--norm"),
    )
    alphas = parse_floats(coefficients)
    layer_list = parse_ranges(layers) if layers else None
    messages = list(prompt or [])
    if prompts_file is not None:
        from personactl.store.text_input import read_user_text

        messages += [line for line in read_user_text(prompts_file, "prompts file").splitlines() if line.strip()]
    if not messages:
        raise InputError("no prompt given", hint="pass --prompt TEXT (repeatable) or --prompts-file FILE")
    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        revision=revision,
        max_new_tokens=max_new_tokens,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        backend=backend,
        tensor_parallel_size=tensor_parallel_size,
    )
    ws = open_workspace(settings)
    lm = load_engine(settings, steering=True, positions=positions)
    sampling = Sampling(settings.max_new_tokens, temperature, settings.top_p)
    with LazyProgress("steer") as bar:
        table, summary = steer_step(
            settings=settings,
            workspace=ws,
            lm=lm,
            vector_spec=vector,
            prompts=messages,
            system_prompt=system,
            layers=layer_list,
            coefficients=alphas,
            position=position,
            aggregator=aggregator,
            positions=positions,
            norm=norm,
            sampling=sampling,
            on_start=bar.start,
            on_chunk=bar.advance,
        )
    for warning in summary["warnings"]:
        log(f"warning: {warning}")
    if json:
        for row in table.iter_rows(named=True):
            typer.echo(
                jsonlib.dumps(
                    {
                        "vector": summary["vector"],
                        "position": position,
                        "aggregator": aggregator,
                        "positions": positions,
                        **row,
                    }
                )
            )
        return
    _print_tables(table, summary)


def _print_tables(table, summary) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    for _, group in table.group_by("prompt_index", maintain_order=True):
        prompt = group["prompt"][0]
        t = Table(
            "layer",
            "α",
            "‖α·v‖",
            "tokens",
            "response",
            title=f"[bold]{escape(prompt)}[/]",
            show_lines=True,
            title_justify="left",
        )
        for row in group.iter_rows(named=True):
            layer = "baseline" if row["baseline"] else str(row["layer"])
            t.add_row(
                layer,
                f"{row['coefficient']:g}",
                f"{row['effective_norm']:.2f}",
                str(row["n_tokens"]),
                escape(row["text"].strip()),
                style="dim" if row["baseline"] else None,
            )
        console.print(t)
    console.print(
        f"norm mode {summary['norm']}: ‖v‖ per layer "
        + ", ".join(
            f"{r['layer']}={r['vector_norm']:.2f}"
            for r in table.filter(~table["baseline"]).unique("layer", maintain_order=True).iter_rows(named=True)
        )
        + f"  ·  saved {summary['artifact']}",
        soft_wrap=True,
    )
