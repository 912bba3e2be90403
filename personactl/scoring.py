"""`personactl score`: judge every response for the trait and for coherence, then filter pairs.

Filter (persona-vectors' rule, row-paired): keep a pair only when pos trait ≥ T, neg trait < T and
both sides' coherence ≥ C (T = C = 50 by default). A missing score never passes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import polars as pl

from personactl.errors import ConfigError
from personactl.judge import COHERENCE_RUBRIC, JudgeCache, Judgement, RemoteJudge

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


def make_judge(settings: Any, cache: JudgeCache | None) -> RemoteJudge:
    api_key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else os.environ.get("OPENAI_API_KEY")
    if not api_key and not settings.judge_base_url:
        raise ConfigError(
            "no judge configured: OpenAI needs an API key",
            hint="set OPENAI_API_KEY (or PERSONACTL_JUDGE_API_KEY), or point --judge-base-url at your own server",
        )
    return RemoteJudge(
        settings.judge_model,
        base_url=settings.judge_base_url,
        api_key=api_key,
        concurrency=settings.judge_concurrency,
        timeout=settings.judge_timeout,
        max_retries=settings.judge_max_retries,
        cache=cache,
    )


def score_step(
    *,
    settings: Any,
    workspace: Any,
    trait: Any,
    force: bool,
    dry_run: bool = False,
    on_start: Callable[[int, int], None] = lambda total, done: None,
    on_done: Callable[[Judgement], None] = lambda j: None,
) -> tuple[pl.DataFrame | None, dict[str, Any]]:
    from personactl.models import resolve_model
    from personactl.settings import masked_dump

    slug = resolve_model(settings.model).slug
    responses_path, responses_manifest = workspace.require_responses(slug, settings.model, trait)
    responses = pl.read_parquet(responses_path)
    prompts = []
    for row in responses.iter_rows(named=True):
        prompts.append(trait.judge_prompt(row["question"], row["response"]))
        prompts.append(coherence_prompt(row["question"], row["response"]))
    output = workspace.scores_path(slug, trait.name, "model")
    fingerprint = {
        "responses": workspace.read_manifest(responses_path).get("fingerprint"),
        "trait_sha256": trait.sha256,
        "judge_model": settings.judge_model,
        "judge_base_url": settings.judge_base_url,
        "trait_threshold": settings.trait_threshold,
        "coherence_threshold": settings.coherence_threshold,
    }
    summary: dict[str, Any] = {"artifact": str(output), "trait": trait.name, "judge_model": settings.judge_model}
    cache = JudgeCache(workspace.judge_cache_path)
    try:
        to_send = [p for p in prompts if cache.get(JudgeCache.key(settings.judge_model, p)) is None]
        cached = len(prompts) - len(to_send)
        if dry_run:
            return None, {
                **summary,
                "dry_run": True,
                "requests": len(to_send),
                "cached": cached,
                "estimated_prompt_tokens": sum(len(p) for p in to_send) // 4,
                "completion_tokens_each": 1,
            }
        if not force and workspace.finished(output, fingerprint):
            return pl.read_parquet(output), {**summary, "skipped": True}
        judge = make_judge(settings, cache)
        on_start(len(prompts), cached)
        start = time.perf_counter()
        judgements = judge.judge(prompts, on_done)
        seconds = time.perf_counter() - start
    finally:
        cache.close()
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
            "judge_model": [settings.judge_model] * responses.height,
        },
        schema=SCORES_SCHEMA,
    )
    scores = apply_filter(scores, settings.trait_threshold, settings.coherence_threshold).select(list(SCORES_SCHEMA))
    from personactl.workspace import atomic_path

    with atomic_path(output) as tmp:
        scores.write_parquet(tmp)
    counts = {
        "rows": scores.height,
        "pairs": scores["pair_id"].n_unique(),
        "kept_pairs": scores.filter(pl.col("keep"))["pair_id"].n_unique(),
        "missing_trait": scores["trait_score"].null_count(),
        "missing_coherence": scores["coherence_score"].null_count(),
        "requests_sent": judge.requests_sent,
        "cache_hits": cached,
    }
    workspace.write_manifest(
        output,
        "scores",
        fingerprint=fingerprint,
        settings=masked_dump(settings),
        trait={"name": trait.name, "sha256": trait.sha256},
        counts=counts,
        timings={"seconds": round(seconds, 2)},
    )
    return scores, {
        **summary,
        "skipped": False,
        **counts,
        "seconds": round(seconds, 2),
        "by_polarity": polarity_summary(scores),
    }


def polarity_summary(scores: pl.DataFrame) -> list[dict[str, Any]]:
    rows = scores.group_by("polarity").agg(
        pl.col("trait_score").mean().alias("mean_trait"),
        pl.col("coherence_score").mean().alias("mean_coherence"),
        pl.col("trait_score").null_count().alias("missing_trait"),
        pl.col("coherence_score").null_count().alias("missing_coherence"),
        pl.len().alias("rows"),
    )
    return rows.sort("polarity", descending=True).to_dicts()
