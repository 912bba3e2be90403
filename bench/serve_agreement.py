"""How often a reply inside a mixed batch equals the same request alone, in the model's default
dtype (bf16 on CPU), where batch shape changes kernels and so the last bits (float32: always equal,
see tests/test_mixed_batches.py). Run: `.venv/bin/python bench/serve_agreement.py`."""

from __future__ import annotations

import json
import sys

import torch

from personactl.backends import Sampling, Steering
from personactl.backends.hf import HFBackend
from personactl.backends.hf_rows import RowRequest
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.loading import load_model
from personactl.store.traits import load_trait

ALPHAS = [-6.0, -3.0, 0.0, 3.0, 6.0, 0.0, 4.0, -4.0]
TOKENS = 48


def first_difference(a: list[int], b: list[int]) -> int:
    """How many tokens the two replies share from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(dtype: str = "auto") -> None:
    lm = load_model("smollm2-135m", dtype=dtype, log=lambda m: None)
    engine = HFBackend(lm.model, lm.tokenizer)
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm()
    questions = load_trait("optimistic").questions.evaluation[:8]
    rows = [
        RowRequest(
            encode_prompt(lm.tokenizer, chat_messages(None, q)),
            Sampling(TOKENS, 0.0),
            0,
            lambda t: None,
            steering=Steering({15: vector}, alpha, "all"),
        )
        for q, alpha in zip(questions, ALPHAS, strict=True)
    ]
    batched = engine.stream_batch(rows)
    alone = [engine.stream_batch([row])[0] for row in rows]
    same = [b == a for b, a in zip(batched, alone, strict=True)]
    prefix = [first_difference(b, a) for b, a in zip(batched, alone, strict=True)]
    print(
        json.dumps(
            {
                "dtype": str(lm.dtype),
                "rows": len(rows),
                "identical_replies": sum(same),
                "tokens_before_first_difference": prefix,
                "max_new_tokens": TOKENS,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
