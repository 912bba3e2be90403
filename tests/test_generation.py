"""Generation is reproducible for a seed and resumes after a crash with every row exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from personactl.backends import Sampling
from personactl.backends.hf import HFBackend
from personactl.model.loading import load_model
from personactl.steps.generate import ShardStore, run_generation
from personactl.store.traits import load_trait

SAMPLING = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.95)


class CrashAfter:
    """A backend that dies (like a killed process) after `n` batches."""

    name = "hf"

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def generate(self, prompts, sampling, seed):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.inner.generate(prompts, sampling, seed)


def run(lm, backend, directory, force=False, seed=0):
    trait = load_trait("optimistic")
    shards = ShardStore(directory / "shards", "plan-1")
    return run_generation(
        trait=trait,
        backend=backend,
        tokenizer=lm.tokenizer,
        model_info=lm.describe(),
        sampling=SAMPLING,
        seed=seed,
        batch_size=4,
        samples_per_question=1,
        max_questions=3,
        shards=shards,
        output=directory / "responses.parquet",
        force=force,
    )


@pytest.fixture(scope="module")
def lm(tiny_factory):
    return load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)


def test_resume_after_crash_equals_uninterrupted_run(lm, tmp_path, isolated_env):
    backend = HFBackend(lm.model, lm.tokenizer)
    reference = run(lm, backend, tmp_path / "ref")
    assert reference.height == 5 * 3 * 2
    with pytest.raises(KeyboardInterrupt):
        run(lm, CrashAfter(backend, 3), tmp_path / "crash")
    assert not (tmp_path / "crash" / "responses.parquet").exists()
    assert len(list((tmp_path / "crash" / "shards").glob("batch-*.parquet"))) == 3
    calls = CrashAfter(backend, 10**6)
    resumed = run(lm, calls, tmp_path / "crash")
    assert 10**6 - calls.n == 8 - 3  # only the missing batches ran
    assert resumed.select(pl.struct("pair_id", "polarity").n_unique()).item() == resumed.height == 30
    assert resumed.drop("batch_index").equals(reference.drop("batch_index"))


def test_same_seed_same_rows_other_seed_other_rows(lm, tmp_path, isolated_env):
    backend = HFBackend(lm.model, lm.tokenizer)
    a = run(lm, backend, tmp_path / "a", seed=7)
    b = run(lm, backend, tmp_path / "b", seed=7)
    c = run(lm, backend, tmp_path / "c", seed=8)
    assert a.equals(b)
    assert not a["response_token_ids"].equals(c["response_token_ids"])


def test_rows_are_paired_and_described(lm, tmp_path, isolated_env):
    table = run(lm, HFBackend(lm.model, lm.tokenizer), tmp_path / "t")
    trait = load_trait("optimistic")
    for _, group in table.group_by("pair_id"):
        assert sorted(group["polarity"]) == ["neg", "pos"]
        assert group["question"].n_unique() == 1
        i = group["instruction_index"][0]
        pos = group.filter(pl.col("polarity") == "pos")
        assert pos["system_prompt"][0] == trait.instructions[i].pos
    assert (table["n_response_tokens"] == table["response_token_ids"].list.len()).all()
    decoded = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in table["response_token_ids"]]
    assert decoded == table["response"].to_list()


def test_kill_9_mid_run_then_resume(tiny_factory, tmp_path, isolated_env):
    """A real SIGKILL of the CLI while it writes shards; the rerun completes every row exactly once.
    30 rows at batch size 1 are 30 shards: the kill lands after 3 and the rerun has 27 left."""
    model = str(tiny_factory("llama"))
    args = [
        sys.executable,
        "-m",
        "personactl",
        "generate",
        "--trait",
        "optimistic",
        "--model",
        model,
        "--workspace",
        str(tmp_path / "ws"),
        "--questions",
        "3",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "24",
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "PERSONACTL_DEBUG": "0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard_dir = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "ws").rglob("batch-*.parquet"))
        if len(found) >= 3:
            shard_dir = found[0].parent
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if shard_dir is None:
        pytest.fail("generation finished or stalled before it could be killed")
    assert not list((tmp_path / "ws").rglob("responses-model.parquet"))
    done_before = len(list(shard_dir.glob("batch-*.parquet")))
    result = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    table = pl.read_parquet(next((tmp_path / "ws").rglob("responses-model.parquet")))
    assert table.height == 5 * 3 * 2 == table.select(pl.struct("pair_id", "polarity").n_unique()).item()
    assert not shard_dir.exists() and done_before >= 3
