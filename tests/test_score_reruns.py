"""Honest score reruns against a real loopback judge: failures are never cached or counted as done,
a plain rerun retries them, and a judge that cannot be used at all stops the run with its reason."""

from __future__ import annotations

import json
import math
import shutil
import socket
import sqlite3

import polars as pl
import pytest
from judge_server import JudgeServer
from typer.testing import CliRunner

from personactl.cli.app import app

SECRET = "sk-test-0123456789abcdefSECRET"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_factory):
    """One generated workspace (10 pairs, 40 judgements) that each test copies."""
    root = tmp_path_factory.mktemp("score-reruns")
    ws, model = root / "ws", str(tiny_factory("llama"))
    args = ["generate", "--trait", "optimistic", "--model", model, "-w", ws, "--questions", "2"]
    result = invoke(*args, "--max-new-tokens", "6", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    return ws, model


@pytest.fixture
def workspace(generated, tmp_path, isolated_env, monkeypatch):
    ws, model = generated
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return copy, model


def score_args(ws, model, server_url, *extra):
    return ["score", "--trait", "optimistic", "--model", model, "-w", ws, "--judge-base-url", server_url, *extra]


def answer(prompt: str):
    return [("80" if "coherent" in prompt else "70", math.log(0.9)), ("x", math.log(0.1))]


def scores_manifest(ws):
    return json.loads(next(ws.rglob("scores-model.manifest.json")).read_text())


def test_failed_judgements_leave_scores_incomplete_and_a_plain_rerun_sends_only_them(workspace):
    ws, model = workspace
    with JudgeServer(scorer=answer) as server:
        args = score_args(ws, model, server.base_url, "--judge-mode", "single", "--max-retries", "0")
        question = pl.read_parquet(next(ws.rglob("responses-model.parquet")))["question"][0]
        failing = {"on": True}  # coherence judgements of the first question fail while "on"
        server.fail = lambda prompt: 503 if failing["on"] and "coherent" in prompt and question in prompt else None
        first = invoke(*args)
        assert first.exit_code == 2
        failed = sum(n for prompt, n in server.requests.items() if server.fail(prompt))
        assert 0 < failed < 20 and server.total_requests == 40
        assert f"{failed} of 40 judgements failed (HTTP 503 after retries ×{failed})" in first.output
        assert "saved but incomplete" in first.output and "rerun the same command" in first.output
        assert scores_manifest(ws)["complete"] is False
        refused = invoke("extract", "--trait", "optimistic", "--model", model, "-w", ws, "--dtype", "float32")
        assert refused.exit_code == 2 and "is incomplete" in refused.output

        failing["on"] = False  # the judge recovers
        before = server.total_requests
        rerun = invoke(*args, "--json")
        assert rerun.exit_code == 0, rerun.output
        summary = json.loads(rerun.stdout)
        assert summary["skipped"] is False and summary["requests_sent"] == failed
        assert summary["cache_hits"] == 40 - failed and server.total_requests - before == failed
        assert summary["missing_coherence"] == 0 and scores_manifest(ws)["complete"] is True
        assert json.loads(invoke(*args, "--json").stdout)["skipped"] is True  # now it is complete


def test_a_reply_without_logprobs_is_not_cached(workspace):
    ws, model = workspace
    broken = {"on": True}
    with JudgeServer(scorer=lambda p: [] if broken["on"] and "coherent" in p else answer(p)) as server:
        args = score_args(ws, model, server.base_url, "--judge-mode", "single")
        first = invoke(*args)
        assert first.exit_code == 2 and "20 of 40 judgements failed (no logprobs in the response ×20)" in first.output
        cache = sqlite3.connect(next(ws.rglob("judge-cache.sqlite")))
        assert cache.execute("SELECT count(*) FROM judgements").fetchone()[0] == 20  # only the answers
        # a failure that an older version cached as an answer is asked again, not served from the cache
        cache.execute("UPDATE judgements SET score = NULL, reason = 'no logprobs in the response'")
        cache.commit()
        cache.close()
        broken["on"] = False  # the server is fixed
        before = server.total_requests
        fixed = invoke(*args, "--json")
        assert fixed.exit_code == 0, fixed.output
        assert json.loads(fixed.stdout)["requests_sent"] == 40 and server.total_requests - before == 40


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("mode", ["single", "auto"])
def test_a_judge_that_is_down_or_refuses_the_key_exits_2_with_the_reason(workspace, mode):
    ws, model = workspace
    down = invoke(*score_args(ws, model, closed_port_url(), "--judge-mode", mode, "--max-retries", "0"))
    assert down.exit_code == 2 and "cannot use the judge" in down.output and "Connection error" in down.output
    assert not list(ws.rglob("scores-model.*"))
    with JudgeServer(scorer=answer) as server:
        server.fail = lambda prompt: 401
        refused = invoke(*score_args(ws, model, server.base_url, "--judge-mode", mode))
        assert refused.exit_code == 2 and "cannot use the judge" in refused.output and "401" in refused.output
        assert server.total_requests <= 50  # stopped at the first refusal's wave, not 40 judgements × retries
    # the server echoed the request headers (Authorization: Bearer <key>) into its error body
    assert SECRET not in refused.output and "'authorization': '***" in refused.output
    assert not list(ws.rglob("scores-model.*"))


def test_an_empty_responses_table_is_refused(workspace):
    ws, model = workspace
    path = next(ws.rglob("responses-model.parquet"))
    pl.read_parquet(path).clear().write_parquet(path)
    with JudgeServer(scorer=answer) as server:
        empty = invoke(*score_args(ws, model, server.base_url))
        assert empty.exit_code == 2 and "has no responses to score" in empty.output
        assert server.total_requests == 0


def test_redaction_masks_credential_shapes_it_was_not_told_about():
    from personactl.core.redaction import redact

    quoted = "headers {'authorization': 'Bearer abcdefgh12345678'} key=sk-proj-zzzzzzzzzzzz hf_abcdefghijklmnop"
    masked = redact(quoted)
    assert "abcdefgh12345678" not in masked and "sk-proj" not in masked and "hf_abc" not in masked
    assert redact("HTTP 401: the token count is 12") == "HTTP 401: the token count is 12"
