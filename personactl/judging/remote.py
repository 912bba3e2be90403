"""An LLM judge on any OpenAI-compatible chat endpoint.

Scoring: the expectation of the judge's answer over the integers 0–100, Σ p(n)·n / Σ p(n). No
score (None, with a reason) when Σ p(n) < 0.25, when the judge says REFUSAL, or when the request
fails after retries: a failure never becomes a number.

Two ways to read p(n) from a server (`mode`):
- `single`: one completion token with `top_logprobs=20`; right for tokenizers with one token per
  number (OpenAI's).
- `digits`: for tokenizers that split numbers into digits (Qwen, Llama-2, SmolLM2). Walk the digit
  tree: the first request gives p(first digit); each likely first digit d is sent back as an
  assistant prefill (`continue_final_message`, which vLLM and llama.cpp honour) to read
  p(end | d) and p(second digit | d), and "10" once more for "100". 3–6 requests per judgement.
- `auto` probes the server once per run ("reply with 87") and picks one of the two.

Answers (a score, a refusal, too little mass on numbers) are cached by (judge identity, full
prompt) so re-runs cost nothing. Failures (transport errors, 429/5xx, timeouts, a reply without
logprobs, a body that is not a completion) are never cached, so a plain re-run retries them; a
judge that answers nothing at all (down, wrong URL, key refused) stops the run with a JudgeError.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personactl.core.choices import JUDGE_MODES
from personactl.core.redaction import redact
from personactl.errors import ConfigError, JudgeError

MIN_NUMBER_MASS = 0.25
FAILED = "transient: "  # the reason of a judgement that is a failure, not an answer
NO_LOGPROBS = FAILED + "no logprobs in the response"
LEGACY_FAILURES = ("no logprobs in the response",)  # failures that older versions cached as answers
TOP_LOGPROBS = 20
PRUNE_BELOW = 0.01  # digit-tree branches rarer than this are not expanded (their mass counts as lost)
PROBE_PROMPT = "Reply with the number 87 and nothing else."

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

TopLogprobs = Sequence[tuple[str, float]]


@dataclass(frozen=True)
class Judgement:
    score: float | None
    reason: str | None = None  # why there is no score; None when scored
    cached: bool = False

    @property
    def transient(self) -> bool:
        """A failure (the judge gave no answer): never cached, retried by the next run."""
        return (self.reason or "").startswith(FAILED.strip()) or self.reason in LEGACY_FAILURES


def judgement_from_distribution(numbers: dict[int, float], refusal: bool, min_mass: float = MIN_NUMBER_MASS):
    """Expected value of a (partial) distribution over the integers 0–100."""
    if refusal:
        return Judgement(None, "refusal")
    mass = sum(numbers.values())
    if mass < min_mass:
        return Judgement(None, f"only {mass:.2f} probability on numbers 0-100")
    return Judgement(sum(n * p for n, p in numbers.items()) / mass)


def _is_refusal(top: TopLogprobs) -> bool:
    return bool(top) and max(top, key=lambda t: t[1])[0].strip().upper().startswith("REF")


def score_from_top_logprobs(top: TopLogprobs, min_mass: float = MIN_NUMBER_MASS) -> Judgement:
    """`single` mode: expected integer 0–100 under the first-token distribution (pure function)."""
    if not top:
        return Judgement(None, NO_LOGPROBS)
    numbers: dict[int, float] = {}
    for token, logprob in top:
        text = token.strip()
        if is_digits(text) and int(text) <= 100:
            numbers[int(text)] = numbers.get(int(text), 0.0) + math.exp(logprob)
    judgement = judgement_from_distribution(numbers, _is_refusal(top), min_mass)
    if judgement.reason and judgement.reason.startswith("only"):
        best = max(top, key=lambda t: t[1])[0]
        return Judgement(None, f"{judgement.reason} (top token {best.strip()!r})")
    return judgement


def is_digits(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts '³' and other scripts' digits)."""
    return text.isascii() and text.isdigit()


def _valid_number(text: str) -> bool:
    return is_digits(text) and int(text) <= 100 and (text == "0" or not text.startswith("0"))


def _can_continue(prefix: str) -> bool:
    """Whether another digit could still give a number ≤ 100 ("1".."9" and "10")."""
    return prefix != "0" and int(prefix + "0") <= 100


