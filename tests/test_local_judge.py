"""The local judge's forwards (a shared prompt prefix, right-padded batches, every asked digit prefix
in one forward) against the plain way, one prompt at a time, in float32 where only rounding differs."""

from __future__ import annotations

import pytest
import torch

from personactl.judging.local import ASKED_PREFIXES, LocalJudge, prefix_groups
from personactl.model.chat_format import encode_text
from personactl.model.loading import load_model

# two pairs that share a prefix beyond the chat header, of different lengths (so batches pad)
TINY_PROMPTS = [
    "What do you think about the weather today?",
    "What do you think about the weather today? It might rain tomorrow, and the fox is quick.",
    "Tell me about your plans.",
    "Tell me about your plans for the weekend, and why they matter.",
]


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def full_forwards(lm, judge: LocalJudge, prompt: str) -> torch.Tensor:
    """Next-token logits after the judge's input and after it plus each asked prefix: one forward of
    the whole sequence each, no cache, no padding."""
    ids = judge.encode(prompt)
    rows = []
    with torch.inference_mode():
        for prefix in ("", *ASKED_PREFIXES):
            extra = encode_text(lm.tokenizer, prefix, add_prefix=False) if prefix else []
            rows.append(lm.model(input_ids=torch.tensor([ids + extra])).logits[0, -1])
    return torch.stack(rows)


def test_prefix_groups_share_a_prefix_only_where_it_saves_tokens():
    a, b, c = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7], [1, 9, 9]
    assert prefix_groups([c, a, b]) == [([1, 2], 4), ([0], 0)]  # [1] alone would cost more than it saves
    assert prefix_groups([a, a]) == [([0, 1], 5)]  # at least one token of each is run (its logits are read)
    assert prefix_groups([[5], [6]]) == [([0], 0), ([1], 0)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_batched_judge_forwards_equal_full_forwards(tiny_factory, arch):
    """llama: rotary positions; gpt2: learned absolute positions (a wrong offset shows at once);
    gemma2: a sliding-window cache, which is not cut into rows: one prompt at a time, no shared prefix."""
    lm = load_model(str(tiny_factory(arch)), dtype="float32", device="cpu", log=lambda m: None)
    judge = LocalJudge(lm, batch_size=2)
    assert judge.plain_cache == (arch != "gemma2")
    encoded = [judge.encode(p) for p in TINY_PROMPTS]
    groups = prefix_groups(encoded)
    assert [sorted(m) for m, _ in groups] == [[2, 3], [0, 1]] and all(shared >= 10 for _, shared in groups)
    expected = [logprobs(full_forwards(lm, judge, p)) for p in TINY_PROMPTS]
    for size in (1, 2):
        judge.batch_size = size
        for got, want in zip(judge.logits(TINY_PROMPTS), expected, strict=True):
            torch.testing.assert_close(logprobs(got), want, rtol=0, atol=1e-5)  # measured ≤ 1e-6


def one_at_a_time(lm, judge: LocalJudge, prompt: str) -> torch.Tensor:
    """The judge's forwards before batching: the judge's input alone, then each asked prefix on its
    KV cache, cropped back after each."""
    ids = judge.encode(prompt)
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
        rows, cache = [out.logits[0, -1]], out.past_key_values
        for prefix in ASKED_PREFIXES:
            extra = encode_text(lm.tokenizer, prefix, add_prefix=False)
            rows.append(lm.model(input_ids=torch.tensor([extra]), past_key_values=cache).logits[0, -1])
            cache.crop(-len(extra))
    return torch.stack(rows)


@pytest.mark.slow
def test_embedded_judge_batched_equals_one_prompt_at_a_time():
    """SmolLM2 in float32, both rubrics, answers of different lengths: the batched judge's
    distributions (after the prompt and after every digit prefix) equal the one-prompt-at-a-time
    forwards to float32 rounding (measured ≤ 5e-5 in log-probability), and so do its scores."""
    from personactl.steps.score import coherence_prompt
    from personactl.store.traits import load_trait

    lm = load_model("smollm2-135m", dtype="float32", device="cpu", log=lambda m: None)
    trait = load_trait("optimistic")
    answers = ["Bright! So much to look forward to.", "It will rain, the bus will be late and nothing will work out."]
    prompts = [rubric("How is the future?", a) for rubric in (trait.judge_prompt, coherence_prompt) for a in answers]
    judge = LocalJudge(lm, batch_size=2)
    encoded = [judge.encode(p) for p in prompts]
    assert sorted(sorted(m) for m, _ in prefix_groups(encoded)) == [[0, 1], [2, 3]]
    assert len({len(e) for e in encoded}) == 4  # every batch of two pads one row

    expected = [one_at_a_time(lm, judge, p) for p in prompts]
    got = judge.logits(prompts)
    for batched, alone in zip(got, expected, strict=True):
        torch.testing.assert_close(logprobs(batched), logprobs(alone), rtol=0, atol=2e-4)
    scores = [judge.judge_tops(judge._top(g)).score for g in got]
    assert None not in scores  # the stem makes even this judge answer with a number
    assert scores == pytest.approx([judge.judge_tops(judge._top(e)).score for e in expected], abs=1e-3)
