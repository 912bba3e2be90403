"""`personactl score`: judge every response for the trait and for coherence, then filter pairs.

Filter (persona-vectors' rule, row-paired): keep a pair only when pos trait ≥ T, neg trait < T and
both sides' coherence ≥ C (T = C = 50 by default). A missing score never passes.

A judgement that failed (the judge gave no answer) leaves the scores file incomplete: it is saved,
marked incomplete in its manifest, the command exits 2 saying how many failed and why, `extract`
refuses it, and a plain rerun sends only the failed ones (answers come from the cache).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.errors import ConfigError, InputError, JudgeError
from personactl.judging.remote import COHERENCE_RUBRIC, JudgeCache, Judgement, RemoteJudge
from personactl.steps.skeleton import StepArtifact
from personactl.store.workspace import read_table

if TYPE_CHECKING:
    from personactl.judging.local import LocalJudge
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

SCORES_SCHEMA = {
    "pair_id": pl.String,
    "polarity": pl.String,
    "trait_score": pl.Float64,  # 0–100, null when the judge gave none
    "trait_reason": pl.String,  # why trait_score is null
    "coherence_score": pl.Float64,
    "coherence_reason": pl.String,
    "keep": pl.Boolean,  # the pair passes the filter (same value on both rows of a pair)
    "judge_model": pl.String,
}


def reason_counts(judgements: list[Judgement]) -> dict[str, int]:
    """Why judgements have no score, counted (numbers in reasons are dropped so like counts with like)."""
    counts = Counter(re.sub(r"[0-9.]+ probability", "too little probability", j.reason or "") for j in judgements)
    return dict(counts.most_common())


def describe_reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason.removeprefix('transient: ')} ×{n}" for reason, n in counts.items())


def coherence_prompt(question: str, answer: str) -> str:
    return COHERENCE_RUBRIC.replace("{question}", question).replace("{answer}", answer)


def apply_filter(scores: pl.DataFrame, trait_threshold: float, coherence_threshold: float) -> pl.DataFrame:
    """Add `keep` per pair: pos trait ≥ T, neg trait < T, both coherence ≥ C; nulls fail."""
    row_ok = (pl.col("coherence_score") >= coherence_threshold) & pl.when(pl.col("polarity") == "pos").then(
        pl.col("trait_score") >= trait_threshold
    ).otherwise(pl.col("trait_score") < trait_threshold)
    flagged = scores.with_columns(row_ok.fill_null(False).alias("_ok"))
    pairs = flagged.group_by("pair_id").agg((pl.col("_ok").all() & (pl.len() == 2)).alias("keep"))
    return flagged.drop("_ok", "keep", strict=False).join(pairs, on="pair_id", how="left")


LOCAL_PREFIX = "local:"


def effective_thresholds(settings: Settings, trait: Trait) -> tuple[float, float]:
    """(trait, coherence) thresholds: flags/env/toml when set, else the trait file's (50 by default)."""
    trait_t = settings.trait_threshold if settings.trait_threshold is not None else trait.thresholds.trait
    coherence_t = (
        settings.coherence_threshold if settings.coherence_threshold is not None else trait.thresholds.coherence
    )
    return trait_t, coherence_t


def make_judge(settings: Settings, cache: JudgeCache | None, *, require_key: bool = True, load: Callable | None = None):
    """A RemoteJudge, or a LocalJudge for `local:<model>` (`load(spec)` loads that model)."""
    if settings.judge_model.startswith(LOCAL_PREFIX):
        from personactl.judging.local import LocalJudge

        spec = settings.judge_model[len(LOCAL_PREFIX) :]
        if not spec:
            raise ConfigError("--judge local: needs a model", hint="e.g. --judge local:smollm2-135m")
        return LocalJudge(load(spec), cache)
    api_key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else os.environ.get("OPENAI_API_KEY")
    if require_key and not api_key and not settings.judge_base_url:
        raise ConfigError(
            "no judge configured: OpenAI needs an API key",
            hint="set OPENAI_API_KEY (or PERSONACTL_JUDGE_API_KEY), point --judge-base-url at your own server, "
            "or judge offline with --judge local:smollm2-135m (weak)",
        )
    return RemoteJudge(
        settings.judge_model,
        base_url=settings.judge_base_url,
        api_key=api_key,
        mode=settings.judge_mode,
        concurrency=settings.judge_concurrency,
        timeout=settings.judge_timeout,
        max_retries=settings.judge_max_retries,
        cache=cache,
    )


