"""`personactl score`: judge responses for trait and coherence, and filter the pairs."""

from __future__ import annotations

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


@guarded
def score(
    trait: o.TraitName,
    judge_model: Annotated[
        Optional[str],
        typer.Option(
            "--judge",
            "--judge-model",
            help="Judge model on the endpoint, or local:<model> to judge in process (offline) (default: gpt-4.1-mini).",
            show_default=False,
        ),
    ] = None,
    judge_mode: Annotated[
        Optional[str],
        typer.Option(
            "--judge-mode",
            help="single (one token per number), digits (digit by digit, for Qwen/Llama-2-style tokenizers) "
            "or auto (probe the server) (default: auto).",
            show_default=False,
        ),
    ] = None,
    judge_base_url: Annotated[
        Optional[str],
        typer.Option(
            "--judge-base-url",
            help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI).",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        Optional[int],
        typer.Option("--concurrency", min=1, help="Requests in flight (default: 50).", show_default=False),
    ] = None,
    timeout: Annotated[
        Optional[float],
        typer.Option("--timeout", min=0.001, help="Seconds per request attempt (default: 60).", show_default=False),
    ] = None,
    max_retries: Annotated[
        Optional[int],
        typer.Option("--max-retries", min=0, help="Retries on 429/5xx/timeouts (default: 4).", show_default=False),
    ] = None,
    trait_threshold: Annotated[
        Optional[float],
        typer.Option(
            "--trait-threshold",
            min=0,
            max=100,
            help="Trait score a positive response needs; a negative one must stay below it "
            "(default: the trait file's, else 50).",
            show_default=False,
        ),
    ] = None,
    coherence_threshold: Annotated[
        Optional[float],
        typer.Option(
            "--coherence-threshold",
            min=0,
            max=100,
            help="Coherence a response needs to be kept (default: the trait file's, else 50).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say how many requests and tokens it would send.")
    ] = False,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    persona: Persona = "model",
    force: o.Force = False,
    json: o.Json = False,
) -> None:
    """Score every response (trait rubric + coherence) with an LLM judge; keep pairs that contrast."""
    from personactl.steps.score import score_step
    from personactl.store.traits import load_trait

    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        judge_model=judge_model,
        judge_mode=judge_mode,
        judge_base_url=judge_base_url,
        judge_concurrency=concurrency,
        judge_timeout=timeout,
        judge_max_retries=max_retries,
        trait_threshold=trait_threshold,
        coherence_threshold=coherence_threshold,
    )
    trait_obj = load_trait(trait)
    ws = open_workspace(settings)
    with trait_lock(ws, settings, trait_obj.name), LazyProgress(f"score {trait_obj.name}") as bar:
        state = {"cached": 0, "failed": 0, "done": 0}

        def on_start(total: int, cached: int) -> None:
            state["cached"] = cached
            bar.start(total)

        def on_done(judgement) -> None:
            state["done"] += 1
            state["failed"] += judgement.transient
            elapsed = bar.bar.tasks[bar.task].elapsed or 1e-9
            bar.note(
                f"{state['done'] / elapsed:.0f} judgements/s · {state['cached']} cached · {state['failed']} failed"
            )

        def on_judge(judge) -> None:
            if getattr(judge, "is_weak", False):
                log(
                    f"warning: {judge.model} is a small local judge; its scores are rough. "
                    "Use a large judge (--judge-base-url or OpenAI) for vectors you rely on"
                )

        def load(spec: str):
            return load_model_from(settings.model_copy(update={"model": spec}))

        scores, summary = score_step(
            settings=settings,
            workspace=ws,
            trait=trait_obj,
            force=force,
            dry_run=dry_run,
            on_start=on_start,
            on_done=on_done,
            load=load,
            on_judge=on_judge,
            persona=check_persona(persona),
        )
    if summary.get("dry_run"):
        if json:
            emit_json(summary)
        else:
            where = "in process" if summary["local"] else f"with {summary['requests_per_judgement']} request(s) each"
            typer.echo(
                f"would make {summary['judgements']} judgements {where} with {settings.judge_model} "
                f"(~{summary['estimated_prompt_tokens']} prompt tokens, 1 completion token per request); "
                f"{summary['cached']} already cached"
            )
        return
    if summary.get("skipped"):
        log(f"skipped: {summary['artifact']} is already complete; --force to rescore")
        summary["kept_pairs"] = scores.filter(scores["keep"])["pair_id"].n_unique()
        summary["pairs"] = scores["pair_id"].n_unique()
    if summary.get("no_score_reasons"):
        from personactl.steps.score import describe_reasons

        missing = sum(summary["no_score_reasons"].values())
        log(f"{missing} judgements without a score: {describe_reasons(summary['no_score_reasons'])}")
    if json:
        emit_json(summary)
        return
    from rich.table import Table

    if "by_polarity" in summary:
        table = Table(
            "polarity",
            "rows",
            "mean trait",
            "mean coherence",
            "no trait score",
            "no coherence score",
            title=f"scores {trait_obj.name} · judge {settings.judge_model}",
        )
        for r in summary["by_polarity"]:
            fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
            table.add_row(
                r["polarity"],
                str(r["rows"]),
                fmt(r["mean_trait"]),
                fmt(r["mean_coherence"]),
                str(r["missing_trait"]),
                str(r["missing_coherence"]),
            )
        stdout_console().print(table)
    typer.echo(f"{summary['kept_pairs']} of {summary['pairs']} pairs pass the filter · {summary['artifact']}")
