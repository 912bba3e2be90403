"""`personactl steer`: a batched sweep over prompts × layers × coefficients."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    LazyProgress,
    guarded,
    load_engine,
    log,
    open_workspace,
    placement,
    settings_from,
    stdout_console,
)

if TYPE_CHECKING:
    import polars as pl

Prompts = Annotated[
    Optional[list[str]], typer.Option("--prompt", "-p", help="A user message (repeatable).", show_default=False)
]
PromptsFile = Annotated[
    Optional[Path], typer.Option("--prompts-file", help="One user message per line.", show_default=False)
]
Coefficients = Annotated[
    str, typer.Option("--coefficients", "-c", help="Comma list of α, e.g. --coefficients=-2,-1,0,1,2.")
]
SystemPrompt = Annotated[
    Optional[str], typer.Option("--system", help="System prompt for every message.", show_default=False)
]
Temperature = Annotated[
    float, typer.Option("--temperature", min=0.0, help="0 = greedy (the default, for comparability).")
]
RowsPerBatch = Annotated[
    Optional[int], typer.Option("--batch-size", min=1, help="Rows per batched call (default: 32).", show_default=False)
]
JsonLines = Annotated[bool, typer.Option("--json", help="JSON lines, one per generation, to stdout.")]
SweptVector = Annotated[
    Optional[str],
    typer.Option(
        "--vector",
        "-v",
        help="Vector file, or a trait name extracted in the workspace for --model: swept over --layers × "
        "--coefficients (optional with --steer).",
        show_default=False,
    ),
]

When = Annotated[
    Optional[str],
    typer.Option(
        "--when",
        help="Steer only prompts whose last-token projection on a condition vector is above a threshold: "
        "VECTOR[@position[/aggregator]]:LAYER:THRESHOLD (see `personactl condition fit`); others stay unsteered.",
        show_default=False,
    ),
]


@guarded
def steer(
    vector: SweptVector = None,
    plan: o.SteerPlan = None,
    when: When = None,
    prompt: Prompts = None,
    prompts_file: PromptsFile = None,
    layers: o.MiddleLayer = None,
    coefficients: Coefficients = "-1,0,1",
    position: o.VectorPosition = o.PositionChoice.response_avg,
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    steer_positions: o.SteerPositions = o.SteerMode.all,
    old_positions: o.OldSteerPositions = None,
    norm: o.Norm = o.NormMode.raw,
    system: SystemPrompt = None,
    max_new_tokens: o.MaxNewTokens = None,
    temperature: Temperature = 0.0,
    top_p: o.TopP = None,
    seed: o.Seed = None,
    batch_size: RowsPerBatch = None,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    trust_remote_code: o.TrustRemoteCode = None,
    backend: o.Backend = None,
    tensor_parallel_size: o.TensorParallelSize = None,
    pipeline_parallel_size: o.PipelineParallelSize = None,
    executor: o.DistributedExecutor = None,
    json: JsonLines = False,
) -> None:
    """Generate with α·v added at each chosen layer; the whole grid runs as batched generation."""
    from personactl.backends import Sampling
    from personactl.core.ranges import parse_floats, parse_ranges
    from personactl.steps.steer import steer_step

    positions = o.steer_positions(steer_positions, old_positions)
    alphas = parse_floats(coefficients)
    layer_list = parse_ranges(layers) if layers else None
    messages = read_prompts(prompt, prompts_file)
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
        **placement(backend, device, device_map, max_memory, (tensor_parallel_size, pipeline_parallel_size, executor)),
        trust_remote_code=trust_remote_code,
    )
    ws = open_workspace(settings)
    condition, terms = checked_before_loading(when, plan, settings.backend)
    lm = load_engine(settings, steering=True, positions=positions)
    choice = {"position": position.value, "aggregator": aggregator.value, "positions": positions}
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
            **choice,
            norm=norm.value,
            sampling=Sampling(settings.max_new_tokens, temperature, settings.top_p),
            plan_specs=terms,
            condition=condition,
            on_start=bar.start,
            on_chunk=bar.advance,
        )
    _report(table, summary, choice, json)


def _report(table: pl.DataFrame, summary: dict[str, Any], choice: dict[str, str], json: bool) -> None:
    """Warnings to stderr, then the rows: JSON lines or one rich table per prompt."""
    for warning in summary["warnings"]:
        log(f"warning: {warning}")
    if json:
        return _print_json(table, summary, choice)
    _print_tables(table, summary)


def _print_json(table: pl.DataFrame, summary: dict[str, Any], choice: dict[str, str]) -> None:
    for row in table.iter_rows(named=True):
        typer.echo(jsonlib.dumps({"vector": summary["vector"], **choice, **row}))


def checked_before_loading(when: str | None, plan: list[str] | None, backend: str) -> tuple[Any, list[Any]]:
    """The --when condition and the --steer terms, parsed (and the condition refused where the
    engine reads no activations) before minutes of model loading."""
    from personactl.core.steer_plan import parse_term
    from personactl.steps.condition import check_condition

    return (check_condition(when, backend) if when else None), [parse_term(spec) for spec in plan or ()]


def read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The --prompt messages, then the non-blank lines of --prompts-file; at least one."""
    from personactl.errors import InputError

    messages = list(prompts or [])
    if prompts_file is not None:
        from personactl.store.text_input import read_user_text

        messages += [line for line in read_user_text(prompts_file, "prompts file").splitlines() if line.strip()]
    if not messages:
        raise InputError("no prompt given", hint="pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return messages


def _print_tables(table: pl.DataFrame, summary: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    for _, group in table.group_by("prompt_index", maintain_order=True):
        prompt = group["prompt"][0]
        title = f"[bold]{escape(prompt)}[/]" + _condition_note(group.row(0, named=True))
        t = Table(
            "layer",
            "α",
            "‖α·v‖",
            "tokens",
            "response",
            title=title,
            show_lines=True,
            title_justify="left",
        )
        for row in group.iter_rows(named=True):
            layer = "baseline" if row["baseline"] else "plan" if row["layer"] is None else str(row["layer"])
            t.add_row(
                layer,
                f"{row['coefficient']:g}",
                f"{row['effective_norm']:.2f}",
                str(row["n_tokens"]),
                escape(row["text"].strip()),
                style="dim" if row["baseline"] else None,
            )
        console.print(t)
    swept = table.filter(table["layer"].is_not_null()).unique("layer", maintain_order=True)
    norms = ", ".join(f"{r['layer']}={r['vector_norm']:.2f}" for r in swept.iter_rows(named=True))
    plan = summary.get("plan")
    if plan:
        terms = "; ".join(f"{t['spec']} (applied {t['applied']})" for t in plan["terms"])
        console.print(f"plan rows also follow: {escape(terms)}", soft_wrap=True)
    condition = summary.get("condition")
    if condition:
        shown = f"{condition['passed']} of {len(condition['projections'])} prompts steered"
        console.print(f"when {escape(condition['spec'])}: {shown}", soft_wrap=True)
    where = f"norm mode {summary['norm']}: ‖v‖ per layer {norms}  ·  " if norms else ""
    console.print(f"{where}saved {summary['artifact']}", soft_wrap=True)


def _condition_note(row: dict[str, Any]) -> str:
    """`--when`: the prompt's projection and whether steering acted on it, beside its title."""
    if row["condition_passed"] is None:
        return ""
    verdict = "steered" if row["condition_passed"] else "not steered: rows = baseline"
    return f"  [dim](condition projection {row['condition_projection']:.4g}, {verdict})[/]"
