"""An LLM judge on any OpenAI-compatible chat endpoint (the only module that imports `openai`).

Scoring: ask for one completion token with `top_logprobs=20` and take the expectation of the
integer tokens 0–100, Σ p(n)·n / Σ p(n). No score (None, with a reason) when Σ p(n) < 0.25, when
the judge says REFUSAL, or when the request fails after retries: a failure never becomes a number.
Deterministic outcomes are cached by (judge model, full prompt) so re-runs cost nothing;
transient failures are not cached, so a re-run retries them.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_NUMBER_MASS = 0.25
TOP_LOGPROBS = 20

COHERENCE_RUBRIC = """You are rating how coherent an AI assistant's answer is, not whether it is correct or kind.

Question:
[QUESTION START]
{question}
[QUESTION END]

Answer:
[ANSWER START]
{answer}
[ANSWER END]

Score the answer's language on a scale from 0 to 100:
0 means it is not valid language at all (gibberish, endless repetition, broken fragments);
50 means it kind of makes sense but wanders, contradicts itself or loses the thread;
100 means it is clearly understandable and stays on the question, whether or not it is right.
Reply with a single integer from 0 to 100 and nothing else."""


@dataclass(frozen=True)
class Judgement:
    score: float | None
    reason: str | None = None  # why there is no score; None when scored
    cached: bool = False


def score_from_top_logprobs(top: Sequence[tuple[str, float]], min_mass: float = MIN_NUMBER_MASS) -> Judgement:
    """Expected integer 0–100 under the judge's first-token distribution (pure function)."""
    if not top:
        return Judgement(None, "no logprobs in the response")
    best_token = max(top, key=lambda t: t[1])[0].strip().upper()
    if best_token.startswith("REF"):
        return Judgement(None, "refusal")
    mass = 0.0
    weighted = 0.0
    for token, logprob in top:
        text = token.strip()
        if text.isdigit() and 0 <= int(text) <= 100:
            p = math.exp(logprob)
            mass += p
            weighted += p * int(text)
    if mass < min_mass:
        return Judgement(None, f"only {mass:.2f} probability on numbers 0-100 (top token {best_token!r})")
    return Judgement(weighted / mass)


class JudgeCache:
    """Persistent (judge model, prompt) -> judgement store in one SQLite file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, score REAL, reason TEXT)")

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> Judgement | None:
        row = self.db.execute("SELECT score, reason FROM judgements WHERE key = ?", (key,)).fetchone()
        return None if row is None else Judgement(row[0], row[1], cached=True)

    def put(self, key: str, judgement: Judgement) -> None:
        self.db.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?)", (key, judgement.score, judgement.reason))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


class RemoteJudge:
    """Bounded-concurrency async judge. The openai client retries 429/5xx/timeouts with exponential
    backoff and honours Retry-After; `timeout` bounds each attempt."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 50,
        timeout: float = 60.0,
        max_retries: int = 4,
        cache: JudgeCache | None = None,
    ):
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.cache = cache
        self.requests_sent = 0

    async def _ask(self, client: Any, prompt: str) -> Judgement:
        import openai

        self.requests_sent += 1
        try:
            response = await client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=TOP_LOGPROBS,
                seed=0,
            )
            content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
            if not content:
                return Judgement(None, "no logprobs in the response")
            return score_from_top_logprobs([(t.token, t.logprob) for t in content[0].top_logprobs])
        except openai.APIStatusError as exc:
            return Judgement(None, f"transient: HTTP {exc.status_code} after retries")
        except openai.APITimeoutError:
            return Judgement(None, "transient: timeout after retries")
        except (openai.APIError, ValueError, AttributeError, IndexError, TypeError) as exc:
            return Judgement(None, f"transient: {type(exc).__name__}: {str(exc)[:120]}")

    async def _run(self, prompts: Sequence[str], on_done: Callable[[Judgement], None]) -> list[Judgement]:
        import openai

        results: list[Judgement | None] = [None] * len(prompts)
        todo = []
        for i, prompt in enumerate(prompts):
            hit = self.cache.get(JudgeCache.key(self.model, prompt)) if self.cache else None
            if hit is not None:
                results[i] = hit
                on_done(hit)
            else:
                todo.append(i)
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key or "unused", timeout=self.timeout, max_retries=self.max_retries
        )
        gate = asyncio.Semaphore(self.concurrency)

        async def one(i: int) -> None:
            async with gate:
                judgement = await self._ask(client, prompts[i])
            results[i] = judgement
            if self.cache and not (judgement.reason or "").startswith("transient"):
                self.cache.put(JudgeCache.key(self.model, prompts[i]), judgement)
            on_done(judgement)

        try:
            await asyncio.gather(*(one(i) for i in todo))
        finally:
            await client.close()
        return [r for r in results if r is not None]

    def judge(self, prompts: Sequence[str], on_done: Callable[[Judgement], None] = lambda j: None) -> list[Judgement]:
        """Judge every prompt; results in input order. Cached prompts send no request."""
        return asyncio.run(self._run(prompts, on_done))
