"""A corrupt readout or pair-differences file is one line naming the file plus a hint, exit 2 —
never "internal error" (exit 1), whichever command reads it: `monitor --readout`, `chat --readout`,
`compare --bootstrap`. All three file kinds go through store/tagged_file.py, tested directly here too."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.errors import VectorFileError
from personactl.store.pair_diffs_file import load_pair_diffs, save_pair_diffs
from personactl.store.readout_file import Readout, readout_metadata
from personactl.store.tagged_file import read_tagged, write_tagged

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


def write_readout(path):
    tensors = {f"vectors.{r}": torch.eye(2, 32) for r in (1, 2)} | {f"center.{r}": torch.zeros(32) for r in (1, 2)}
    Readout(tensors, {"concepts": ["calm", "angry"], "rows": [1, 2]}).save(path)
    return path


# ---------------------------------------------------------------- the one reader/writer


def test_tagged_file_round_trip_is_atomic_and_reads_only_the_keys_asked(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3).T, "b": torch.ones(2)}  # `a` is not contiguous
    write_tagged(path, tensors, "test.kind/1", {"rows": [1, 2], "nested": {"x": None}})
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    file = read_tagged(path, "test.kind/1", "remake it", what="test file")
    assert file.metadata == {"rows": [1, 2], "nested": {"x": None}}  # the tag is not metadata
    assert set(file.tensors) == {"a", "b"} and torch.equal(file.tensors["a"], tensors["a"])
    only = read_tagged(path, "test.kind/1", "remake it", what="test file", keys={"b", "missing"})
    assert set(only.tensors) == {"b"}


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_tagged_file_corrupt_or_foreign_is_one_vector_file_error(tmp_path, corrupt):
    path = tmp_path / "t.safetensors"
    write_tagged(path, {"a": torch.zeros(64)}, "test.kind/1", {})
    with pytest.raises(VectorFileError, match="is not a test file .format='test.kind/1'.") as foreign:
        read_tagged(path, "test.other/1", "remake it", what="test file")
    assert foreign.value.hint == "remake it"
    corrupt(path)
    with pytest.raises(VectorFileError, match="is not a readable safetensors file") as broken:
        read_tagged(path, "test.kind/1", "remake it", what="test file")
    assert broken.value.hint == "remake it" and "\n" not in broken.value.message


# ---------------------------------------------------------------- readout files


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupt_readout_file_in_monitor(isolated_env, tmp_path, tiny_factory, corrupt):
    path = write_readout(tmp_path / "r.safetensors")
    corrupt(path)
    result = invoke("monitor", "--readout", path, "--text", "hi", "--model", tiny_factory("llama"), "-w", tmp_path)
    assert_one_line_error(result, f"{path} is not a readable safetensors file")


def test_readout_whose_tensors_disagree_with_its_concepts(isolated_env, tmp_path, tiny_factory):
    path = tmp_path / "r.safetensors"
    Readout({"vectors.1": torch.eye(3, 32), "center.1": torch.zeros(32)}, {"concepts": ["a", "b"], "rows": [1]}).save(
        path
    )
    result = invoke("monitor", "--readout", path, "--text", "hi", "--model", tiny_factory("llama"), "-w", tmp_path)
    assert_one_line_error(result, "do not match its 2 concepts")


def test_a_vector_file_given_as_readout(isolated_env, kept_pairs):
    model, ws, sidecar = kept_pairs
    vector = sidecar.with_name(sidecar.name.replace("pair-diffs-", "vectors-"))
    result = invoke("monitor", "--readout", vector, "--text", "hi", "--model", model, "-w", ws)
    assert_one_line_error(result, f"{vector} is not a personactl readout file (format='personactl.vector/1')")


@pytest.mark.parametrize("corrupt", [truncated, garbage], ids=lambda f: f.__name__)
def test_corrupt_readout_file_in_chat(isolated_env, tmp_path, kept_pairs, corrupt):
    model, ws, _ = kept_pairs
    path = write_readout(tmp_path / "r.safetensors")
    corrupt(path)
    args = ["chat", "--vector", "plain", "--model", model, "-w", ws, "--readout", path, "--json"]
    result = runner.invoke(app, [str(a) for a in args], "hello\n")
    assert_one_line_error(result, f"{path} is not a readable safetensors file")


def test_readout_metadata_alone(tmp_path):
    path = write_readout(tmp_path / "r.safetensors")
    assert readout_metadata(path) == {"concepts": ["calm", "angry"], "rows": [1, 2]}
    garbage(path)
    with pytest.raises(VectorFileError, match="is not a readable safetensors file"):
        readout_metadata(path)


def test_ls_lists_a_corrupt_readout_as_unreadable(isolated_env, tmp_path):
    path = write_readout(tmp_path / "ws" / "some-model" / "readouts" / "moods.safetensors")
    garbage(path)
    result = invoke("ls", "-w", tmp_path / "ws", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["artifacts"]
    assert (row["kind"], row["path"]) == ("readout (unreadable)", str(path))


# ---------------------------------------------------------------- pair-differences files


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


def test_pair_diffs_replaced_by_another_tagged_file(isolated_env, kept_pairs):
    model, ws, sidecar = kept_pairs
    intact = sidecar.read_bytes()
    try:
        write_readout(sidecar)
        result = compare_with_bootstrap(model, ws)
        assert_one_line_error(result, f"{sidecar} is not a personactl pair-diffs file (format='personactl.readout/1')")
    finally:
        sidecar.write_bytes(intact)


def test_pair_diffs_without_the_position(isolated_env, kept_pairs):
    _, _, sidecar = kept_pairs
    with pytest.raises(VectorFileError, match="has no per-pair differences at user_avg"):
        load_pair_diffs(sidecar, "user_avg")


def test_pair_diffs_with_the_wrong_rows(isolated_env, kept_pairs):
    model, ws, sidecar = kept_pairs
    intact = sidecar.read_bytes()
    diffs, metadata = load_pair_diffs(sidecar, "response_avg")
    try:
        save_pair_diffs(sidecar, {"response_avg": diffs[:, :1]}, metadata)
        assert_one_line_error(compare_with_bootstrap(model, ws), "rows, hidden]")
    finally:
        sidecar.write_bytes(intact)
