"""`personactl run --dry-run`: per step what the run would generate and judge, equal to what the real
run then does; nothing loaded, nothing sent; finished steps reported as skipped."""

from __future__ import annotations

import json

import polars as pl
from judge_server import JudgeServer
from test_eval import hash_scorer, samples_height
from test_run import small_run_args
from typer.testing import CliRunner

from personactl.cli.app import app

runner = CliRunner()


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a dry run loaded a model")


def test_run_dry_run_counts_what_the_run_does(isolated_env, tmp_path, tiny_factory, monkeypatch):
    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    with JudgeServer(scorer=hash_scorer) as server:
        args = small_run_args(model, ws, server.base_url)
        with monkeypatch.context() as patched:
            patched.setattr("personactl.cli.eval.load_engine", refuse_to_load)  # run loads through eval's shared loader
            dry = runner.invoke(app, [*args, "--dry-run"], catch_exceptions=False)
        assert dry.exit_code == 0 and server.total_requests == 0, dry.output
        estimate = json.loads(dry.stdout)
        real = runner.invoke(app, args, catch_exceptions=False)
        assert real.exit_code == 0, real.output
        steps = json.loads(real.stdout)["steps"]
        sent = server.total_requests
        with monkeypatch.context() as patched:
            patched.setattr("personactl.cli.eval.load_engine", refuse_to_load)  # run loads through eval's shared loader
            after = json.loads(runner.invoke(app, [*args, "--dry-run"], catch_exceptions=False).stdout)
            worded = runner.invoke(app, [a for a in args if a != "--json"] + ["--dry-run"]).output
        assert server.total_requests == sent

    planned = estimate["steps"]
    assert planned["generate"]["generations"] == steps["generate"]["rows"] == 20
    scores = pl.read_parquet(steps["score"]["artifact"])
    assert planned["score"]["judgements"] == 2 * scores.height == 40
    assert planned["eval"]["generations"] == samples_height(steps["eval"])
    assert planned["eval"]["judgements"] == 2 * samples_height(steps["eval"])
    assert estimate["generations"] == 20 + samples_height(steps["eval"])
    assert estimate["max_new_tokens_total"] == estimate["generations"] * 5
    assert estimate["estimated_generation_seconds"] is None  # a fresh workspace has no measured speed

    assert after["steps"]["generate"] == {"skipped": True, "generations": 0}
    assert after["steps"]["score"] == {"judgements": 0, "cached": 40}  # every judgement is in the cache
    assert after["steps"]["eval"] == {"skipped": True, "generations": 0, "judgements": 0}  # the run's own fingerprint
    assert after["generations"] == 0 and "eval: skipped" in worded
    assert after["tokens_per_second"] > 0 and after["estimated_generation_seconds"] is not None
    assert "generate: skipped" in worded and "tok/s measured here" in worded


def test_run_dry_run_reads_the_layer_count_from_the_model_config(isolated_env, tmp_path, tiny_factory):
    from personactl.steps.evaluate import default_layers

    model = tiny_factory("llama")
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    args = ["run", "--trait", "optimistic", "--model", str(model), "-w", str(tmp_path / "ws"), "--proxy"]
    dry = runner.invoke(app, [*args, "--dry-run", "--json"], catch_exceptions=False)
    assert dry.exit_code == 0, dry.output
    doc = json.loads(dry.stdout)
    assert doc["steps"]["eval"]["layers"] == list(default_layers(layers))
    assert doc["steps"]["score"]["skipped"] and doc["judgements"] == 0