def responses_to_score(
    workspace: Workspace, slug: str, model: str, trait: Trait, persona: str
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The trait's finished responses table and its manifest; an error when the table holds no row."""
    responses_path, manifest = workspace.require_responses(slug, model, trait, persona)
    responses = read_table(responses_path)
    if responses.height == 0:
        raise InputError(
            f"{responses_path} has no responses to score",
            hint=f"regenerate: personactl generate --trait {trait.name} --force",
        )
    return responses, manifest


def judge_prompts(responses: pl.DataFrame, trait: Trait, persona: str) -> list[str]:
    """Two prompts per response, in row order: the trait's rubric, then coherence. For the user
    persona the trait is the user's (their message); the reply is checked for coherence."""
    prompts = []
    for row in responses.iter_rows(named=True):
        if persona == "user":
            from personactl.steps.user_persona import user_trait_prompt

            prompts.append(user_trait_prompt(trait, row["question"]))
        else:
            prompts.append(trait.judge_prompt(row["question"], row["response"]))
        prompts.append(coherence_prompt(row["question"], row["response"]))
    return prompts


def scores_fingerprint(settings: Settings, trait: Trait, responses_fingerprint: Any, persona: str) -> dict[str, Any]:
    """The inputs a scores table is made from (the thresholds are not: a new filter reuses the
    judgements). A local judge has no endpoint or mode."""
    local = settings.judge_model.startswith(LOCAL_PREFIX)
    fingerprint = {
        "responses": responses_fingerprint,
        "trait_sha256": trait.sha256,
        "judge_model": settings.judge_model,
        "judge_base_url": None if local else settings.judge_base_url,
        "judge_mode": "local" if local else settings.judge_mode,
    }
    if persona != "model":
        fingerprint["persona"] = persona
    return fingerprint


def dry_run_estimate(settings: Settings, to_send: list[str], cached: int) -> dict[str, Any]:
    """What a run would send: judgements not in the cache, and roughly how many prompt tokens."""
    local = settings.judge_model.startswith(LOCAL_PREFIX)
    return {
        "dry_run": True,
        "judgements": len(to_send),
        "cached": cached,
        "local": local,
        "estimated_prompt_tokens": sum(len(p) for p in to_send) // 4,
        "requests_per_judgement": "1" if settings.judge_mode == "single" or local else "1 (single) or 3-6 (digits)",
    }


def scores_table(
    responses: pl.DataFrame, judgements: list[Judgement], judge_model: str, trait_t: float, coherence_t: float
) -> pl.DataFrame:
    """One row per response with its two scores (and why one is missing), filtered pair by pair."""
    trait_j, coherence_j = judgements[0::2], judgements[1::2]
    scores = pl.DataFrame(
        {
            "pair_id": responses["pair_id"],
            "polarity": responses["polarity"],
            "trait_score": [j.score for j in trait_j],
            "trait_reason": [j.reason for j in trait_j],
            "coherence_score": [j.score for j in coherence_j],
            "coherence_reason": [j.reason for j in coherence_j],
            "keep": [False] * responses.height,
            "judge_model": [judge_model] * responses.height,
        },
        schema=SCORES_SCHEMA,
    )
    return apply_filter(scores, trait_t, coherence_t).select(list(SCORES_SCHEMA))


def score_counts(scores: pl.DataFrame, judgements: list[Judgement], requests_sent: int, cached: int) -> dict[str, Any]:
    """The manifest's and the summary's counts: rows, pairs kept, missing scores and why, requests."""
    return {
        "rows": scores.height,
        "pairs": scores["pair_id"].n_unique(),
        "kept_pairs": scores.filter(pl.col("keep"))["pair_id"].n_unique(),
        "missing_trait": scores["trait_score"].null_count(),
        "missing_coherence": scores["coherence_score"].null_count(),
        "requests_sent": requests_sent,
        "cache_hits": cached,
        "failed": sum(1 for j in judgements if j.transient),
        "no_score_reasons": reason_counts([j for j in judgements if j.score is None]),
    }


def judge_description(settings: Settings, judge: RemoteJudge | LocalJudge) -> dict[str, Any]:
    """The judge as the manifest records it (a remote judge also with the mode it used)."""
    info = {"model": settings.judge_model, "identity": judge.identity}
    if not settings.judge_model.startswith(LOCAL_PREFIX):
        info["mode"] = judge.resolved_mode or settings.judge_mode
    return info


def check_answered(judgements: list[Judgement], judge_model: str) -> list[Judgement]:
    """The failed judgements (the judge gave no answer); an error, with nothing written, when every
    one failed."""
    failures = [j for j in judgements if j.transient]
    if failures and len(failures) == len(judgements):
        raise JudgeError(
            f"the judge {judge_model} answered none of {len(judgements)} judgements "
            f"({describe_reasons(reason_counts(failures))}); nothing was written"
        )
    return failures


def score_step(
    *,
    settings: Settings,
    workspace: Workspace,
    trait: Trait,
    force: bool,
    dry_run: bool = False,
    on_start: Callable[[int, int], None] = lambda total, done: None,
    on_done: Callable[[Judgement], None] = lambda j: None,
    load: Callable[[str], Any] | None = None,
    on_judge: Callable[[Any], None] = lambda judge: None,
    persona: str = "model",
) -> tuple[pl.DataFrame | None, dict[str, Any]]:
    """Judge every response twice (trait, coherence), apply the filter, save scores + manifest.

    `load(spec)` loads a model for a local judge; `on_judge(judge)` sees the judge before it runs."""
    from personactl.model.loading import resolve_model

    slug = resolve_model(settings.model).slug
    responses, responses_manifest = responses_to_score(workspace, slug, settings.model, trait, persona)
    prompts = judge_prompts(responses, trait, persona)
    trait_t, coherence_t = effective_thresholds(settings, trait)
    fingerprint = scores_fingerprint(settings, trait, responses_manifest.get("fingerprint"), persona)
    filter_ = {"trait_threshold": trait_t, "coherence_threshold": coherence_t}
    summary = {"trait": trait.name, "judge_model": settings.judge_model}
    out = StepArtifact(workspace, workspace.scores_path(slug, trait.name, persona), "scores", fingerprint, summary)
    if not dry_run and out.current(force) and out.manifest().get("filter") == filter_:
        return read_table(out.path), out.skipped()
    # (new thresholds: the judgements come back from the cache and only the filter is redone)
    cache = JudgeCache(workspace.judge_cache_path)
    try:
        judge = make_judge(settings, cache, require_key=not dry_run, load=load)
        to_send = [p for p in prompts if cache.get(JudgeCache.key(judge.identity, p)) is None]
        cached = len(prompts) - len(to_send)
        if dry_run:
            return None, {**out.summary, **dry_run_estimate(settings, to_send, cached)}
        on_judge(judge)
        on_start(len(prompts), cached)
        start = time.perf_counter()
        judgements = judge.judge(prompts, on_done)
        seconds = round(time.perf_counter() - start, 2)
    finally:
        cache.close()
    failures = check_answered(judgements, settings.judge_model)
    scores = scores_table(responses, judgements, settings.judge_model, trait_t, coherence_t)
    counts = score_counts(scores, judgements, judge.requests_sent, cached)
    judge_info = judge_description(settings, judge)
    trait_info = {"name": trait.name, "sha256": trait.sha256}
    out.commit(
        scores.write_parquet,
        settings=settings,
        trait=trait_info,
        judge=judge_info,
        filter=filter_,
        counts=counts,
        complete=not failures,
        timings={"seconds": seconds},
    )
    if failures:
        raise JudgeError(
            f"{len(failures)} of {len(judgements)} judgements failed ({describe_reasons(reason_counts(failures))}); "
            f"{out.path} is saved but incomplete",
            hint="rerun the same command: it sends only the failed judgements (answers are cached)",
        )
    by_polarity = polarity_summary(scores)
    return scores, out.done(**counts, judge=judge_info, filter=filter_, seconds=seconds, by_polarity=by_polarity)


def polarity_summary(scores: pl.DataFrame) -> list[dict[str, Any]]:
    rows = scores.group_by("polarity").agg(
        pl.col("trait_score").mean().alias("mean_trait"),
        pl.col("coherence_score").mean().alias("mean_coherence"),
        pl.col("trait_score").null_count().alias("missing_trait"),
        pl.col("coherence_score").null_count().alias("missing_coherence"),
        pl.len().alias("rows"),
    )
    return rows.sort("polarity", descending=True).to_dicts()
