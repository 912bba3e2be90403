from __future__ import annotations

import pytest
import torch

from personactl.core.directions import cosine, principal_direction, principal_direction_of_rows
from personactl.core.ranges import check_in_range, format_ranges, parse_ranges
from personactl.errors import InputError, VectorFileError
from personactl.store.vectors import PersonaVector


def test_parse_and_format_ranges():
    assert parse_ranges("10,12,14-16") == [10, 12, 14, 15, 16]
    assert parse_ranges(" 3 , 1,2 ") == [1, 2, 3]
    assert format_ranges([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    for bad in ("a", "3-1", "", "1-x"):
        with pytest.raises(InputError):
            parse_ranges(bad)
    with pytest.raises(InputError, match="out of range"):
        check_in_range([5, 31], 30)


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


def test_math_helpers():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([1.0, -1.0]))
    d = torch.tensor([[3.0, 0.1], [2.0, -0.1], [-0.5, 0.0]])  # differences, mostly along +x
    scatter = (d.T @ d)[None]
    direction = principal_direction(scatter, d.mean(0)[None])[0]
    assert direction[0] > 0.99
