"""Monitoring projections against a naive reference, readout training, and the reliability maths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_extraction import make_pairs, naive_rows
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.core.directions import unit
from personactl.core.reliability import bootstrap_cosine, split_half
from personactl.model.loading import load_model
from personactl.steps.monitor import Probe, cohens_d, project
from personactl.steps.readout import one_vs_rest

runner = CliRunner()


def test_projections_equal_naive_reference(tiny_factory):
    lm = load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, 4, seed=2)
    examples = [p.pos for p in pairs] + [p.neg for p in pairs]
    examples[0] = type(examples[0])(examples[0].input_ids[: examples[0].prompt_len], examples[0].prompt_len)  # no reply
    rows = [0, 2, 3]
    torch.manual_seed(0)
    directions = unit(torch.randn(len(rows), 2, 32))
    centre = torch.randn(len(rows), 32)
    probe = Probe("t", ["a", "b"], rows, directions, centre)
    got = project(lm, probe, examples, tokens=True, batch_tokens=60)  # several batches
    for i, ex in enumerate(examples):
        hidden = torch.stack(naive_rows(lm.model, lm.layers, ex))[rows]  # [R, T, H]
        centred = hidden - centre[:, None]
        per_token = torch.einsum("rth,rkh->trk", centred, directions)
        per_token[0] = float("nan")  # the first token is the attention sink: no projection
        torch.testing.assert_close(got["tokens"][i], per_token, atol=1e-4, rtol=1e-4, equal_nan=True)
        P = ex.prompt_len
        torch.testing.assert_close(got["prompt_end"][i], per_token[P - 1], atol=1e-4, rtol=1e-4)
        if ex.response_len:
            expected = torch.einsum("rh,rkh->rk", centred[:, P:].mean(1), directions)
            torch.testing.assert_close(got["response_avg"][i], expected, atol=1e-4, rtol=1e-4)
        else:
            assert torch.isnan(got["response_avg"][i]).all()


def test_bootstrap_matches_a_loop_reference():
    torch.manual_seed(1)
    a, b = torch.randn(13, 3, 8) + 0.5, torch.randn(9, 3, 8) + 0.3
    got = bootstrap_cosine(a, b, n_boot=100, level=0.9, seed=7, chunk=100)
    g = torch.Generator().manual_seed(7)
    ia, ib = torch.randint(13, (100, 13), generator=g), torch.randint(9, (100, 9), generator=g)
    reps = []
    for j in range(100):
        ma, mb = a[ia[j]].double().mean(0).numpy(), b[ib[j]].double().mean(0).numpy()
        reps.append((ma * mb).sum(-1) / np.linalg.norm(ma, axis=-1) / np.linalg.norm(mb, axis=-1))
    reps = np.array(reps)
    np.testing.assert_allclose(got["replicates"].numpy(), reps, atol=1e-5)
    np.testing.assert_allclose(got["low"].numpy(), np.percentile(reps, 5, axis=0), atol=1e-5)
    np.testing.assert_allclose(got["high"].numpy(), np.percentile(reps, 95, axis=0), atol=1e-5)
    ma, mb = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    estimate = (ma * mb).sum(-1) / np.linalg.norm(ma, axis=-1) / np.linalg.norm(mb, axis=-1)
    np.testing.assert_allclose(got["estimate"].numpy(), estimate, atol=1e-6)
    assert (got["low"] <= got["high"]).all()


def test_split_half_matches_a_loop_reference():
    torch.manual_seed(2)
    d = torch.randn(11, 4, 6) + torch.linspace(0, 2, 4)[None, :, None]
    got = split_half(d, n_splits=20, seed=3)
    g = torch.Generator().manual_seed(3)
    total = np.zeros(4)
    for _ in range(20):
        order = torch.randperm(11, generator=g)
        h1, h2 = d[order[:5]].double().mean(0).numpy(), d[order[5:10]].double().mean(0).numpy()
        total += (h1 * h2).sum(-1) / np.linalg.norm(h1, axis=-1) / np.linalg.norm(h2, axis=-1)
    r = total / 20
    np.testing.assert_allclose(got["split_half"].numpy(), r, atol=1e-6)
    np.testing.assert_allclose(got["spearman_brown"].numpy(), 2 * r / (1 + r), atol=1e-6)
    assert got["split_half"][3] > got["split_half"][0]  # a consistent shift is more reliable than noise


def test_one_vs_rest_and_cohens_d_reference():
    torch.manual_seed(3)
    values = torch.randn(10, 2, 5)
    labels = [0, 0, 0, 1, 1, 1, 2, 2, -1, -1]
    got = one_vs_rest(values, labels, 3, "mean_diff")
    lab = torch.tensor(labels)
    for c in range(3):
        expected = unit(values[lab == c].double().mean(0) - values[lab != c].double().mean(0)).float()
        torch.testing.assert_close(got[:, c], expected)
    pca = one_vs_rest(values, labels, 3, "pca")
    for c in range(3):
        centred = values[lab == c].double() - values[lab != c].double().mean(0)
        for r in range(2):
            top = torch.linalg.svd(centred[:, r], full_matrices=False).Vh[0]
            assert abs(abs(float(pca[r, c].double() @ top)) - 1) < 1e-4
            assert float(pca[r, c] @ got[r, c]) > 0
    a, b = np.array([1.0, 2.0, 4.0, 5.0]), np.array([0.0, 1.0, 1.5])
    pooled = np.sqrt((3 * a.var(ddof=1) + 2 * b.var(ddof=1)) / 5)
    assert abs(cohens_d(torch.tensor(a), torch.tensor(b)) - (a.mean() - b.mean()) / pooled) < 1e-12


def test_readout_and_monitor_cli(isolated_env, tmp_path, tiny_factory):
    from pathlib import Path

    from personactl.store.readout_file import Readout

    model, ws = str(tiny_factory("llama")), tmp_path / "ws"
    data = Path(__file__).parent / "data" / "readout"
    out = tmp_path / "r.safetensors"
    args = ["--model", model, "-w", str(ws), "--dtype", "float32"]
    trained = runner.invoke(
        app, ["readout", "train", str(data), *args, "-o", str(out), "--json"], catch_exceptions=False
    )
    assert trained.exit_code == 0, trained.output
    readout = Readout.load(out)
    assert readout.concepts == ["angry", "cheerful", "curious", "sleepy"] and readout.rows == [0, 1, 2, 3]
    assert readout.metadata["n_neutral"] == 6 and readout.metadata["aggregator"] == "mean_diff"
    for row in readout.rows:
        assert readout.vectors(row).shape == (4, 32)
        torch.testing.assert_close(readout.vectors(row).norm(dim=-1), torch.ones(4))
    mon = runner.invoke(
        app, ["monitor", "--readout", str(out), "--text", "I am so happy", *args, "--tokens", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert mon.exit_code == 0, mon.output
    doc = json.loads(mon.stdout)
    item = doc["items"][0]
    assert doc["labels"] == readout.concepts and len(item["prompt_end"]) == 4 and len(item["prompt_end"][0]) == 4
    assert item["response_avg"][0] == [None] * 4  # a message alone has no reply
    np.testing.assert_allclose(item["tokens"][-1]["projection"], item["prompt_end"], atol=1e-5)
    assert item["tokens"][0]["sink"] and item["tokens"][0]["projection"][0] == [None] * 4
    assert not any(t["sink"] for t in item["tokens"][1:])


@pytest.mark.parametrize("bad", [["--text", "hi"], []])
def test_monitor_needs_exactly_one_probe_and_input(isolated_env, tmp_path, tiny_factory, bad):
    result = runner.invoke(app, ["monitor", *bad, "--model", str(tiny_factory("llama")), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2


def test_monitor_reads_a_reply_and_shows_tokens_to_a_person(isolated_env, tmp_path, tiny_factory):
    from pathlib import Path

    model, ws = str(tiny_factory("llama")), tmp_path / "ws"
    out = tmp_path / "r.safetensors"
    args = ["--model", model, "-w", str(ws), "--dtype", "float32"]
    data = str(Path(__file__).parent / "data" / "readout")
    assert runner.invoke(app, ["readout", "train", data, *args, "-o", str(out)]).exit_code == 0
    ask = ["monitor", "--readout", str(out), "--text", "I am so happy", "--reply", "Great, me too!", *args]
    doc = json.loads(runner.invoke(app, [*ask, "--tokens", "--json"], catch_exceptions=False).stdout)
    item = doc["items"][0]
    assert item["reply"] == "Great, me too!" and None not in item["response_avg"][0]
    reply_tokens = [t for t in item["tokens"] if t["response"]]
    assert "".join(t["token"] for t in reply_tokens) == "Great, me too!"
    np.testing.assert_allclose(  # response_avg is the mean of the reply tokens
        np.mean([t["projection"] for t in reply_tokens], axis=0), item["response_avg"], atol=1e-4
    )

    human = runner.invoke(app, [*ask, "--tokens", "--layers", "2"], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert human.exit_code == 0, human.output
    assert "item 0" not in human.stdout and "“I am so happy” → reply “Great, me too!”" in human.stdout
    assert "per token: “I am so happy”" in human.stdout
    rows = [
        [c.strip() for c in line.strip("│ ").split("│")]
        for line in human.stdout.splitlines()
        if line.startswith("│") and ("│ prompt │" in line or "│ reply  │" in line)
    ]
    assert len(rows) == len(item["tokens"])
    layer = doc["layers"].index(2)
    for (index, _, part, *cells), token in zip(rows, item["tokens"], strict=True):
        assert part == ("reply" if token["response"] else "prompt")
        expected = ["sink" if v is None else f"{v:+.3f}" for v in token["projection"][layer]]
        assert cells == expected, (index, cells, expected)

    two_replies = ["--text", "a", "--reply", "b", "--reply", "c"]
    refused = runner.invoke(app, ["monitor", "--readout", str(out), *two_replies, *args])
    assert refused.exit_code == 2 and "2 --reply for 1 --text" in refused.output


def test_monitor_refuses_a_vector_made_for_another_shape(isolated_env, tmp_path, tiny_factory):
    from personactl.store.vectors import PersonaVector

    path = tmp_path / "other.safetensors"
    metadata = {"model": "some/other", "num_layers": 3, "hidden_size": 16, "rows": [0, 1, 2, 3]}
    metadata |= {"positions": ["response_avg"], "aggregators": ["mean_diff"], "trait": "other"}
    PersonaVector({"mean_diff.response_avg": torch.randn(4, 16)}, metadata).save(path)
    args = ["--model", str(tiny_factory("llama")), "-w", str(tmp_path / "ws"), "--dtype", "float32"]
    result = runner.invoke(app, ["monitor", "--vector", str(path), "--text", "hi", *args])
    assert result.exit_code == 2, result.output
    assert "hidden size 16" in result.output and "internal error" not in result.output
