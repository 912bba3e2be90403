"""`personactl score`: judge responses for trait and coherence, and filter the pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

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

if TYPE_CHECKING:
    import polars as pl

TraitThreshold = Annotated[
    Optional[float],
    typer.Option(
        "--trait-threshold",
        min=0,
        max=100,
        help="Trait score a positive response needs; a negative one must stay below it "
        "(default: the trait file's, else 50).",
        show_default=False,
    ),
]
CoherenceThreshold = Annotated[
    Optional[float],
    typer.Option(
        "--coherence-threshold",
        min=0,
        max=100,
        help="Coherence a response needs to be kept (default: the trait file's, else 50).",
        show_default=False,
    ),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Only say how many requests and tokens it would send.")]


@guarded
def score(
    trait: o.TraitName,
    judge_model: o.JudgeModel = None,
    judge_mode: o.JudgeMode = None,
    judge_base_url: o.JudgeBaseUrl = None,
    concurrency: o.JudgeConcurrency = None,
    timeout: o.JudgeTimeout = None,
    max_retries: o.JudgeMaxRetries = None,
    trait_threshold: TraitThreshold = None,
    coherence_threshold: CoherenceThreshold = None,
    dry_run: DryRun = False,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    persona: o.Persona = o.PersonaChoice.model,
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
        progress = JudgeProgress(bar)
        scores, summary = score_step(
            settings=settings,
            workspace=ws,
            trait=trait_obj,
            force=force,
            dry_run=dry_run,
            on_start=progress.start,
            on_done=progress.done,
            load=lambda spec: load_model_from(settings.model_copy(update={"model": spec})),
            on_judge=warn_if_weak,
            persona=persona.value,
        )
    if summary.get("dry_run"):
        print_dry_run(summary, settings.judge_model, json)
    else:
        print_scores(scores, summary, f"scores {trait_obj.name} · judge {settings.judge_model}", json)


class JudgeProgress:
    """The progress bar's rate column: judgements per second, cached and failed."""

    def __init__(self, bar: LazyProgress) -> None:
        self.bar = bar
        self.cached = self.failed = self.done_count = 0

    def start(self, total: int, cached: int) -> None:
        self.cached = cached
        self.bar.start(total)

    def done(self, judgement: Any) -> None:
        self.done_count += 1
        self.failed += judgement.transient
        elapsed = self.bar.bar.tasks[self.bar.task].elapsed or 1e-9
        self.bar.note(f"{self.done_count / elapsed:.0f} judgements/s · {self.cached} cached · {self.failed} failed")


def warn_if_weak(judge: Any) -> None:
    if getattr(judge, "is_weak", False):
        log(
            f"warning: {judge.model} is a small local judge; its scores are rough. "
            "Use a large judge (--judge-base-url or OpenAI) for vectors you rely on"
        )


def print_dry_run(summary: dict[str, Any], judge_model: str, json: bool) -> None:
    """`score --dry-run`: the judgements and tokens it would send."""
    if json:
        emit_json(summary)
        return
    where = "in process" if summary["local"] else f"with {summary['requests_per_judgement']} request(s) each"
    typer.echo(
        f"would make {summary['judgements']} judgements {where} with {judge_model} "
        f"(~{summary['estimated_prompt_tokens']} prompt tokens, 1 completion token per request); "
        f"{summary['cached']} already cached"
    )


def print_scores(scores: pl.DataFrame, summary: dict[str, Any], title: str, json: bool) -> None:
    """What was skipped or left without a score (stderr), then the summary or a table by polarity."""
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
    if "by_polarity" in summary:
        stdout_console().print(polarity_table(summary["by_polarity"], title))
    typer.echo(f"{summary['kept_pairs']} of {summary['pairs']} pairs pass the filter · {summary['artifact']}")


def polarity_table(by_polarity: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(
        "polarity", "rows", "mean trait", "mean coherence", "no trait score", "no coherence score", title=title
    )
    fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
    for r in by_polarity:
        table.add_row(
            r["polarity"],
            str(r["rows"]),
            fmt(r["mean_trait"]),
            fmt(r["mean_coherence"]),
            str(r["missing_trait"]),
            str(r["missing_coherence"]),
        )
    return table
