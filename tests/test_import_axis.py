"""Importing assistant-axis files: an axis (one row per decoder block) and a capping config (capped
vectors with their thresholds τ). The files are built here in the layout that project saves, from
activations read the way it reads them (a forward hook on each decoder block), so the test checks
the layer mapping against the model: its block k is personactl row k + 1, exactly."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.store.vectors import PersonaVector

runner = CliRunner()
DEFAULT_TEXT = [[5, 17, 42, 9, 3, 11], [7, 8, 21, 30, 2, 6]]
ROLE_TEXT = [[12, 40, 33, 4, 19, 25], [14, 28, 3, 50, 1, 9]]


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


@pytest.fixture
def ws(tmp_path, isolated_env):
    return tmp_path / "ws"


def common(lm, root):
    return ["--model", lm.source.spec, "-w", root]


def block_means(lm, texts) -> torch.Tensor:
    """Mean over tokens and texts of each decoder block's output, `[blocks, H]`: hooks on
    `layers[k]`, as assistant-axis reads activations (so its index k is block k)."""
    outputs: dict[int, list[torch.Tensor]] = {k: [] for k in range(lm.num_layers)}
    handles = []
    for k, block in enumerate(lm.layers):

        def hook(_module, _inputs, output, k=k):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[k].append(hidden[0].mean(dim=0))

        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for ids in texts:
                lm.model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([torch.stack(outputs[k]).mean(dim=0) for k in range(lm.num_layers)])


def stream_means(lm, texts) -> torch.Tensor:
    """The same means from HF `hidden_states` (personactl's rows 0..L-1), `[L+1, H]` with row L NaN:
    HF's last entry is after the final norm, personactl's row L before it."""
    per_text = []
    with torch.no_grad():
        for ids in texts:
            states = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            per_text.append(torch.stack([s[0].mean(dim=0) for s in states]))
    means = torch.stack(per_text).mean(dim=0)
    means[lm.num_layers] = float("nan")
    return means


def axis_file(lm, path, *, pipeline: bool = True):
    """An axis saved as assistant-axis saves one: `axis` = default mean − role mean, per block; the
    pipeline's file also keeps both means and their counts, the library's keeps a metadata dict."""
    default, role = block_means(lm, DEFAULT_TEXT), block_means(lm, ROLE_TEXT)
    axis = default - role
    if pipeline:
        payload = {"axis": axis, "default_mean": default, "role_mean": role, "n_default": 2, "n_roles": 2}
    else:
        payload = {"axis": axis, "metadata": {"model_name": "tiny", "note": "made in a test"}}
    torch.save(payload, path)
    return axis


def capping_config(lm, path, axis, caps: dict[str, dict[int, float]]):
    """A capping config in that project's layout: named vectors with their block (`layer`), and
    experiments listing which vector is capped at which τ."""
    vectors = {f"axis_layer_{k}": {"layer": k, "vector": axis[k].clone()} for k in range(lm.num_layers)}
    experiments = [
        {"id": exp_id, "interventions": [{"vector": f"axis_layer_{k}", "cap": tau} for k, tau in by_block.items()]}
        for exp_id, by_block in caps.items()
    ]
    torch.save({"vectors": vectors, "experiments": experiments}, path)


def import_json(lm, root, source, *extra):
    result = invoke("import", source, *common(lm, root), "--json", *extra)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    return doc, PersonaVector.load(doc["artifact"])


def test_axis_rows_are_blocks_plus_one_exactly(lm, ws, tmp_path):
    path = tmp_path / "assistant_axis.pt"
    axis = axis_file(lm, path)
    doc, vector = import_json(lm, ws, path, "--name", "assistant")
    assert doc["format"] == "assistant-axis"
    assert vector.rows == list(range(1, lm.num_layers + 1))  # no embeddings row in an axis
    table = vector.get("response_avg", "mean_diff")
    assert torch.isnan(table[0]).all()
    for k in range(lm.num_layers):
        assert torch.equal(table[k + 1], axis[k])
    # and the rows are personactl's own rows: HF hidden_states[l] for l < L, read without hooks
    streams = stream_means(lm, DEFAULT_TEXT) - stream_means(lm, ROLE_TEXT)
    for row in range(1, lm.num_layers):
        assert torch.equal(table[row], streams[row])
        assert not torch.equal(table[row], streams[row + 1])  # a one-layer shift would be visible
    meta = vector.metadata
    assert meta["imported_from"]["file_indices"] == {str(k + 1): k for k in range(lm.num_layers)}
    assert meta["imported_from"]["details"] == {"n_default": 2, "n_roles": 2}
    assert meta["operation"] == "add" and "output of decoder block l" in meta["hook_site"]
    assert "cap_thresholds" not in meta


def test_axis_saved_by_the_library_and_in_bfloat16(lm, ws, tmp_path):
    path = tmp_path / "axis.pt"
    axis = axis_file(lm, path, pipeline=False)
    _, vector = import_json(lm, ws, path, "--name", "lib-axis")
    assert vector.metadata["imported_from"]["details"]["metadata"]["model_name"] == "tiny"
    half = tmp_path / "axis-bf16.pt"
    torch.save({"axis": axis.to(torch.bfloat16)}, half)
    _, vector = import_json(lm, ws, half, "--name", "bf16-axis")
    assert torch.equal(vector.get()[1:], axis.to(torch.bfloat16).float())  # widened exactly


def test_capping_config_keeps_thresholds_per_row(lm, ws, tmp_path):
    axis = block_means(lm, DEFAULT_TEXT) - block_means(lm, ROLE_TEXT)
    path = tmp_path / "capping_config.pt"
    capping_config(lm, path, axis, {"layers_1:2-p0.25": {1: 0.5, 2: -0.25}, "layers_0:0-p0.5": {0: 3.0}})
    expect_error(invoke("import", path, *common(lm, ws)), "choose one with --experiment")
    expect_error(invoke("import", path, *common(lm, ws), "--experiment", "nope"), "no capping experiment 'nope'")
    doc, vector = import_json(lm, ws, path, "--experiment", "layers_1:2-p0.25", "--name", "capped")
    assert doc["format"] == "assistant-axis-caps" and doc["rows"] == [2, 3]
    assert doc["cap_thresholds"] == {"2": 0.5, "3": -0.25}
    table = vector.get()
    assert torch.equal(table[2], axis[1]) and torch.equal(table[3], axis[2])
    caps = vector.metadata["cap_thresholds"]
    assert caps["rows"] == {"2": 0.5, "3": -0.25} and caps["unit"] == "projection"
    assert caps["experiment"] == "layers_1:2-p0.25" and caps["slot"] == "mean_diff.response_avg"
    assert caps["positions"] == "all"
    assert vector.metadata["operation"] == "cap"


def test_threshold_unit_is_the_projection_on_the_unit_direction(lm, ws, tmp_path):
    """τ as that project applies it (the excess of h·v/|v| over τ removed along v/|v|, at block k's
    output) equals personactl's cap at row k + 1 with the imported τ, without rescaling."""
    from personactl.model.steering_ops import apply_terms, cap_term

    axis = block_means(lm, DEFAULT_TEXT) - block_means(lm, ROLE_TEXT)
    block = 1
    with torch.no_grad():
        states = lm.model(torch.tensor([DEFAULT_TEXT[0]]), output_hidden_states=True).hidden_states
    hidden = states[block + 1]  # the output of block 1
    v = axis[block]
    projections = hidden[0] @ (v / v.norm())
    tau = float(projections.median())  # some tokens above, some below
    path = tmp_path / "capping_config.pt"
    capping_config(lm, path, axis, {"one": {block: tau}})
    _, vector = import_json(lm, ws, path, "--name", "unit-check")
    row = block + 1
    imported_tau = vector.metadata["cap_thresholds"]["rows"][str(row)]
    ours = apply_terms(hidden, [cap_term(vector.get()[row], imported_tau)])
    unit = v / (v.norm() + 1e-8)  # that project's normalisation
    excess = ((hidden @ unit) - tau).clamp(min=0.0)
    theirs = hidden - excess[..., None] * unit
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, hidden)  # the cap acted
    assert ((ours[0] @ (v / v.norm())) <= tau + 1e-4).all()


