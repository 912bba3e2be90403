"""`personactl run`: generate → score → extract → eval in one command, skipping finished steps."""

from __future__ import annotations

import json

import polars as pl
from judge_server import JudgeServer
from test_eval import assert_png, hash_scorer
from typer.testing import CliRunner

from personactl.cli.app import app

runner = CliRunner()


def small_run_args(model: str, ws, judge_url: str) -> list[str]:
    """A whole `run` on a tiny model in seconds: 2 questions, 5 tokens, 2 layers × 2 α, one random seed."""
    return [
        "run", "--trait", "optimistic", "--model", model, "-w", str(ws), "--dtype", "float32",
        "--questions", "2", "--eval-questions", "2", "--max-new-tokens", "5", "--layers", "1,2",
        "--coefficients", "1,2", "--random-seeds", "1", "--coherence-threshold", "0",
        "--judge-base-url", judge_url, "--judge", "fake-judge", "--json",
    ]  # fmt: skip


def test_run_end_to_end_then_skips_everything(isolated_env, tmp_path, tiny_factory):
    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    with JudgeServer(scorer=hash_scorer) as server:
        args = small_run_args(model, ws, server.base_url)
        first = runner.invoke(app, args, catch_exceptions=False)
        assert first.exit_code == 0, first.output
        requests = server.total_requests
        second = runner.invoke(app, args, catch_exceptions=False)
        assert second.exit_code == 0, second.output
        assert server.total_requests == requests
    result = json.loads(first.stdout)
    steps = result["steps"]
    assert list(steps) == ["generate", "score", "extract", "eval"]
    assert not any(s["skipped"] for s in steps.values())
    assert all(s["skipped"] for s in json.loads(second.stdout)["steps"].values())
    assert steps["generate"]["rows"] == 5 * 2 * 2  # 5 instruction pairs × 2 questions × pos/neg
    scores = pl.read_parquet(steps["score"]["artifact"])
    assert scores.height == 20
    # coherence threshold 0: every cell is coherent, so the recommendation is the best layer's largest α
    rec = result["recommendation"]
    best = steps["eval"]["best"]
    assert rec["kind"] == "judged" and rec["layer"] == best["layer"] in (1, 2) and rec["alpha"] == 2.0
    for path in rec["plots"]:
        assert_png(path)
    table = runner.invoke(app, [a for a in args if a != "--json"], catch_exceptions=False)
    assert "recommended: personactl steer --vector optimistic --layers" in table.stdout


def test_run_proxy_needs_no_judge(isolated_env, tmp_path, tiny_factory):
    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    args = [
        "run", "--trait", "optimistic", "--model", model, "-w", str(ws), "--dtype", "float32", "--questions", "1",
        "--eval-questions", "3", "--max-new-tokens", "4", "--proxy", "--json",
    ]  # fmt: skip
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc["steps"]) == ["generate", "extract", "eval"]
    assert doc["recommendation"]["kind"] == "proxy" and doc["recommendation"]["layer"] in (1, 2, 3)
