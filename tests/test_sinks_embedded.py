"""On the embedded SmolLM2 (no BOS, a massive sink on token 0): plain-text vectors and stream norms
no longer measure the sink (issue 17's done-when numbers, with wide margins for bf16 kernels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personactl.model.activations import extract_vectors
from personactl.model.loading import load_model
from personactl.steps.extract import pairs_from_jsonl

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"


def test_plain_and_chat_paths_agree_and_plain_vectors_are_not_one_dimension(tmp_path):
    lm = load_model("smollm2-135m", log=lambda m: None)  # the CPU default, bf16
    chat_file = DATA / "mood_pairs.jsonl"
    plain_file = tmp_path / "mood_plain.jsonl"  # the same replies without their prompts
    lines = [json.loads(line) for line in chat_file.read_text().splitlines()]
    plain_file.write_text("".join(json.dumps({k: x[k] for k in ("positive", "negative")}) + "\n" for x in lines))
    results = {}
    for name, path in (("chat", chat_file), ("plain", plain_file), ("happy_sad", DATA / "happy_sad_plain.jsonl")):
        pairs, _ = pairs_from_jsonl(path, lm.tokenizer)
        results[name] = extract_vectors(
            lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, positions=["response_avg"], pca=False
        )
    ratio = results["plain"].stream_norm / results["chat"].stream_norm  # the sink made it up to 16x
    print(f"SPREAD stream norm plain/chat: {float(ratio.min()):.3f}..{float(ratio.max()):.3f}")
    assert float(ratio.max()) < 1.5 and float(ratio.min()) > 1 / 1.5, ratio.tolist()
    for name in ("plain", "happy_sad"):
        norms = results[name].mean_diff["response_avg"].norm(dim=-1)
        assert float(norms[15] / norms[10]) < 3, (name, norms.tolist())  # the sink made row 15 one dimension
        share = results[name].diagnostics["positions"]["response_avg"]["top_dim_share"]
        print(f"SPREAD {name}: row15/row10 {float(norms[15] / norms[10]):.2f}, top share 12-28 {max(share[12:29]):.2f}")
        assert max(share[12:29]) < 0.5, share  # no dimension dominates where the sink lives