def test_bad_assistant_axis_files_get_one_line(lm, ws, tmp_path):
    axis = block_means(lm, DEFAULT_TEXT) - block_means(lm, ROLE_TEXT)
    wrong_count = tmp_path / "deep.pt"
    torch.save({"axis": torch.randn(lm.num_layers + 1, lm.hidden_size)}, wrong_count)
    expect_error(invoke("import", wrong_count, *common(lm, ws)), "one per decoder block")
    flat = tmp_path / "flat.pt"
    torch.save({"axis": torch.randn(lm.hidden_size)}, flat)
    expect_error(invoke("import", flat, *common(lm, ws)), "expected a [blocks, hidden] tensor")
    narrow = tmp_path / "narrow.pt"
    torch.save({"axis": torch.randn(lm.num_layers, 48)}, narrow)
    expect_error(invoke("import", narrow, *common(lm, ws)), "48 dimensions but")
    twice = tmp_path / "twice.pt"
    torch.save(
        {
            "vectors": {"a": {"layer": 1, "vector": axis[1]}, "b": {"layer": 1, "vector": axis[0]}},
            "experiments": [{"id": "x", "interventions": [{"vector": "a", "cap": 1.0}, {"vector": "b", "cap": 2.0}]}],
        },
        twice,
    )
    expect_error(invoke("import", twice, *common(lm, ws)), "caps two vectors at block 1")
    missing = tmp_path / "missing.pt"
    torch.save({"vectors": {}, "experiments": [{"id": "x", "interventions": [{"vector": "a", "cap": 1.0}]}]}, missing)
    expect_error(invoke("import", missing, *common(lm, ws)), "names vector 'a'")
    words = tmp_path / "words.pt"
    torch.save(
        {
            "vectors": {"a": {"layer": 0, "vector": axis[0]}},
            "experiments": [{"id": "x", "interventions": [{"vector": "a", "cap": "high"}]}],
        },
        words,
    )
    expect_error(invoke("import", words, *common(lm, ws)), "not a number")
    nothing = tmp_path / "nothing.pt"
    torch.save({"vectors": {}, "experiments": [{"id": "x", "interventions": [{"vector": "a"}]}]}, nothing)
    expect_error(invoke("import", nothing, *common(lm, ws)), "caps no vector")
    deep_block = tmp_path / "deep-block.pt"
    torch.save(
        {
            "vectors": {"a": {"layer": 7, "vector": axis[0]}},
            "experiments": [{"id": "x", "interventions": [{"vector": "a", "cap": 1.0}]}],
        },
        deep_block,
    )
    expect_error(invoke("import", deep_block, *common(lm, ws)), "block 7 does not exist")
    plain = tmp_path / "plain.pt"
    torch.save(torch.randn(lm.num_layers + 1, lm.hidden_size), plain)
    expect_error(invoke("import", plain, *common(lm, ws), "--experiment", "x"), "--experiment applies only")
    axis_path = tmp_path / "axis.pt"
    torch.save({"axis": axis}, axis_path)
    expect_error(invoke("import", axis_path, *common(lm, ws), "--layer-index", "row"), "does not apply")
    assert not list((ws).glob("**/*.safetensors"))  # nothing half-written


def test_bare_block_table_imports_with_layer_index_block(lm, ws, tmp_path):
    """A bare `[L, H]` tensor (what assistant-axis's loader also accepts) is refused as rows with a
    hint, and imports with --layer-index block as block k → row k + 1."""
    table = torch.randn(lm.num_layers, lm.hidden_size)
    path = tmp_path / "bare.pt"
    torch.save(table, path)
    expect_error(invoke("import", path, *common(lm, ws)), "--layer-index block")
    _, vector = import_json(lm, ws, path, "--layer-index", "block", "--name", "bare")
    assert vector.rows == [1, 2, 3] and torch.equal(vector.get()[1:], table)
