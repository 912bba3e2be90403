"""The judge against a real HTTP server on loopback: scores, failures as None with reasons, cache."""

from __future__ import annotations

import math
import threading
import time

import pytest
from judge_server import JudgeServer

from personactl.errors import ConfigError
from personactl.judging.remote import JudgeCache, RemoteJudge, score_from_top_logprobs


def test_score_is_probability_weighted_mean_of_number_tokens():
    top = [("70", math.log(0.5)), (" 80", math.log(0.25)), ("cat", math.log(0.2)), ("101", math.log(0.05))]
    assert score_from_top_logprobs(top).score == pytest.approx((0.5 * 70 + 0.25 * 80) / 0.75)
    low = score_from_top_logprobs([("cat", math.log(0.8)), ("5", math.log(0.2))])
    assert low.score is None and "0.20 probability" in low.reason
    assert score_from_top_logprobs([("REFUSAL", -0.1), ("90", -3.0)]).reason == "refusal"
    assert score_from_top_logprobs([]).score is None


def test_remote_judge_scores_failures_and_cache(tmp_path):
    prompts = {
        "ok": "rate this SCORE=40",
        "refuse": "rate [[REFUSE]]",
        "words": "rate [[WORDS]]",
        "429": "rate SCORE=90 [[429]]",
        "500": "rate [[500]]",
        "slow": "rate [[SLOW]]",
        "trunc": "rate [[TRUNC]]",
    }
    with JudgeServer(slow_seconds=2.0) as server:
        cache = JudgeCache(tmp_path / "judge.sqlite")
        judge = RemoteJudge(
            "test-judge",
            base_url=server.base_url,
            api_key="k",
            mode="single",
            concurrency=8,
            timeout=0.5,
            max_retries=1,
            cache=cache,
        )
        results = dict(zip(prompts, judge.judge(list(prompts.values())), strict=True))
        assert results["ok"].score == pytest.approx((0.6 * 40 + 0.3 * 50) / 0.9)
        assert results["429"].score == pytest.approx((0.6 * 90 + 0.3 * 100) / 0.9)  # retried after Retry-After
        assert server.requests[prompts["429"]] == 2
        assert results["refuse"].score is None and results["refuse"].reason == "refusal"
        assert results["words"].score is None and "probability on numbers" in results["words"].reason
        assert results["500"].score is None and "HTTP 500" in results["500"].reason
        assert server.requests[prompts["500"]] == 2  # one retry
        assert results["slow"].score is None and "timeout" in results["slow"].reason
        assert results["trunc"].score is None and results["trunc"].reason.startswith("transient")

        before = server.total_requests
        again = dict(zip(prompts, judge.judge(list(prompts.values())), strict=True))
        sent = server.total_requests - before
        # deterministic outcomes come from the cache; only the transient failures are asked again
        assert {k for k, j in again.items() if not j.cached} == {"500", "slow", "trunc"}
        assert again["ok"].score == results["ok"].score and again["refuse"].reason == "refusal"
        assert sent == 2 + 2 + 1  # 500 (with retry), slow (with retry), trunc
        cache.close()


def expected(numbers: dict[int, float]) -> float:
    return sum(n * p for n, p in numbers.items()) / sum(numbers.values())


def remote(server, **kwargs):
    return RemoteJudge("test-judge", base_url=server.base_url, api_key="k", max_retries=0, **kwargs)


def test_auto_mode_picks_single_for_a_one_token_per_number_judge():
    with JudgeServer() as server:
        judge = remote(server)
        [result] = judge.judge(["rate SCORE=30"])
        assert judge.resolved_mode == "single"
        assert result.score == pytest.approx(expected({30: 0.6, 40: 0.3}))
        assert server.total_requests == 2  # the probe and the judgement


@pytest.mark.parametrize("n", [0, 5, 10, 40, 95, 100])
def test_digit_mode_recovers_the_whole_number_distribution(n):
    truth = JudgeServer.number_distribution(f"SCORE={n}")
    with JudgeServer(digits=True) as server:
        judge = remote(server)
        [result] = judge.judge([f"rate SCORE={n}"])
        assert judge.resolved_mode == "digits"
        assert result.score == pytest.approx(expected(truth))
        # the single-token method reads only first digits from such a judge: wrong for two-digit scores
        [naive] = remote(server, mode="single").judge([f"rate SCORE={n}"])
        if n >= 10:
            assert naive.score is None or abs(naive.score - expected(truth)) > 5


def test_digit_mode_refusals_words_and_failures():
    with JudgeServer(digits=True) as server:
        judge = remote(server, mode="digits", timeout=0.5)
        refuse, words, failed = judge.judge(["rate [[REFUSE]]", "rate [[WORDS]]", "rate SCORE=70 [[500]]"])
        assert refuse.reason == "refusal"
        assert words.score is None and "probability on numbers" in words.reason
        assert failed.score is None and failed.transient and "HTTP 500" in failed.reason


def test_a_digit_judge_that_ignores_the_prefill_is_refused_clearly():
    with JudgeServer(digits=True, prefill=False) as server:
        with pytest.raises(ConfigError, match="ignores an assistant prefill"):
            remote(server).judge(["rate SCORE=40"])


def test_concurrency_bounds_requests_not_judgements():
    """A digit-tree judgement sends several requests; `concurrency` must bound those."""
    in_flight = peak = 0
    lock = threading.Lock()

    with JudgeServer(digits=True) as server:
        original = server.digit_top_logprobs

        def counting(prompt, prefix):
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            time.sleep(0.05)
            with lock:
                in_flight -= 1
            return original(prompt, prefix)

        server.digit_top_logprobs = counting
        results = remote(server, mode="digits", concurrency=3).judge([f"rate SCORE={n}" for n in range(10, 90, 7)])
        assert all(r.score is not None for r in results)
        assert peak <= 3