async def digit_tree(ask: Callable[[str], Any], min_mass: float = MIN_NUMBER_MASS) -> Judgement:
    """`digits` mode: p(n) = p(digits of n) · p(end | n), read by prefilling each likely prefix.

    `ask(prefix)` returns the top logprobs of the token that follows the assistant prefill
    `prefix` ("" = no prefill). After a prefix, anything but a digit ends the number; a digit that
    would pass 100 is lost mass. Two-digit numbers other than 10 are taken to end (a third digit
    would be out of range), which saves one request per branch."""
    numbers: dict[int, float] = {}

    async def expand(prefix: str, p_prefix: float, top: TopLogprobs) -> None:
        digit_mass = 0.0
        children = []
        for token, logprob in top:
            text = token if prefix else token.strip()  # " 7" after a prefix is a new word, not a digit
            if not is_digits(text):
                continue
            p = math.exp(logprob)
            digit_mass += p
            if _valid_number(prefix + text) and p_prefix * p >= PRUNE_BELOW:
                children.append((prefix + text, p_prefix * p))
        if prefix:
            numbers[int(prefix)] = numbers.get(int(prefix), 0.0) + p_prefix * max(0.0, 1.0 - digit_mass)
        to_expand = []
        for child, p in children:
            if _can_continue(child):
                to_expand.append((child, p))
            else:
                numbers[int(child)] = numbers.get(int(child), 0.0) + p
        tops = await asyncio.gather(*(ask(child) for child, _ in to_expand))
        await asyncio.gather(*(expand(child, p, t) for (child, p), t in zip(to_expand, tops, strict=True)))

    root = await ask("")
    if not root:
        return Judgement(None, NO_LOGPROBS)
    if _is_refusal(root):
        return Judgement(None, "refusal")
    await expand("", 1.0, root)
    return judgement_from_distribution(numbers, False, min_mass)


