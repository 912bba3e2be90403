"""A corrupt readout or pair-differences file is one line naming the file plus a hint, exit 2 —
never "internal error" (exit 1), whichever command reads it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[1].lstrip().startswith("hint:"), result.output
    assert needle in lines[0] and "internal error" not in result.output, result.output


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")


def non_json_metadata(path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "{not json"})


CORRUPTIONS = [truncated, garbage, non_json_metadata]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupt_readout_file_in_monitor(isolated_env, tmp_path, tiny_factory, corrupt):
    from personactl.steps.readout import Readout

    path = tmp_path / "r.safetensors"
    tensors = {f"vectors.{r}": torch.eye(2, 32) for r in (1, 2)} | {f"center.{r}": torch.zeros(32) for r in (1, 2)}
    Readout(tensors, {"concepts": ["calm", "angry"], "rows": [1, 2]}).save(path)
    corrupt(path)
    result = invoke("monitor", "--readout", path, "--text", "hi", "--model", tiny_factory("llama"), "-w", tmp_path)
    assert_one_line_error(result, f"{path} is not a readable safetensors file")


def test_readout_whose_tensors_disagree_with_its_concepts(isolated_env, tmp_path, tiny_factory):
    from personactl.steps.readout import Readout

    path = tmp_path / "r.safetensors"
    Readout({"vectors.1": torch.eye(3, 32), "center.1": torch.zeros(32)}, {"concepts": ["a", "b"], "rows": [1]}).save(
        path
    )
    result = invoke("monitor", "--readout", path, "--text", "hi", "--model", tiny_factory("llama"), "-w", tmp_path)
    assert_one_line_error(result, "do not match its 2 concepts")


@pytest.fixture(scope="module")
def kept_pairs(tmp_path_factory, tiny_factory):
    """A workspace with a vector `plain` extracted with --keep-pairs (its sidecar path returned)."""
    root = tmp_path_factory.mktemp("kept-pairs")
    pairs = root / "plain.jsonl"
    pairs.write_text("\n".join(json.dumps({"positive": f"happy {i}", "negative": f"sad {i}"}) for i in range(4)))
    model = tiny_factory("llama")
    ws = root / "ws"
    done = invoke("extract", "--pairs", pairs, "--model", model, "-w", ws, "--keep-pairs", "--dtype", "float32")
    assert done.exit_code == 0, done.output
    (sidecar,) = ws.rglob("pair-diffs-*.safetensors")
    return model, ws, sidecar


def compare_with_bootstrap(model, ws):
    return invoke("compare", "plain", "plain", "--bootstrap", "20", "--model", model, "-w", ws, "--json")


def test_intact_pair_diffs_bootstrap(isolated_env, kept_pairs):
    model, ws, _ = kept_pairs
    result = compare_with_bootstrap(model, ws)
    assert result.exit_code == 0, result.output
    assert "ci" in json.loads(result.stdout)["pairs"][0]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupt_pair_diffs_in_compare(isolated_env, kept_pairs, corrupt):
    model, ws, sidecar = kept_pairs
    intact = sidecar.read_bytes()
    try:
        corrupt(sidecar)
        assert_one_line_error(compare_with_bootstrap(model, ws), f"{sidecar} is not a readable safetensors file")
    finally:
        sidecar.write_bytes(intact)


def test_pair_diffs_with_the_wrong_rows(isolated_env, kept_pairs):
    from personactl.steps.pair_diffs import load_pair_diffs, save_pair_diffs

    model, ws, sidecar = kept_pairs
    intact = sidecar.read_bytes()
    diffs, metadata = load_pair_diffs(sidecar, "response_avg")
    try:
        save_pair_diffs(sidecar, {"response_avg": diffs[:, :1]}, metadata)
        assert_one_line_error(compare_with_bootstrap(model, ws), "rows, hidden]")
    finally:
        sidecar.write_bytes(intact)
