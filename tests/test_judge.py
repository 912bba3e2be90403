"""The judge against a real HTTP server on loopback: scores, failures as None with reasons, cache."""

from __future__ import annotations

import math

import pytest
from judge_server import JudgeServer

from personactl.judge import JudgeCache, RemoteJudge, score_from_top_logprobs


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
            "test-judge", base_url=server.base_url, api_key="k", concurrency=8, timeout=0.5, max_retries=1, cache=cache
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
