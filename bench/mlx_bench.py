"""P13–P14: the MLX engine (`--backend mlx`, MLX's CPU build on Linux) next to the Hugging Face
engine on the same machine: batched greedy generation, 8 prompts × 16 tokens of SmolLM2-135M in
bf16, every row doing identical work (no end of turn), and MLX's steered sweep (α·v at one layer,
per-row coefficients) against its unsteered generation. Small, because MLX's Linux CPU build
multiplies matrices at a few GFLOP/s (torch: ~100 here), so larger runs take minutes. Run alone:
`python bench/mlx_bench.py`, or in `make bench` (skipped where MLX is not installed)."""

from __future__ import annotations

import importlib.util

import torch
from timing import interleaved_median_seconds

from personactl.backends import Sampling, engine_for, open_model
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.steering import GridRow
from personactl.settings import Settings
from personactl.store.traits import load_trait

PROMPTS, NEW_TOKENS = 8, 16
REPEATS = 2


def has_mlx() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def bench_mlx(results: dict) -> list[tuple]:
    if not has_mlx():
        print("(MLX rows skipped: MLX is not installed)")
        return []
    hf = open_model(Settings(backend="hf", dtype="bfloat16", device="cpu"))
    mlx = open_model(Settings(backend="mlx", dtype="bfloat16", device="cpu"))
    questions = load_trait("optimistic").questions.extraction
    prompts = [encode_prompt(hf.tokenizer, chat_messages(None, q)) for q in questions[:PROMPTS]]
    sampling = Sampling(NEW_TOKENS, 0.0)
    hf_engine, stops = engine_for(hf), mlx.stop_ids
    hf_engine.stop_ids, mlx.stop_ids = [], []  # every row runs its whole budget: identical work
    direction = {15: torch.randn(mlx.hidden_size, generator=torch.Generator().manual_seed(0))}
    rows = [GridRow(p, 15, 2.0) for p in range(PROMPTS)]
    try:
        hf_s, mlx_s, steered_s = interleaved_median_seconds(
            lambda: hf_engine.generate(prompts, sampling, 0),
            lambda: mlx.generate(prompts, sampling, 0),
            lambda: list(mlx.run_grid(prompts, rows, direction, sampling=sampling, seed=0, batch_size=PROMPTS)),
            repeats=REPEATS,
        )
    finally:
        mlx.stop_ids = stops
    tokens = PROMPTS * NEW_TOKENS
    results["mlx"] = {
        "hf_tok_s": tokens / hf_s,
        "mlx_tok_s": tokens / mlx_s,
        "mlx_steered_tok_s": tokens / steered_s,
        "prompts": PROMPTS,
        "new_tokens": NEW_TOKENS,
    }
    return [
        ("P13 MLX greedy generation vs HF, bf16 8×16 (ratio; informational)", 0.0, hf_s / mlx_s),
        ("P14 MLX steered sweep vs MLX unsteered, 8×16 (ratio)", 0.9, mlx_s / steered_s),
    ]


if __name__ == "__main__":
    from run import format_row

    for name, goal, value in bench_mlx({}):
        print(format_row(name, goal, value)[0])
