"""`personactl generate`: contrastive responses for a trait (model persona)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    LazyProgress,
    emit_json,
    guarded,
    load_engine,
    log,
    open_workspace,
    placement,
    settings_from,
    trait_lock,
)

Questions = Annotated[
    Optional[int],
    typer.Option("--questions", min=1, help="Use only the first N extraction questions.", show_default=False),
]
SamplesPerQuestion = Annotated[
    Optional[int],
    typer.Option(
        "--samples", "-n", min=1, help="Responses per (instruction, question) (default: 1).", show_default=False
    ),
]
Temperature = Annotated[
    Optional[float], typer.Option("--temperature", min=0.0, help="0 = greedy (default: 1.0).", show_default=False)
]


@guarded
def generate(
    trait: o.TraitName,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    questions: Questions = None,
    samples: SamplesPerQuestion = None,
    max_new_tokens: o.MaxNewTokens = None,
    temperature: Temperature = None,
    top_p: o.TopP = None,
    seed: o.Seed = None,
    batch_size: o.BatchSize = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    trust_remote_code: o.TrustRemoteCode = None,
    backend: o.Backend = None,
    tensor_parallel_size: o.TensorParallelSize = None,
    pipeline_parallel_size: o.PipelineParallelSize = None,
    executor: o.DistributedExecutor = None,
    persona: o.Persona = o.PersonaChoice.model,
    force: o.Force = False,
    json: o.Json = False,
) -> None:
    """Generate pos/neg responses for every (instruction pair × question × sample); resumable."""
    from personactl.steps.generate import generate_step
    from personactl.store.traits import load_trait

    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        revision=revision,
        samples_per_question=samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        **placement(backend, device, device_map, max_memory, (tensor_parallel_size, pipeline_parallel_size, executor)),
        trust_remote_code=trust_remote_code,
    )
    trait_obj = load_trait(trait)
    ws = open_workspace(settings)
    with trait_lock(ws, settings, trait_obj.name), LazyProgress(f"generate {trait_obj.name}") as bar:

        def on_start(total: int, done: int) -> None:
            if done:
                log(f"resuming: {done}/{total} rows already generated")
            bar.start(total, done)

        summary = generate_step(
            settings=settings,
            trait=trait_obj,
            workspace=ws,
            load=lambda: load_engine(settings, steering=False),
            max_questions=questions,
            force=force,
            on_start=on_start,
            on_batch=bar.advance,
            persona=persona.value,
        )
    report_summary(summary, json)


def report_summary(summary: dict[str, Any], json: bool) -> None:
    if summary["skipped"]:
        log(f"skipped: {summary['artifact']} is already complete ({summary['rows']} rows); --force to regenerate")
    if json:
        emit_json(summary)
    elif not summary["skipped"]:
        typer.echo(
            f"wrote {summary['rows']} rows ({summary['pairs']} pairs, {summary['response_tokens']} tokens, "
            f"{summary['truncated']} truncated, {summary['empty_responses']} empty) to {summary['artifact']}"
        )