class JudgeCache:
    """Persistent (judge identity, prompt) -> judgement store in one SQLite file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path))
            self.db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, score REAL, reason TEXT)")
        except (OSError, sqlite3.Error) as exc:
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> Exception:
        from personactl.errors import WorkspaceError

        return WorkspaceError(
            f"judge cache {self.path} cannot be used: {exc}",
            hint="free space or fix its permissions; or delete it (it only saves repeated requests)",
        )

    @staticmethod
    def key(identity: str, prompt: str) -> str:
        return hashlib.sha256(f"{identity}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> Judgement | None:
        """The cached answer, or None (also for a failure an older version stored: it is asked again)."""
        row = self.db.execute("SELECT score, reason FROM judgements WHERE key = ?", (key,)).fetchone()
        hit = None if row is None else Judgement(row[0], row[1], cached=True)
        return None if hit is None or hit.transient else hit

    def put(self, key: str, judgement: Judgement) -> None:
        """Store an answer; a failure is not stored (the next run must ask again)."""
        if judgement.transient:
            return
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?)", (key, judgement.score, judgement.reason)
            )
            self.db.commit()
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        self.db.close()


def split_cached(
    cache: JudgeCache | None, identity: str, prompts: Sequence[str], on_done: Callable[[Judgement], None]
) -> tuple[list[Judgement | None], list[int]]:
    """Answers already in the cache, and the indices still to judge."""
    results: list[Judgement | None] = [None] * len(prompts)
    todo = []
    for i, prompt in enumerate(prompts):
        hit = cache.get(JudgeCache.key(identity, prompt)) if cache else None
        if hit is None:
            todo.append(i)
        else:
            results[i] = hit
            on_done(hit)
    return results, todo


def refusing_statuses() -> tuple[type[Exception], ...]:
    """Answers that mean every request will fail alike: the key is refused, or the model or URL is wrong."""
    import openai

    return (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


def remote_identity(model: str, base_url: str | None, mode: str) -> str:
    """What makes two remote judgements interchangeable: the server, the model and the method."""
    return f"remote|{base_url or 'openai'}|{model}|{mode}"


class RemoteJudge:
    """Bounded-concurrency async judge. The openai client retries 429/5xx/timeouts with exponential
    backoff and honours Retry-After; `timeout` bounds each attempt."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        mode: str = "auto",
        concurrency: int = 50,
        timeout: float = 60.0,
        max_retries: int = 4,
        cache: JudgeCache | None = None,
    ):
        if mode not in JUDGE_MODES:
            raise ConfigError(f"unknown judge mode {mode!r}", hint=f"choose {', '.join(JUDGE_MODES)}")
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.mode = mode
        self.resolved_mode: str | None = None if mode == "auto" else mode
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.cache = cache
        self.requests_sent = 0
        self.identity = remote_identity(model, base_url, mode)

    async def _top_logprobs(self, client: Any, prompt: str, prefill: str = "") -> TopLogprobs:
        """Top logprobs of the first token the judge writes (after `prefill`, if any)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
            "seed": 0,
        }
        if prefill:
            body["messages"].append({"role": "assistant", "content": prefill})
            body.update(continue_final_message=True, add_generation_prompt=False)
        async with self._gate:  # per request: a digit-tree judgement sends several
            self.requests_sent += 1
            # the client's generic POST keeps its retries, backoff and Retry-After handling but skips
            # the typed-parameter transform and response models: ~1.5 ms of CPU per request, which
            # caps throughput at 50 requests in flight
            text = await client.post("/chat/completions", body=body, cast_to=str)
        choice = json.loads(text)["choices"][0]
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            return []
        return [(t["token"], t["logprob"]) for t in content[0]["top_logprobs"]]

    async def detect_mode(self, client: Any) -> str:
        """Ask for "87": one token means `single`; "8" then "7" after a prefill of "8" means `digits`."""
        top = await self._top_logprobs(client, PROBE_PROMPT)
        tokens = [t.strip() for t, _ in sorted(top, key=lambda t: -t[1])]
        if not tokens:
            raise ConfigError(f"judge {self.model} returns no logprobs", hint="the judge must support top_logprobs")
        if tokens[0] == "87" or any(is_digits(t) and len(t) > 1 for t in tokens):
            return "single"
        if tokens[0] == "8":
            follow = await self._top_logprobs(client, PROBE_PROMPT, prefill="8")
            if follow and max(follow, key=lambda t: t[1])[0] == "7":
                return "digits"
            raise ConfigError(
                f"judge {self.model} splits numbers into digits but ignores an assistant prefill",
                hint="serve it with vLLM or llama.cpp (they honour continue_final_message), or use a judge "
                "whose tokenizer has one token per number",
            )
        raise ConfigError(
            f"judge {self.model} did not answer the probe 'reply with 87' (it said {tokens[0]!r})",
            hint="pass --judge-mode single or digits",
        )

    async def _ask(self, client: Any, prompt: str) -> Judgement:
        import openai

        try:
            if self.resolved_mode == "digits":
                return await digit_tree(lambda prefill: self._top_logprobs(client, prompt, prefill))
            return score_from_top_logprobs(await self._top_logprobs(client, prompt))
        except openai.APITimeoutError:
            return Judgement(None, f"{FAILED}timeout after retries")
        except (openai.APIConnectionError, *refusing_statuses()):
            raise  # the judge is down or refuses the key: the caller decides whether to go on
        except openai.APIStatusError as exc:
            return Judgement(None, f"{FAILED}HTTP {exc.status_code} after retries")
        except (openai.APIError, ValueError, AttributeError, IndexError, KeyError, TypeError) as exc:
            return Judgement(None, f"{FAILED}{type(exc).__name__}: {self.quote(str(exc))}")

    def quote(self, text: str, limit: int = 120) -> str:
        """Text from the server, safe to print: credentials masked, one line, bounded."""
        return " ".join(redact(text, [self.api_key]).split())[:limit]

    def unreachable(self, exc: Exception) -> JudgeError:
        where = f"{self.model} at {self.base_url or 'OpenAI'}"
        return JudgeError(f"cannot use the judge {where}: {self.quote(str(exc), 200)}")

    async def _run(self, prompts: Sequence[str], on_done: Callable[[Judgement], None]) -> list[Judgement]:
        import openai

        results, todo = split_cached(self.cache, self.identity, prompts, on_done)
        if not todo:
            return results  # type: ignore[return-value]
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key or "unused", timeout=self.timeout, max_retries=self.max_retries
        )
        self._gate = asyncio.Semaphore(self.concurrency)

        answered = 0

        async def one(i: int) -> None:
            nonlocal answered
            try:
                judgement = await self._ask(client, prompts[i])
            except (openai.APIConnectionError, *refusing_statuses()) as exc:
                if not answered:  # no answer yet: the judge is down or refuses us; asking more won't help
                    raise self.unreachable(exc) from None
                status = getattr(exc, "status_code", None)
                judgement = Judgement(None, FAILED + (f"HTTP {status}" if status else "cannot connect after retries"))
            answered += not judgement.transient
            results[i] = judgement
            if self.cache:
                self.cache.put(JudgeCache.key(self.identity, prompts[i]), judgement)
            on_done(judgement)

        try:
            if self.resolved_mode is None:
                try:
                    self.resolved_mode = await self.detect_mode(client)
                except (openai.APIError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                    raise self.unreachable(exc) from None
            await asyncio.gather(*(one(i) for i in todo))
        finally:
            await client.close()
        return results  # type: ignore[return-value]

    def judge(self, prompts: Sequence[str], on_done: Callable[[Judgement], None] = lambda j: None) -> list[Judgement]:
        """Judge every prompt; results in input order. Cached prompts send no request."""
        return asyncio.run(self._run(prompts, on_done))
