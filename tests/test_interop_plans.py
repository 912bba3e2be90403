"""`export --steer`: steering plans as plan files, add-only plans summed into other formats, refusals
of plans a format cannot express; and exports that say where and how their vectors act."""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.store.vectors import LAYER_CONVENTION, PersonaVector

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


def vector_file(lm, trait: str, seed: int) -> PersonaVector:
    """Random directions with the tensors and metadata an extracted file has (means, stream norms)."""
    g = torch.Generator().manual_seed(seed)
    rows, hidden = lm.num_layers + 1, lm.hidden_size
    tensors = {"stream_norm": torch.rand(rows, generator=g) * 3 + 1.0}
    for position in ("prompt_end", "response_avg"):
        pos, neg = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
        tensors[f"pos_mean.{position}"], tensors[f"neg_mean.{position}"] = pos, neg
        tensors[f"mean_diff.{position}"] = pos - neg
    metadata = {
        **lm.describe(),
        "layer_convention": LAYER_CONVENTION,
        "rows": list(range(rows)),
        "positions": ["prompt_end", "response_avg"],
        "aggregators": ["mean_diff"],
        "n_pairs": 4,
        "trait": trait,
        "persona": "model",
        "source": "responses",
        "personactl_version": "test",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return PersonaVector(tensors, metadata)


@pytest.fixture
def ws(lm, tmp_path, isolated_env):
    from personactl.store.workspace import Workspace

    root = tmp_path / "ws"
    vectors = {name: vector_file(lm, name, seed) for seed, name in enumerate(("happy", "calm"))}
    for name, vector in vectors.items():
        vector.save(Workspace(root).vectors_path(lm.source.slug, name, "model"))
    return root, vectors


def common(lm, root):
    return ["--model", lm.source.spec, "-w", root]


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("personactl.metadata")
    provenance = json.loads(bytes(field.parts[field.data[0]]).decode())
    return provenance, {t.name: torch.tensor(t.data.copy()) for t in reader.tensors}


def test_exports_record_hook_site_and_operation(lm, ws, tmp_path):
    root, _ = ws
    out = tmp_path / "happy.gguf"
    result = invoke("export", "happy", *common(lm, root), "--layers", "2-3", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["operation"] == "add" and "output of decoder block l" in summary["hook_site"]
    provenance, _ = read_gguf(out)
    assert provenance["operation"] == "add" and provenance["hook_site"] == summary["hook_site"]
    record_path = tmp_path / "happy.json"
    assert invoke("export", "happy", *common(lm, root), "--layers", "2", "-o", record_path).exit_code == 0
    record = json.loads(record_path.read_text())
    assert record["operation"] == "add" and record["hook_site"] == summary["hook_site"]


def test_plan_file_keeps_every_term_with_its_units(lm, ws, tmp_path):
    from personactl.store.interop.plan_file import read_plan

    root, vectors = ws
    happy, calm = vectors["happy"], vectors["calm"]
    out = tmp_path / "plan.safetensors"
    specs = ["happy:2-3:1.5", "calm:3:0.25:ablate", "happy:2:-0.5:cap", "calm@prompt_end:1:1:mean-ablate"]
    steer = [arg for spec in specs for arg in ("--steer", spec)]
    result = invoke("export", *steer, *common(lm, root), "--norm", "stream", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    tensors, meta = read_plan(out)
    assert meta["norm"] == "stream" and meta["num_layers"] == lm.num_layers
    assert "order" in meta and "output of decoder block l" in meta["hook_site"]
    terms = meta["terms"]
    assert [t["op"] for t in terms] == ["add", "ablate", "cap", "mean-ablate"]
    assert [t["layers"] for t in terms] == [[2, 3], [3], [2], [1]]
    assert [t["value"] for t in terms] == [1.5, 0.25, -0.5, 1.0]
    assert terms[3]["position"] == "prompt_end" and terms[0]["position"] == "response_avg"
    assert json.loads(result.stdout)["terms"] == terms
    expected = [(happy, "response_avg", [2, 3]), (calm, "response_avg", [3]), (happy, "response_avg", [2])]
    expected.append((calm, "prompt_end", [1]))
    for index, (vector, position, rows) in enumerate(expected):
        table = tensors[f"term{index}.direction"]
        assert table.shape == (lm.num_layers + 1, lm.hidden_size)
        for row in range(lm.num_layers + 1):
            if row in rows:  # t: the direction scaled by --norm, exactly as steer scales it
                assert torch.equal(table[row], vector.direction(row, position, "mean_diff", "stream"))
            else:
                assert torch.isnan(table[row]).all()
    stream = {name: v.tensors["stream_norm"] for name, v in vectors.items()}
    # ablate and cap: projections on the unit direction, in units of the stream norm under --norm stream
    assert terms[1]["bound"]["3"] == pytest.approx(0.25 * float(stream["calm"][3]), rel=1e-6)
    assert terms[2]["bound"]["2"] == pytest.approx(-0.5 * float(stream["happy"][2]), rel=1e-6)
    # mean-ablate: VALUE × the trait-free mean's projection on the unit direction
    direction = calm.get("prompt_end")[1]
    mean_projection = float(calm.tensors["neg_mean.prompt_end"][1] @ (direction / direction.norm()))
    assert terms[3]["bound"]["1"] == pytest.approx(mean_projection, rel=1e-5)
    assert "bound" not in terms[0]


def test_add_only_plan_is_summed_into_a_control_vector(lm, ws, tmp_path):
    root, vectors = ws
    happy, calm = vectors["happy"].get(), vectors["calm"].get()
    out = tmp_path / "plan.gguf"
    steer = ["--steer", "happy:2-3:1.5", "--steer", "calm:3:-0.5"]
    result = invoke("export", *steer, *common(lm, root), "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["file_index"] == {"2": "direction.1", "3": "direction.2"}
    provenance, tensors = read_gguf(out)
    assert sorted(tensors) == ["direction.1", "direction.2"]
    assert torch.equal(tensors["direction.1"], 1.5 * happy[2])  # row l is direction.{l-1}
    assert torch.equal(tensors["direction.2"], 1.5 * happy[3] + -0.5 * calm[3])  # terms summed per layer
    assert [t["spec"] for t in provenance["plan"]] == ["happy:2-3:1.5:add", "calm:3:-0.5:add"]
    assert provenance["operation"] == "add"
    imported = invoke("import", out, *common(lm, root), "--name", "plan-back", "--json")
    assert imported.exit_code == 0, imported.output
    back = PersonaVector.load(json.loads(imported.stdout)["artifact"])
    assert torch.equal(back.get()[3], tensors["direction.2"])
    # the same add-only plan as steering-vectors: block k = row k + 1
    sv = tmp_path / "plan-sv.pt"
    assert invoke("export", *steer, *common(lm, root), "-f", "steering-vectors", "-o", sv).exit_code == 0
    payload = torch.load(sv, weights_only=True)
    assert torch.equal(payload["layer_activations"][2], tensors["direction.2"])


def test_plans_a_format_cannot_express_are_refused(lm, ws, tmp_path):
    from personactl.store.interop.plan_file import PLAN_FORMAT

    root, _ = ws
    out = tmp_path / "plan.gguf"
    args = common(lm, root)
    refused = invoke("export", "--steer", "happy:2:1", "--steer", "calm:3:0:ablate", *args, "-o", out)
    expect_error(refused, "llama.cpp control vectors only add")
    assert not out.exists()
    expect_error(invoke("export", "--steer", "happy:2:1:cap", *args, "-f", "pt", "-o", tmp_path / "p.pt"), "only adds")
    expect_error(invoke("export", "--steer", "happy:1-2:1", *args, "-o", out), "rejects direction.0")
    expect_error(invoke("export", "happy", "--steer", "happy:2:1", *args, "-o", out), "not both")
    expect_error(invoke("export", *args, "-o", out), "nothing to export")
    expect_error(invoke("export", "--steer", "happy:2:1", "--layers", "2", *args, "-o", out), "do not apply to --steer")
    expect_error(invoke("export", "happy", *args, "-o", tmp_path / "x.safetensors"), "plan format writes --steer")
    expect_error(invoke("export", "--steer", "happy:2:1", *args, "-f", "plan", "-o", out), "pass -o NAME.safetensors")
    plan = tmp_path / "p.safetensors"
    expect_error(invoke("export", "--steer", "happy:2:p25:cap", *args, "-o", plan), "percentile")
    expect_error(invoke("export", "--steer", "happy:2:x", *args, "-o", plan), "bad value")
    expect_error(invoke("export", "--steer", "happy:2:1:squash", *args, "-o", plan), "unknown steering operation")
    expect_error(invoke("export", "--steer", "happy:0:1", *args, "-o", plan), "layer 0 is the embeddings")
    expect_error(invoke("export", "--steer", "sad:2:1", *args, "-o", plan), "no vectors for 'sad'")
    assert not plan.exists()
    # a plan file is not a vector to import
    assert invoke("export", "--steer", "happy:2:1", *args, "-o", plan).exit_code == 0
    from safetensors import safe_open

    with safe_open(str(plan), framework="pt") as f:
        assert json.loads(f.metadata()["format"]) == PLAN_FORMAT
    expect_error(invoke("import", plan, *args), "is a personactl steering plan")


def test_plan_terms_must_fit_one_model_and_have_their_data(lm, ws, tmp_path):
    root, vectors = ws
    other = PersonaVector(dict(vectors["calm"].tensors), {**vectors["calm"].metadata, "model_fingerprint": "else"})
    other_path = tmp_path / "other.safetensors"
    other.save(other_path)
    args = common(lm, root)
    plan = tmp_path / "p.safetensors"
    expect_error(
        invoke("export", "--steer", "happy:2:1", "--steer", f"{other_path}:2:1", *args, "-o", plan), "one model"
    )
    bare = PersonaVector(
        {"mean_diff.response_avg": vectors["calm"].get()}, {**vectors["calm"].metadata, "positions": ["response_avg"]}
    )
    bare_path = tmp_path / "bare.safetensors"
    bare.save(bare_path)
    expect_error(invoke("export", "--steer", f"{bare_path}:2:1:mean-ablate", *args, "-o", plan), "neg_mean")
    expect_error(invoke("export", "--steer", f"{bare_path}:2:1", *args, "--norm", "stream", "-o", plan), "stream")
    assert not plan.exists()
