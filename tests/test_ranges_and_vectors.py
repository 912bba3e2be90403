from __future__ import annotations

import pytest
import torch

from personactl.core.directions import cosine, principal_direction, principal_direction_of_rows
from personactl.core.ranges import check_in_range, check_steering_layers, format_ranges, parse_ranges
from personactl.errors import InputError, VectorFileError
from personactl.store.vectors import PersonaVector, load_for_model, made_for_other_model
from personactl.store.workspace import Workspace


def test_parse_and_format_ranges():
    assert parse_ranges("10,12,14-16") == [10, 12, 14, 15, 16]
    assert parse_ranges(" 3 , 1,2 ") == [1, 2, 3]
    assert format_ranges([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    for bad in ("a", "3-1", "", "1-x"):
        with pytest.raises(InputError):
            parse_ranges(bad)
    with pytest.raises(InputError, match="out of range"):
        check_in_range([5, 31], 30)


@pytest.mark.parametrize("num_layers", [1, 30])
def test_steering_layers_are_blocks_1_to_L(num_layers):
    assert check_steering_layers(list(range(1, num_layers + 1)), num_layers) == list(range(1, num_layers + 1))
    with pytest.raises(InputError, match="layer 0 is the embeddings"):
        check_steering_layers([0], num_layers)
    with pytest.raises(InputError, match="layer 0 is the embeddings"):
        check_steering_layers([1, 0], num_layers)
    with pytest.raises(InputError, match=f"layer {num_layers + 1} out of range"):
        check_steering_layers([num_layers + 1], num_layers)
    with pytest.raises(InputError, match="layer -1 out of range"):
        check_steering_layers([-1], num_layers)


SPEC = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_made_for_other_model_compares_fingerprints_when_both_have_one():
    made = {"model": SPEC, "model_fingerprint": "hub:abc"}
    assert not made_for_other_model(made, {"model": SPEC, "model_fingerprint": "hub:abc"})
    # a new revision of the same hub id: same spec string, another fingerprint
    assert made_for_other_model(made, {"model": SPEC, "model_fingerprint": "hub:def"})
    # the same weights under another spelling (a local copy): one fingerprint, so the same model
    assert not made_for_other_model(made, {"model": "/models/smollm2", "model_fingerprint": "hub:abc"})


@pytest.mark.parametrize("fingerprints", [(None, "hub:abc"), ("hub:abc", None), (None, None), ("", "hub:abc")])
def test_made_for_other_model_compares_specs_without_two_fingerprints(fingerprints):
    mine, theirs = fingerprints
    made = {"model": SPEC} | ({"model_fingerprint": mine} if mine is not None else {})
    same = {"model": SPEC} | ({"model_fingerprint": theirs} if theirs is not None else {})
    other = {**same, "model": "Qwen/Qwen2.5-0.5B-Instruct"}
    assert not made_for_other_model(made, same)
    assert made_for_other_model(made, other)


class _Source:
    slug = "tiny"


class _Model:
    """What `load_for_model` needs of a loaded model: `describe()` and `source.slug`."""

    source = _Source()

    def __init__(self, **info):
        self.info = {"model": SPEC, "model_fingerprint": "hub:abc", "hidden_size": 8, "num_layers": 3, **info}

    def describe(self):
        return dict(self.info)


def test_load_for_model_warns_for_another_model_of_the_same_shape(tmp_path):
    ws = Workspace(tmp_path)
    meta = {"model": SPEC, "model_fingerprint": "hub:abc", "num_layers": 3, "hidden_size": 8, "rows": [1, 2]}
    meta |= {"positions": ["response_avg"], "aggregators": ["mean_diff"], "trait": "evil"}
    PersonaVector({"mean_diff.response_avg": torch.ones(4, 8)}, meta).save(ws.vectors_path("tiny", "evil", "model"))
    loaded = load_for_model(ws, "evil", _Model())
    assert (loaded.label, loaded.warning) == ("evil", None)
    assert loaded.path == ws.vectors_path("tiny", "evil", "model")
    newer = load_for_model(ws, "evil", _Model(model_fingerprint="hub:def"))
    assert newer.warning is not None and "same shape" in newer.warning
    with pytest.raises(VectorFileError, match="does not fit"):
        load_for_model(ws, "evil", _Model(hidden_size=16))


def test_vector_file_round_trip(tmp_path):
    tensors = {"mean_diff.response_avg": torch.randn(4, 8), "stream_norm": torch.rand(4)}
    meta = {
        "model": "m",
        "num_layers": 3,
        "hidden_size": 8,
        "rows": [0, 1, 2, 3],
        "positions": ["response_avg"],
        "aggregators": ["mean_diff"],
        "trait": "t",
        "nested": {"a": [1, 2]},
        "judge": None,
    }
    PersonaVector(tensors, meta).save(tmp_path / "v.safetensors")
    loaded = PersonaVector.load(tmp_path / "v.safetensors")
    assert loaded.metadata == meta
    torch.testing.assert_close(loaded.get("response_avg"), tensors["mean_diff.response_avg"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.at(2), tensors["mean_diff.response_avg"][2], rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == [tmp_path / "v.safetensors"]  # no temp files left behind
    with pytest.raises(VectorFileError, match="no pca.response_avg"):
        loaded.get("response_avg", "pca")


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(VectorFileError, match="not a readable safetensors"):
        PersonaVector.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(VectorFileError, match="not a personactl vector file"):
        PersonaVector.load(foreign)
    with pytest.raises(VectorFileError, match="not found"):
        PersonaVector.load(tmp_path / "missing.safetensors")


def test_pca_of_identical_pairs_has_no_direction():
    scatter = torch.zeros(2, 3, 3)
    scatter[1] = torch.eye(3)
    out = principal_direction(scatter, torch.ones(2, 3))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    diffs = torch.zeros(2, 2, 3)
    diffs[1, 0, 0] = 1.0
    out = principal_direction_of_rows(diffs, torch.ones(2, 3))  # 2 rows < 3 wide: Gram route
    assert torch.isnan(out[0]).all() and torch.equal(out[1], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("n", [5, 40])
def test_pca_from_rows_equals_pca_from_scatter(n):
    diffs = torch.randn(3, n, 16, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    diffs[:, :, 0] += 2.0  # a shared shift, as in pair differences
    reference = diffs.mean(1)
    expected = principal_direction(diffs.transpose(1, 2) @ diffs, reference)
    got = principal_direction_of_rows(diffs, reference)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert ((got.double() * reference).sum(-1) > 0).all()


def test_artifacts_get_normal_permissions(tmp_path):
    import os

    from personactl.store.workspace import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_workspace_names_readout_and_chat_paths(tmp_path):
    import os

    ws = Workspace(tmp_path / "ws")
    assert ws.readout_files() == []  # no workspace yet
    path = ws.readout_path("HuggingFaceTB--SmolLM2-135M", "moods")
    assert path == tmp_path / "ws" / "HuggingFaceTB--SmolLM2-135M" / "readouts" / "moods.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert ws.readout_files() == [path]
    chat = ws.chat_transcript_path("tiny", "evil")
    assert chat.parent == ws.trait_dir("tiny", "evil") and chat.name.endswith(f"-{os.getpid()}.json")
    assert chat.name.startswith("chat-")


def test_math_helpers():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([1.0, -1.0]))
    d = torch.tensor([[3.0, 0.1], [2.0, -0.1], [-0.5, 0.0]])  # differences, mostly along +x
    scatter = (d.T @ d)[None]
    direction = principal_direction(scatter, d.mean(0)[None])[0]
    assert direction[0] > 0.99
