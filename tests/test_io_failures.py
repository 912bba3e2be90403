"""Write failures after start-up (disk full, read-only directory) on a real small tmpfs: one line
naming the file, exit 2, nothing half-written, and the same command resumes once space is back."""

from __future__ import annotations

import os
import subprocess

import polars as pl
import pytest
from typer.testing import CliRunner

from personactl.cli.app import app

MiB = 1 << 20


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root to mount; the test is skipped where the machine does not allow it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk, leave: int):
    """Take all but `leave` bytes of the disk with a filler file (deleting it frees the space)."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def generate(ws, model):
    args = ["generate", "--trait", "optimistic", "--model", model, "-w", ws, "--questions", "2"]
    return invoke(*args, "--batch-size", "2", "--max-new-tokens", "4", "--temperature", "0", "--dtype", "float32")


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write "), result.output
    for fragment in fragments:
        assert fragment in result.output


def test_disk_full_and_read_only_exit_2_naming_the_file_and_the_rerun_resumes(
    isolated_env, tmp_path, small_disk, tiny_llama
):
    model, ws = str(tiny_llama), small_disk / "ws"
    filler = fill(small_disk, 24 * 1024)  # room for a few shards, not for all of them and the table
    full = generate(ws, model)
    assert_one_line_error(full, "No space left on device", "rerun the same command")
    shards = list(ws.rglob("batch-*.parquet"))
    assert shards and not list(ws.rglob("responses-model.parquet"))
    assert not list(ws.rglob("*.tmp"))  # nothing half-written left behind

    filler.unlink()
    resumed = generate(ws, model)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming:" in resumed.output
    clean = tmp_path / "clean"
    assert generate(clean, model).exit_code == 0
    table = pl.read_parquet(next(ws.rglob("responses-model.parquet")))
    assert table.equals(pl.read_parquet(next(clean.rglob("responses-model.parquet"))))

    filler = fill(small_disk, 4096)  # room for the lock note, not for the vector file
    extract = ["extract", "--trait", "optimistic", "--model", model, "-w", ws, "--dtype", "float32"]
    no_room = invoke(*extract)
    assert_one_line_error(no_room, "vectors-model.safetensors", "No space left on device")
    assert not list(ws.rglob("vectors-model.safetensors"))
    filler.unlink()
    assert invoke(*extract).exit_code == 0
    assert not list(ws.rglob("*.tmp"))

    # a read-only directory: export -o into it
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = invoke("export", "optimistic", "--model", model, "-w", ws, "-o", small_disk / "optimistic.gguf")
    assert_one_line_error(result, "optimistic.gguf", "Read-only file system")
