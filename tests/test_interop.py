"""export / import / show: every format round-trips, files read back with their own readers, and
the layer mapping (file block N == personactl row N+1) holds both in the files and in the model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.core.directions import unit
from personactl.store.vectors import LAYER_CONVENTION, PersonaVector

DATA = Path(__file__).parent / "data" / "interop"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def expect_error(result, needle):
    assert result.exit_code == 2, result.output
    assert needle in result.output, result.output
    assert "Traceback" not in result.output and "hint:" in result.output


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from personactl.model.loading import load_model

    return load_model(str(tiny_llama), dtype="float32", device="cpu", log=lambda m: None)


def make_vector(lm, seed: int = 0) -> PersonaVector:
    """A vector file with random directions but the metadata extraction writes."""
    g = torch.Generator().manual_seed(seed)
    rows, hidden = lm.num_layers + 1, lm.hidden_size
    tensors = {"stream_norm": torch.rand(rows, generator=g) + 1.0}
    for position in ("prompt_end", "response_avg"):
        mean_diff = torch.randn(rows, hidden, generator=g)
        tensors[f"mean_diff.{position}"] = mean_diff
        tensors[f"pca.{position}"] = unit(mean_diff)
        tensors[f"pos_mean.{position}"] = torch.randn(rows, hidden, generator=g)
        tensors[f"neg_mean.{position}"] = tensors[f"pos_mean.{position}"] - mean_diff
    tensors["mean_diff.prompt_end"][0] = 0.0  # as extraction leaves it: no direction at the embeddings
    tensors["pca.prompt_end"][0] = float("nan")
    metadata = {
        **lm.describe(),
        "layer_convention": LAYER_CONVENTION,
        "rows": list(range(rows)),
        "positions": ["prompt_end", "response_avg"],
        "aggregators": ["mean_diff", "pca"],
        "n_pairs": 4,
        "n_tokens": 96,
        "trait": "happy",
        "trait_sha256": None,
        "persona": "model",
        "source": "responses",
        "judge": None,
        "personactl_version": "test",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return PersonaVector(tensors, metadata)


@pytest.fixture
def ws(lm, tmp_path, isolated_env):
    """A workspace holding the extracted-looking vector `happy` for the tiny model."""
    from personactl.store.workspace import Workspace

    root = tmp_path / "ws"
    vector = make_vector(lm)
    path = Workspace(root).vectors_path(lm.source.slug, "happy", "model")
    vector.save(path)
    return root, vector


def common(lm, ws_root):
    return ["--model", lm.source.spec, "-w", ws_root]


def import_json(lm, ws_root, source, *extra):
    result = invoke("import", source, *common(lm, ws_root), "--json", *extra)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    return doc, PersonaVector.load(doc["artifact"])


def assert_nan_except(table: torch.Tensor, rows: list[int]):
    for r in range(table.shape[0]):
        assert torch.isnan(table[r]).all() != (r in rows), r


# ---------------------------------------------------------------- GGUF (llama.cpp, repeng)


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.get_field(name)
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])

    tensors = {t.name: (t.tensor_type, list(t.shape), torch.tensor(t.data.copy())) for t in reader.tensors}
    return field, tensors


def test_gguf_export_is_a_llama_cpp_control_vector(lm, ws, tmp_path):
    import gguf

    root, vector = ws
    out = tmp_path / "happy.gguf"
    result = invoke("export", "happy", *common(lm, root), "--layers", "2-3", "--scale", "1.5", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["file_index"] == {"2": "direction.1", "3": "direction.2"}
    field, tensors = read_gguf(out)
    assert field("GGUF.version") == 3
    assert field("general.architecture") == "controlvector"
    assert field("controlvector.model_hint") == lm.source.spec
    assert field("controlvector.layer_count") == 2
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for block in (1, 2):
        kind, shape, data = tensors[f"direction.{block}"]
        assert kind == gguf.GGMLQuantizationType.F32 and shape == [lm.hidden_size]
        # the tensor for block N is vector row N+1, scaled
        assert torch.equal(data, vector.get("response_avg", "mean_diff")[block + 1] * 1.5)
    provenance = json.loads(field("personactl.metadata"))
    assert provenance["rows"] == [2, 3] and provenance["position"] == "response_avg"


def test_gguf_export_default_rows_and_refusals(lm, ws, tmp_path):
    root, _ = ws
    out = tmp_path / "all.gguf"
    assert invoke("export", "happy", *common(lm, root), "-o", out).exit_code == 0
    _, tensors = read_gguf(out)
    assert sorted(tensors) == ["direction.1", "direction.2"]  # rows 2..L: llama.cpp rejects direction.0
    expect_error(invoke("export", "happy", *common(lm, root), "--layers", "1-3", "-o", out), "rejects direction.0")
    expect_error(invoke("export", "happy", *common(lm, root), "--layers", "0", "-o", out), "row 0 cannot be exported")
    expect_error(invoke("export", "happy", *common(lm, root), "--layers", "9", "-o", out), "layer 9 was not extracted")
    expect_error(invoke("export", "happy", *common(lm, root), "-o", tmp_path / "x.bin"), "cannot tell the format")
    expect_error(invoke("export", "happy", *common(lm, root), "-f", "onnx", "-o", out), "unknown export format")
    expect_error(
        invoke("export", "happy", *common(lm, root), "--position", "prompt_avg", "-o", out), "no mean_diff.prompt_avg"
    )


def test_gguf_round_trip_through_the_cli(lm, ws, tmp_path):
    root, vector = ws
    out = tmp_path / "happy.gguf"
    exported = invoke(
        "export", "happy", *common(lm, root), "--aggregator", "pca", "--position", "prompt_end", "-o", out
    )
    assert exported.exit_code == 0, exported.output
    doc, back = import_json(lm, root, out, "--name", "happy-back")
    assert doc["format"] == "gguf" and doc["rows"] == [2, 3]
    # the exported position and aggregator come back from the file's personactl metadata
    assert back.positions == ["prompt_end"] and back.aggregators == ["pca"]
    table = back.get("prompt_end", "pca")
    assert table.shape == (lm.num_layers + 1, lm.hidden_size)
    assert_nan_except(table, [2, 3])
    for row in (2, 3):
        assert torch.equal(table[row], vector.get("prompt_end", "pca")[row])
    assert back.metadata["model_fingerprint"] == lm.fingerprint
    assert back.metadata["imported_from"]["format"] == "gguf"
    assert back.metadata["imported_from"]["file_indices"] == {"2": 1, "3": 2}
    assert "stream_norm" not in back.tensors
    # imported rows work where vectors are used
    assert torch.equal(back.direction(3, "prompt_end", "pca"), vector.get("prompt_end", "pca")[3])
    again = invoke("import", out, *common(lm, root), "--name", "happy-back")
    assert again.exit_code == 0 and "skipped" in again.output
    # a different file under the same name is refused without --force
    other = tmp_path / "other.gguf"
    assert invoke("export", "happy", *common(lm, root), "-o", other, "--scale", "2").exit_code == 0
    expect_error(invoke("import", other, *common(lm, root), "--name", "happy-back"), "different inputs")
    assert invoke("import", other, *common(lm, root), "--name", "happy-back", "--force").exit_code == 0


def test_repeng_gguf_imports_with_block_n_as_row_n_plus_1(lm, ws):
    root, _ = ws
    expected = json.loads((DATA / "expected.json").read_text())["repeng"]
    doc, back = import_json(lm, root, DATA / "repeng-controlvector.gguf")
    assert doc["name"] == "repeng-controlvector" and doc["rows"] == [2, 3]
    table = back.get("response_avg", "mean_diff")
    for block, values in expected.items():
        assert torch.equal(table[int(block) + 1], torch.tensor(values, dtype=torch.float32))
    assert back.metadata["imported_from"]["model_hint"] == "llama"


def test_gguf_that_is_not_a_control_vector_is_refused(lm, ws, tmp_path):
    import gguf
    import numpy as np

    root, _ = ws
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expect_error(invoke("import", path, *common(lm, root)), "GGUF file for 'llama', not a control vector")
    wide = tmp_path / "wide.gguf"
    from personactl.store.interop.gguf_cv import write_control_vector

    write_control_vector(wide, {1: torch.ones(48)}, "x", {})
    expect_error(invoke("import", wide, *common(lm, root)), "48 dimensions but")
    deep = tmp_path / "deep.gguf"
    write_control_vector(deep, {3: torch.ones(32)}, "x", {})
    expect_error(invoke("import", deep, *common(lm, root)), "block 3 does not exist")
    expect_error(invoke("import", deep, *common(lm, root), "--layer-index", "row"), "does not apply to gguf")


# ---------------------------------------------------------------- steering-vectors


def test_steering_vectors_export_loads_weights_only_and_round_trips(lm, ws, tmp_path):
    root, vector = ws
    out = tmp_path / "happy-sv.pt"
    result = invoke("export", "happy", *common(lm, root), "-f", "steering-vectors", "--norm", "unit", "-o", out)
    assert result.exit_code == 0, result.output
    payload = torch.load(out, weights_only=True)
    # SteeringVector(**payload) needs exactly these fields
    assert set(payload) == {"layer_activations", "layer_type"} and payload["layer_type"] == "decoder_block"
    assert sorted(payload["layer_activations"]) == [0, 1, 2]  # rows 1..3: the embeddings have no block
    for block, act in payload["layer_activations"].items():
        assert torch.allclose(act, unit(vector.get("response_avg", "mean_diff")[block + 1]))
    _, back = import_json(lm, root, out, "--name", "sv-back")
    table = back.get("response_avg", "mean_diff")
    assert_nan_except(table, [1, 2, 3])
    for block, act in payload["layer_activations"].items():
        assert torch.equal(table[block + 1], act)


def test_pickled_steering_vector_object_imports_without_the_package(lm, ws):
    root, _ = ws
    expected = json.loads((DATA / "expected.json").read_text())["steering_vectors"]
    doc, back = import_json(lm, root, DATA / "steering-vectors-object.pt", "--name", "svobj")
    assert doc["format"] == "steering-vectors" and doc["rows"] == [1, 3]
    table = back.get("response_avg", "mean_diff")
    for block, values in expected.items():
        assert torch.equal(table[int(block) + 1], torch.tensor(values, dtype=torch.float32))


def test_block_index_and_row_steer_the_same_stream(lm, ws):
    """steering-vectors adds layer_activations[k] to the output of decoder block k (a forward hook, as
    llama.cpp adds direction.k): that is exactly personactl steering row k+1."""
    from personactl.model.steering import Steerer

    _, vector = ws
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    row = 2
    v = vector.get("response_avg", "mean_diff")[row]

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + v
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        plain = lm.model(ids).logits
        handle = lm.layers[row - 1].register_forward_hook(hook)  # block k = row - 1
        try:
            foreign = lm.model(ids).logits
        finally:
            handle.remove()
        with Steerer(lm.model, v, layers=[row], coefficient=1.0):
            ours = lm.model(ids).logits
    assert not torch.allclose(plain, ours)
    assert torch.allclose(foreign, ours, atol=1e-5)


# ---------------------------------------------------------------- .pt tensors and JSON pairs


def test_pt_rows_round_trip_and_shape_errors(lm, ws, tmp_path):
    root, vector = ws
    out = tmp_path / "happy.pt"
    assert invoke("export", "happy", *common(lm, root), "-f", "pt", "--layers", "0,2", "-o", out).exit_code == 0
    table = torch.load(out, weights_only=True)
    assert table.shape == (lm.num_layers + 1, lm.hidden_size)
    assert_nan_except(table, [0, 2])
    _, back = import_json(lm, root, out, "--name", "pt-back")
    assert back.rows == [0, 2] and torch.equal(back.get()[2], vector.get()[2])

    foreign = tmp_path / "persona_vectors.pt"  # a full [L+1, H] tensor as persona_vectors saves it
    full = torch.randn(lm.num_layers + 1, lm.hidden_size)
    torch.save(full, foreign)
    _, back = import_json(lm, root, foreign, "--name", "pv")
    assert back.rows == [0, 1, 2, 3] and torch.equal(back.get(), full)

    short = tmp_path / "short.pt"
    torch.save(torch.randn(lm.num_layers, lm.hidden_size), short)
    expect_error(invoke("import", short, *common(lm, root)), "has 3 rows but")
    wide = tmp_path / "wide.pt"
    torch.save(torch.randn(lm.num_layers + 1, 48), wide)
    expect_error(invoke("import", wide, *common(lm, root)), "48 dimensions but")
    single = tmp_path / "single.pt"
    torch.save(torch.randn(lm.hidden_size), single)
    expect_error(invoke("import", single, *common(lm, root)), "pass --layer N")
    _, back = import_json(lm, root, single, "--layer", "2")
    assert back.rows == [2]
    _, back = import_json(lm, root, single, "--layer", "-1", "--layer-index", "block", "--name", "last-block")
    assert back.rows == [3]
    expect_error(invoke("import", foreign, *common(lm, root), "--layer", "2"), "--layer applies only")
    odd = tmp_path / "odd.pt"
    torch.save({"weights": [1, 2, 3]}, odd)
    expect_error(invoke("import", odd, *common(lm, root)), "not a vector file personactl knows")


def test_json_pair_round_trip_and_layer_conventions(lm, ws, tmp_path):
    root, vector = ws
    out = tmp_path / "happy.json"
    result = invoke("export", "happy", *common(lm, root), "--layers", "2", "--scale", "-1", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["vector"] == "happy.pt" and record["layer"] == 2 and record["model"] == lm.source.spec
    assert torch.equal(torch.load(tmp_path / "happy.pt", weights_only=True), -vector.get()[2])
    _, back = import_json(lm, root, out, "--name", "json-back")
    assert back.rows == [2] and torch.equal(back.get()[2], -vector.get()[2])
    expect_error(invoke("export", "happy", *common(lm, root), "-o", out), "holds one layer")

    inline = tmp_path / "inline.json"  # persona-toolkit style: layer = hidden_states index = row
    inline.write_text(json.dumps({"vector": [0.5] * 32, "layer": 1, "model": "some/model", "hidden_size": 32}))
    _, back = import_json(lm, root, inline)
    assert back.rows == [1] and back.metadata["imported_from"]["model_hint"] == "some/model"
    _, back = import_json(lm, root, inline, "--layer-index", "block", "--name", "inline-block")
    assert back.rows == [2]

    janus = tmp_path / "persona_formal.json"  # Janus: layer_idx is a 0-based block, tensor beside it
    janus.write_text(json.dumps({"layer_idx": -1, "hidden_size": 32}))
    torch.save(torch.randn(32), tmp_path / "persona_formal.pt")
    _, back = import_json(lm, root, janus)
    assert back.rows == [lm.num_layers]

    dict_pt = tmp_path / "dict.pt"  # the same record saved with torch.save
    torch.save({"name": "x", "vector": torch.randn(32), "layer": 3, "model": "m", "hidden_dim": 32}, dict_pt)
    _, back = import_json(lm, root, dict_pt)
    assert back.rows == [3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vector": [1.0] * 31, "layer": 1, "hidden_size": 32}))
    expect_error(invoke("import", bad, *common(lm, root)), "says hidden size 32 but its vector has 31")


# ---------------------------------------------------------------- unsafe and unknown files


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_code_pickles_and_unknown_files_are_refused(lm, ws, tmp_path):
    root, _ = ws
    evil = tmp_path / "evil.pt"
    torch.save({"vector": _RunsCode(), "layer": 1}, evil)
    expect_error(invoke("import", evil, *common(lm, root)), "is not a weights-only file: it pickles")
    assert not (Path.cwd() / "pwned-by-pickle").exists()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01not a vector file")
    expect_error(invoke("import", junk, *common(lm, root)), "unknown vector file format")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    expect_error(invoke("import", broken, *common(lm, root)), "not a readable torch file")
    ours = next(root.rglob("vectors-model.safetensors"))
    expect_error(invoke("import", ours, *common(lm, root)), "already a personactl vector file")
    expect_error(invoke("import", junk, *common(lm, root), "--name", "Bad Name"), "unknown vector file format")
    good = tmp_path / "good.pt"
    torch.save(torch.randn(lm.num_layers + 1, lm.hidden_size), good)
    expect_error(invoke("import", good, *common(lm, root), "--name", "Bad Name"), "bad vector name")
    missing = invoke("import", good, "-w", root)
    assert missing.exit_code == 2 and "--model" in missing.output


# ---------------------------------------------------------------- show, and using an import


def test_show_reports_metadata_shapes_and_norms(lm, ws, tmp_path):
    root, vector = ws
    result = invoke("show", "happy", *common(lm, root), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["metadata"]["trait"] == "happy" and doc["metadata"]["hidden_size"] == lm.hidden_size
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    assert shapes["mean_diff.response_avg"] == [lm.num_layers + 1, lm.hidden_size]
    assert shapes["stream_norm"] == [lm.num_layers + 1]
    assert doc["directions"] == ["mean_diff.prompt_end", "mean_diff.response_avg", "pca.prompt_end", "pca.response_avg"]
    norms = vector.norms("response_avg", "mean_diff")
    assert [row["layer"] for row in doc["layers"]] == [0, 1, 2, 3]
    for row in doc["layers"]:
        assert row["mean_diff.response_avg"] == pytest.approx(float(norms[row["layer"]]))
        assert row["stream_norm"] == pytest.approx(float(vector.tensors["stream_norm"][row["layer"]]))
    assert doc["layers"][0]["pca.prompt_end"] is None  # NaN row: no direction
    table = invoke("show", "happy", *common(lm, root))
    assert table.exit_code == 0 and "norms per layer" in table.output and "—" in table.output
    assert f"{float(norms[3]):.4f}" in table.output

    out = tmp_path / "h.gguf"
    assert invoke("export", "happy", *common(lm, root), "-o", out).exit_code == 0
    doc, _ = import_json(lm, root, out, "--name", "shown")
    shown = json.loads(invoke("show", doc["artifact"], *common(lm, root), "--json").stdout)
    assert [row["layer"] for row in shown["layers"]] == [2, 3] and shown["layers"][0]["stream_norm"] is None
    assert shown["metadata"]["imported_from"]["format"] == "gguf"
    assert "imported from" in invoke("show", doc["artifact"], *common(lm, root)).output
    expect_error(invoke("show", "nosuch", *common(lm, root)), "no vectors for 'nosuch'")


def test_imported_vector_steers_and_compares(lm, ws, tmp_path):
    root, _ = ws
    out = tmp_path / "h.gguf"
    assert invoke("export", "happy", *common(lm, root), "-o", out).exit_code == 0
    import_json(lm, root, out, "--name", "back")
    steered = invoke(
        "steer", "--vector", "back", *common(lm, root), "--layers", "2", "--prompt", "hi", "--max-new-tokens", "2"
    )
    assert steered.exit_code == 0, steered.output
    compared = json.loads(invoke("compare", "happy", "back", *common(lm, root), "--json").stdout)
    assert compared["layers"] == [2, 3] and compared["pairs"][0]["cosine"] == pytest.approx([1.0, 1.0], abs=1e-5)
    expect_error(
        invoke("export", "back", *common(lm, root), "--norm", "stream", "-o", tmp_path / "s.gguf"), "no stream norms"
    )
