"""A judge that runs a Hugging Face model in process, so the whole pipeline works offline.

Same scoring as the remote judge's digit mode (`judging.remote.digit_tree`), but exact: each step reads the
full next-token distribution, not the top 20. The judge prompt runs once; each likely digit
prefix then costs one or two tokens on top of its KV cache.

The judge's answer starts with a fixed stem ("Score: "): small models rarely open with a bare
number (SmolLM2-135M puts ~2% of its mass on digits without it, ~99% with it). Models this small
are weak judges all the same: the output says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from personactl.judging.remote import JudgeCache, Judgement, TopLogprobs, digit_tree, is_digits, split_cached

ANSWER_STEM = "Score: "
WEAK_JUDGE_PARAMETERS = 3e9  # below this, say that the scores are rough
OTHER_TOKENS = 5  # besides every digit token, the most likely others (to see a refusal)


class LocalJudge:
    """`judge(prompts)` like RemoteJudge; `requests_sent` counts judged prompts."""

    def __init__(self, loaded: Any, cache: JudgeCache | None = None):
        self.loaded = loaded
        self.cache = cache
        self.model = f"local:{loaded.source.spec}"
        self.identity = f"local|{loaded.source.spec}|{loaded.fingerprint}|digits|{ANSWER_STEM}"
        self.requests_sent = 0
        vocabulary = loaded.tokenizer.convert_ids_to_tokens(list(range(len(loaded.tokenizer))))
        texts = [loaded.tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocabulary]
        self.digit_ids = [i for i, text in enumerate(texts) if is_digits(text.strip())]
        self.texts = texts

    @property
    def is_weak(self) -> bool:
        return sum(p.numel() for p in self.loaded.model.parameters()) < WEAK_JUDGE_PARAMETERS

    def judge_one(self, prompt: str) -> Judgement:
        import torch

        from personactl.model.chat_format import chat_messages, encode_prompt, encode_text

        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        ids = encode_prompt(tokenizer, chat_messages(None, prompt)) + encode_text(
            tokenizer, ANSWER_STEM, add_prefix=False
        )
        device = self.loaded.device
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        cache, prompt_logits = out.past_key_values, out.logits[0, -1]

        def top(logits: Any) -> TopLogprobs:
            logp = torch.log_softmax(logits.float(), dim=-1)
            chosen = {*self.digit_ids, *logp.topk(OTHER_TOKENS).indices.tolist()}
            return [(self.texts[i], logp[i].item()) for i in chosen]

        async def ask(prefill: str) -> TopLogprobs:
            if not prefill:
                return top(prompt_logits)
            extra = encode_text(tokenizer, prefill, add_prefix=False)
            with torch.inference_mode():
                logits = model(
                    input_ids=torch.tensor([extra], device=device), past_key_values=cache, logits_to_keep=1
                ).logits[0, -1]
            cache.crop(-len(extra))  # back to the prompt for the next prefix (asks never interleave: no awaits)
            return top(logits)

        return asyncio.run(digit_tree(ask))

    def judge(self, prompts: Sequence[str], on_done: Callable[[Judgement], None] = lambda j: None) -> list[Judgement]:
        """Judge every prompt; results in input order. Cached prompts are not run again."""
        results, todo = split_cached(self.cache, self.identity, prompts, on_done)
        for i in todo:
            self.requests_sent += 1
            judgement = self.judge_one(prompts[i])
            if self.cache:
                self.cache.put(JudgeCache.key(self.identity, prompts[i]), judgement)
            results[i] = judgement
            on_done(judgement)
        return results  # type: ignore[return-value]
