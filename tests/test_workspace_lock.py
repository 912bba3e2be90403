"""The trait-directory lock, between real processes: a second writer exits 2 naming the holder and
touches nothing; a lock left by a killed process is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import polars as pl
from typer.testing import CliRunner

from personactl.cli.app import app

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from personactl.store.workspace import Workspace
    from personactl.store.workspace_lock import hold_directory_lock

    with hold_directory_lock(Path(sys.argv[1]), command="personactl generate --trait optimistic (holder)"):
        print("held", flush=True)
        sys.stdin.read()  # holds until killed
    """
)


def generate(ws, model, questions: int) -> subprocess.CompletedProcess:
    args = ["generate", "--trait", "optimistic", "--model", model, "-w", ws, "--questions", questions]
    args += ["--batch-size", "2", "--max-new-tokens", "4", "--dtype", "float32"]
    env = {**os.environ, "PERSONACTL_DEBUG": "0"}
    command = [sys.executable, "-m", "personactl", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_second_writer_exits_2_naming_the_holder_and_a_killed_holder_is_taken_over(isolated_env, tmp_path, tiny_llama):
    from personactl.model.loading import resolve_model
    from personactl.store.workspace import Workspace

    ws, model = tmp_path / "ws", str(tiny_llama)
    trait_dir = Workspace(ws).trait_dir(resolve_model(model).slug, "optimistic")
    # another run's shards, from a different plan: a second writer used to delete them as stale
    shards = trait_dir / "responses-model.shards"
    shards.mkdir(parents=True)
    (shards / "plan.json").write_text('{"plan": "someone-else"}')
    (shards / "batch-00000.parquet").write_bytes(b"not mine to delete")
    before = sorted(p.name for p in shards.iterdir())

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(trait_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        blocked = generate(ws, model, 3)
        assert blocked.returncode == 2, blocked.stderr
        assert blocked.stderr.startswith(f"error: {trait_dir} is in use by pid {holder.pid} (personactl generate")
        assert "since 20" in blocked.stderr
        assert "Traceback" not in blocked.stderr
        assert sorted(p.name for p in shards.iterdir()) == before
        assert not (trait_dir / "responses-model.parquet").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # the kernel dropped the dead holder's lock: the next run (this process) takes it over and does the work
    args = ["generate", "--trait", "optimistic", "--model", model, "-w", str(ws), "--questions", "2"]
    taken_over = CliRunner().invoke(app, [*args, "--batch-size", "2", "--max-new-tokens", "4", "--dtype", "float32"])
    assert taken_over.exit_code == 0, taken_over.output
    table = pl.read_parquet(trait_dir / "responses-model.parquet")
    assert sorted(set(table["question_index"])) == [0, 1]
    assert table.select(pl.struct("pair_id", "polarity").n_unique()).item() == table.height
    assert not shards.exists()  # its own shards, cleaned up; the dead run's stale ones were replaced


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    """`run` holds the lock for all its steps; a nested hold in the same process must not block."""
    from personactl.store.workspace_lock import HOLDER_NAME, hold_directory_lock

    with hold_directory_lock(tmp_path, command="outer"):
        with hold_directory_lock(tmp_path, command="inner"):
            assert '"outer"' in (tmp_path / HOLDER_NAME).read_text()
        assert (tmp_path / HOLDER_NAME).is_file()
    assert not (tmp_path / HOLDER_NAME).exists()
