"""P11: batched HF generation under a steering plan of three terms (add at a layer group, ablate,
cap) against unsteered generation: 32 prompts × 32 tokens on SmolLM2-135M (bf16 on this CPU), every
row doing identical work (min = max new tokens). Run alone: `python bench/plan_bench.py`, or in
`make bench`."""

from __future__ import annotations

import torch
from timing import REPEATS, paired_median_seconds

from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.loading import load_model
from personactl.model.steering import Steerer
from personactl.model.steering_ops import AddTerm, ablate_term, cap_term
from personactl.store.traits import load_trait

NEW_TOKENS = 32


def three_term_plan(lm) -> dict[int, list]:
    """add at 10-14, ablate at 15, cap at 16 (τ = 0: binds on about half the positions)."""
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, lm.hidden_size, generator=gen)
    add = 4.0 * vectors[0] / vectors[0].norm()
    plan: dict[int, list] = {layer: [AddTerm(add.to(lm.dtype))] for layer in range(10, 15)}
    plan[15] = [ablate_term(vectors[1], 0.0)]
    plan[16] = [cap_term(vectors[2], 0.0)]
    return plan


def bench_plan(results: dict) -> list[tuple]:
    from personactl.backends.hf import contiguous_lm_head_input

    lm = load_model("smollm2-135m", log=lambda m: None)
    trait = load_trait("optimistic")
    questions = trait.questions.extraction + trait.questions.evaluation
    prompts = [encode_prompt(lm.tokenizer, chat_messages(None, q)) for q in questions[:32]]
    pad = lm.tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    plan = three_term_plan(lm)

    def plain():
        with torch.inference_mode(), contiguous_lm_head_input(lm.model):
            lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=pad,
            )

    def planned():
        with Steerer(lm.model, {}, plan=plan):
            plain()

    t_plain, t_plan = paired_median_seconds(plain, planned, repeats=max(REPEATS, 5))
    results["plan"] = {"plain_seconds": t_plain, "plan_seconds": t_plan, "prompts": len(prompts), "tokens": NEW_TOKENS}
    return [
        ("P11 HF generate under a 3-term plan (add 10-14, ablate, cap) vs unsteered (speed)", 0.9, t_plain / t_plan)
    ]


if __name__ == "__main__":
    for name, goal, value in bench_plan({}):
        print(f"{name}: goal ≥ {goal}, measured {value:.3f}")
