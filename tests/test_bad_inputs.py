"""Malformed and nonsensical inputs are one-line project errors (exit 2) naming the file or setting,
never an internal error: one case per defect the red-team pass found."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from judge_server import JudgeServer
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.errors import TraitError, VectorFileError

SHIPPED = Path(__file__).resolve().parents[1] / "traits" / "optimistic.yaml"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_clean_exit_2(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_latin1_trait_and_pairs_files_name_the_file(isolated_env, tmp_path, tiny_llama):
    trait = tmp_path / "café.yaml"
    trait.write_bytes(
        SHIPPED.read_text(encoding="utf-8").replace("name: optimistic", "name: cafe").encode() + b"# caf\xe9\n"
    )
    assert_clean_exit_2(invoke("traits", "validate", trait), f"trait file {trait} is not UTF-8 text")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"positive": "caf\xe9 good", "negative": "bad day"}\n')
    extract = ["extract", "--pairs", pairs, "--model", tiny_llama, "-w", tmp_path / "ws", "--dtype", "float32"]
    assert_clean_exit_2(invoke(*extract), f"pairs file {pairs} is not UTF-8 text")
    pairs.write_text('{"positive": "a good day", "negative": "a bad day", "prompt": "hi", "system": ["x"]}\n')
    assert_clean_exit_2(invoke(*extract), "prompt and system must be strings")


def load_edited_trait(tmp_path, edit):
    import yaml

    from personactl.store.traits import load_trait

    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_trait(path)


def test_a_blank_instruction_is_refused(tmp_path):
    with pytest.raises(TraitError, match="is only whitespace"):
        load_edited_trait(tmp_path, lambda d: d["instructions"][0].update(pos="   \n "))


def test_held_out_questions_equal_to_extraction_ones_up_to_case_and_spacing_are_refused(tmp_path):
    def leak(data):
        data["questions"]["evaluation"].append(data["questions"]["extraction"][0].upper() + "  ")

    with pytest.raises(TraitError, match=re.escape("extraction and evaluation share 1 question(s)")):
        load_edited_trait(tmp_path, leak)


def vector_file(tmp_path, tiny_llama):
    ws = tmp_path / "ws"
    args = ["generate", "--trait", "optimistic", "--model", tiny_llama, "-w", ws, "--questions", "1"]
    assert invoke(*args, "--max-new-tokens", "3", "--dtype", "float32").exit_code == 0
    extract = ["extract", "--trait", "optimistic", "--model", tiny_llama, "-w", ws, "--dtype", "float32"]
    assert invoke(*extract, "--aggregators", "mean_diff").exit_code == 0
    return next(ws.rglob("vectors-model.safetensors"))


def rewrite(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_vector_files_that_disagree_with_their_metadata_or_overflow_are_refused(isolated_env, tmp_path, tiny_llama):
    from personactl.store.vectors import PersonaVector

    original = vector_file(tmp_path, tiny_llama)
    cases = {
        "wider": (lambda t: t.update({"mean_diff.response_avg": torch.zeros(4, 64)}), "has shape [4, 64]"),
        "fewer rows": (lambda t: t.update({"mean_diff.response_avg": torch.zeros(2, 32)}), "has shape [2, 32]"),
        "x1e30": (lambda t: t["mean_diff.response_avg"].mul_(1e30).add_(1e30), "infinite norm at rows"),
    }
    for name, (change, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        shutil.copy(original, path)
        rewrite(path, change)
        with pytest.raises(VectorFileError, match=re.escape(message)):
            PersonaVector.load(path)
        steer = ["steer", "--vector", path, "--model", tiny_llama, "--prompt", "hi", "--layers", "2"]
        assert_clean_exit_2(invoke(*steer, "--coefficients", "1", "--dtype", "float32"), str(path))


def test_truncated_responses_table_and_judge_probe_nonsense(isolated_env, tmp_path, tiny_llama):
    ws = tmp_path / "ws"
    args = ["generate", "--trait", "optimistic", "--model", tiny_llama, "-w", ws, "--questions", "1"]
    assert invoke(*args, "--max-new-tokens", "3", "--dtype", "float32").exit_code == 0
    with JudgeServer(scorer=lambda p: [("50", 0.0)]) as server:
        server.completion = lambda prompt, body: {"choices": "not a list of choices"}  # valid JSON, no completion
        score = ["score", "--trait", "optimistic", "--model", tiny_llama, "-w", ws, "--judge-base-url", server.base_url]
        assert_clean_exit_2(invoke(*score), "cannot use the judge")
        responses = next(ws.rglob("responses-model.parquet"))
        responses.write_bytes(responses.read_bytes()[:200])
        assert_clean_exit_2(invoke(*score), f"cannot read {responses}")


def test_serve_refuses_a_seed_torch_cannot_take():
    from personactl.chat.server import APIError, _seed

    with pytest.raises(APIError, match="seed must be between"):
        _seed({"seed": 10**23}, 0)
    assert _seed({"seed": 7}, 0) == 7


def test_a_prompt_longer_than_the_context_is_refused_before_generating():
    from personactl.errors import InputError
    from personactl.steps.generate import check_context
    from personactl.store.responses import PlannedRow

    rows = [PlannedRow("i0-q0-s0", "pos", 0, 0, 0, "q", "s", tuple(range(12_031)))]
    with pytest.raises(InputError, match="12031 tokens.*context of 8192 tokens"):
        check_context(rows, 64, 8192)
    check_context(rows, 64, 16_384)  # fits: no error


def test_a_truncated_model_file_is_a_model_error(tmp_path, tiny_llama):
    from personactl.errors import ModelError
    from personactl.model.loading import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match=f"cannot load {re.escape(repr(str(broken)))}") as refused:
        load_model(str(broken), dtype="float32", device="cpu")
    assert "truncated" in refused.value.hint
