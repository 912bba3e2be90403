"""I-Thou end to end on a tiny model: user persona generate → score (both sides) → extract → I-Thou,
steering with it, and compare with bootstrap CIs."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch
from judge_server import JudgeServer
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.steps.user_persona import NEUTRAL_SYSTEM, user_message_span
from personactl.store.vectors import PersonaVector

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def scorer_for(table: pl.DataFrame, text_column: str, failing_pair: str):
    """Trait 85 (pos) / 10 (neg), coherence 90 except one pair; rows found by their longest text in the prompt."""
    rows = sorted(table.iter_rows(named=True), key=lambda r: -len(r[text_column]))

    def scorer(prompt: str):
        row = next(r for r in rows if r[text_column] and r[text_column] in prompt)
        if "coherent" in prompt:
            value = 10 if row["pair_id"] == failing_pair else 90
        else:
            value = 85 if row["polarity"] == "pos" else 10
        return [(str(value), math.log(0.9)), ("x", math.log(0.1))]

    return scorer


@pytest.fixture
def ithou_workspace(isolated_env, tmp_path, tiny_factory):
    ws, model = tmp_path / "ws", str(tiny_factory("llama"))
    common = ["--trait", "optimistic", "--model", model, "-w", ws]
    gen = invoke("generate", *common, "--questions", "2", "--max-new-tokens", "6", "--dtype", "float32")
    assert gen.exit_code == 0, gen.output
    responses = pl.read_parquet(next(ws.rglob("responses-model.parquet")))
    failing_model = responses["pair_id"][0]
    with JudgeServer(scorer=scorer_for(responses, "response", failing_model)) as server:
        judge = ["--judge-base-url", server.base_url, "--judge-model", "fake"]
        scored = invoke("score", *common, *judge, "--json")
        assert scored.exit_code == 0, scored.output
        assert json.loads(scored.stdout)["kept_pairs"] == 9

        user_gen = invoke(
            "generate", *common, "--persona", "user", "--max-new-tokens", "6", "--dtype", "float32", "--json"
        )
        assert user_gen.exit_code == 0, user_gen.output
        user = pl.read_parquet(json.loads(user_gen.stdout)["artifact"])
        assert user.height == 18 and set(user["persona"]) == {"user"}
        assert failing_model not in set(user["pair_id"])  # only pairs the model-side filter kept
        source = responses.select("pair_id", "polarity", pl.col("response").alias("source"))
        joined = user.join(source, on=["pair_id", "polarity"])
        assert (joined["question"] == joined["source"]).all() and set(user["system_prompt"]) == {NEUTRAL_SYSTEM}

        failing_user = sorted(set(user["pair_id"]))[1]
        server.scorer = scorer_for(user, "question", failing_user)
        user_scored = invoke("score", *common, *judge, "--persona", "user", "--json")
        assert user_scored.exit_code == 0, user_scored.output
        summary = json.loads(user_scored.stdout)
        assert summary["pairs"] == 9 and summary["kept_pairs"] == 8  # the user side is filtered too
        prompts = list(server.requests)
    assert any("USER's message" in p for p in prompts)
    return ws, model, common, failing_user


def test_ithou_end_to_end(ithou_workspace):
    ws, model, common, failing_user = ithou_workspace
    dtype = ["--dtype", "float32"]
    for persona in ("model", "user"):
        ext = invoke("extract", *common, *dtype, "--persona", persona, "--keep-pairs", "--json")
        assert ext.exit_code == 0, ext.output
    user_vec = PersonaVector.load(next(ws.rglob("vectors-user.safetensors")))
    model_vec = PersonaVector.load(next(ws.rglob("vectors-model.safetensors")))
    assert user_vec.metadata["persona"] == "user" and user_vec.metadata["n_pairs"] == 8
    assert "user_avg" in user_vec.positions and "user_avg" in user_vec.metadata["spans"]
    assert model_vec.metadata["n_pairs"] == 9

    # the sidecars average to the vectors, at every position
    from personactl.store.pair_diffs_file import load_pair_diffs

    for vec, name in ((model_vec, "model"), (user_vec, "user")):
        for position in vec.positions:
            diffs, meta = load_pair_diffs(next(ws.rglob(f"pair-diffs-{name}.safetensors")), position)
            assert failing_user not in meta["pair_ids"] or name == "model"
            torch.testing.assert_close(diffs.mean(0), vec.get(position)[meta["rows"]], atol=1e-5, rtol=1e-4)

    ithou = invoke("extract", *common, "--i-thou", "--json")
    assert ithou.exit_code == 0, ithou.output
    path = json.loads(ithou.stdout)["artifact"]
    vec = PersonaVector.load(path)
    assert vec.metadata["persona"] == "ithou" and "--i-thou" in vec.metadata["command"]
    assert set(vec.positions) == {"prompt_end", "response_start", "response_avg", "prompt_avg"}
    for position in vec.positions:
        assert torch.equal(vec.get(position), model_vec.get(position) - user_vec.get(position))

    steer = invoke(
        "steer", "--vector", path, "--model", model, "-w", ws, "--prompt", "Hello there", "--layers", "2",
        "--coefficients=-4,0,4", "--max-new-tokens", "5", *dtype, "--json",
    )  # fmt: skip
    assert steer.exit_code == 0, steer.output
    rows = [json.loads(line) for line in steer.stdout.splitlines()]
    assert sorted(r["coefficient"] for r in rows) == [-4, 0, 4]
    assert len({r["text"] for r in rows}) > 1  # the I-Thou direction moves the output

    cmp = invoke("compare", "optimistic", "optimistic:user", "--model", model, "-w", ws, "--bootstrap", "200", "--json")
    assert cmp.exit_code == 0, cmp.output
    doc = json.loads(cmp.stdout)
    pair = doc["pairs"][0]
    for lo, hi in zip(pair["ci"]["low"], pair["ci"]["high"], strict=True):
        assert -1 <= lo <= hi <= 1
    assert set(doc["reliability"]) == {"optimistic", "optimistic:user"}
    same_text = invoke(
        "compare", "optimistic@response_avg", "optimistic:user@user_avg", "--model", model, "-w", ws,
        "--bootstrap", "50", "--json",
    )  # fmt: skip
    assert same_text.exit_code == 0, same_text.output


def test_user_message_span_is_exact(tiny_factory):
    from personactl.model.chat_format import chat_messages, encode_prompt
    from personactl.model.loading import load_model

    for kind in ("chatml", "bos", "bos_template"):
        lm = load_model(str(tiny_factory("llama", kind)), dtype="float32", device="cpu", log=lambda m: None)
        message = "the quick brown fox jumps over the lazy dog"
        messages = chat_messages(NEUTRAL_SYSTEM, message)
        start, end = user_message_span(lm.tokenizer, messages)
        ids = encode_prompt(lm.tokenizer, messages)
        assert lm.tokenizer.decode(ids[start:end]).strip() == message
        assert message not in lm.tokenizer.decode(ids[start + 1 : end]) and message not in lm.tokenizer.decode(
            ids[start : end - 1]
        )
