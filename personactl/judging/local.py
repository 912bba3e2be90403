"""A judge that runs a Hugging Face model in process, so the whole pipeline works offline.

Same scoring as the remote judge's digit mode (`judging.remote.digit_tree`), but exact: each step reads the
full next-token distribution, not the top 20.

The judge's answer starts with a fixed stem ("Score: "): small models rarely open with a bare
number (SmolLM2-135M puts ~2% of its mass on digits without it, ~99% with it). Models this small
are weak judges all the same: the output says so.

How the forwards are laid out (each one reads next-token logits at a prompt's last real token):
- Prompts that share a token prefix (every prompt of one rubric does, up to the question) reuse one
  forward of that prefix: its KV cache is the start of each of their caches.
- The rest of each prompt runs in batches of `batch_size` rows, right-padded: a real token never
  attends to a later pad, positions run on from the prefix, and each row's logits are read at its
  own last real token, so padding changes nothing. (On a CPU a forward of a few hundred tokens is
  compute-bound and one row at a time is as fast; on a GPU rows in a batch cost little more than one.)
- The digit tree can only ask after the prefixes "1".."9" and "10" (two-digit numbers other than 10
  end there): all of them run in one forward on top of the prompt's cache (a row each), in place of
  one forward per asked prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from personactl.judging.remote import (
    JudgeCache,
    Judgement,
    TopLogprobs,
    _can_continue,
    _valid_number,
    digit_tree,
    is_digits,
    split_cached,
)

ANSWER_STEM = "Score: "
WEAK_JUDGE_PARAMETERS = 3e9  # below this, say that the scores are rough
OTHER_TOKENS = 5  # besides every digit token, the most likely others (to see a refusal)
# every prefix the digit tree may prefill: a number that another digit can extend ("1".."9", "10")
ASKED_PREFIXES = tuple(str(n) for n in range(101) if _valid_number(str(n)) and _can_continue(str(n)))
CPU_BATCH = 1  # prompts per forward on a CPU (measured: batching does not speed a compute-bound CPU)
DEVICE_BATCH = 16  # elsewhere


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(sequences: Sequence[Sequence[int]]) -> list[tuple[list[int], int]]:
    """(indices, shared prefix length) groups: one forward of the prefix serves the whole group.

    Sequences are taken in sorted order; the next one joins the group while that lowers the total
    tokens run (a group of n sharing L tokens runs Σlen − (n−1)·L). The prefix always leaves each
    member at least one token of its own (its logits are read there)."""
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups:
            members, shared = groups[-1]
            with_i = min(shared, common_prefix(sequences[members[0]], sequences[i]), len(sequences[i]) - 1)
            if len(members) * with_i > (len(members) - 1) * shared:
                groups[-1] = (members + [i], with_i)
                continue
        groups.append(([i], len(sequences[i]) - 1))
    return [(members, shared if len(members) > 1 else 0) for members, shared in groups]


class LocalJudge:
    """`judge(prompts)` like RemoteJudge; `requests_sent` counts judged prompts."""

    def __init__(self, loaded: Any, cache: JudgeCache | None = None, batch_size: int | None = None):
        self.loaded = loaded
        self.cache = cache
        self.model = f"local:{loaded.source.spec}"
        self.identity = f"local|{loaded.source.spec}|{loaded.fingerprint}|digits|{ANSWER_STEM}"
        self.requests_sent = 0
        tokenizer = loaded.tokenizer
        vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        texts = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocabulary]
        self.digit_ids = [i for i, text in enumerate(texts) if is_digits(text.strip())]
        self.texts = texts
        if batch_size is None:
            batch_size = CPU_BATCH if loaded.device.type == "cpu" else DEVICE_BATCH
        self.batch_size = max(1, batch_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.plain_cache = _plain_cache(loaded.model)

    @property
    def is_weak(self) -> bool:
        return sum(p.numel() for p in self.loaded.model.parameters()) < WEAK_JUDGE_PARAMETERS

    def encode(self, prompt: str) -> list[int]:
        """The judge's input: the prompt as a user turn, then the assistant's answer stem."""
        from personactl.model.chat_format import chat_messages, encode_prompt, encode_text

        tokenizer = self.loaded.tokenizer
        return encode_prompt(tokenizer, chat_messages(None, prompt)) + encode_text(
            tokenizer, ANSWER_STEM, add_prefix=False
        )

    def tops(self, prompts: Sequence[str]) -> list[dict[str, TopLogprobs]]:
        """For each prompt, what `digit_tree`'s `ask(prefix)` returns for "" and every prefix in
        ASKED_PREFIXES: the digit tokens' and the OTHER_TOKENS likeliest tokens' log-probabilities."""
        return [self._top(logits) for logits in self.logits(prompts)]

    def logits(self, prompts: Sequence[str]) -> list[Any]:
        """For each prompt, next-token logits [1 + len(ASKED_PREFIXES), vocab]: after the judge's
        input (`encode`), then after it and each prefix in ASKED_PREFIXES."""
        import torch

        encoded = [self.encode(p) for p in prompts]
        out: list[Any] = [None] * len(prompts)
        groups = prefix_groups(encoded) if self.plain_cache else [([i], 0) for i in range(len(encoded))]
        with torch.inference_mode():
            for members, shared in groups:
                prefix = self._forward([encoded[members[0]][:shared]]).past_key_values if shared else None
                members = sorted(members, key=lambda i: len(encoded[i]))  # like lengths batch together
                size = self.batch_size if self.plain_cache else 1
                for start in range(0, len(members), size):
                    chunk = members[start : start + size]
                    found = self._chunk_logits([encoded[i] for i in chunk], shared, prefix)
                    for i, logits in zip(chunk, found, strict=True):
                        out[i] = logits
        return out

    def _forward(self, rows: list[list[int]], cache: Any = None, keep: Any = 1) -> Any:
        """One forward of right-padded rows on top of `cache`, logits at positions `keep`."""
        import torch

        width = max(map(len, rows))
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], device=self.loaded.device)
        return self.loaded.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep)

    def _chunk_logits(self, prompts: list[list[int]], shared: int, prefix: Any) -> list[Any]:
        """Per prompt, next-token logits [1 + len(ASKED_PREFIXES), vocab]: after the prompt, then
        after each asked prefix. The first `shared` tokens' KV cache is `prefix` (when shared > 0)."""
        import torch

        from personactl.model.chat_format import encode_text

        rows = len(prompts)
        cache = _rows_cache(prefix, self.loaded.model, 0, rows, shared) if shared else None
        lengths = [len(p) - shared for p in prompts]
        keep = torch.tensor(sorted(set(n - 1 for n in lengths)), device=self.loaded.device)
        out = self._forward([p[shared:] for p in prompts], cache, keep)
        column = {int(n): j for j, n in enumerate(keep.tolist())}
        roots = [out.logits[r, column[lengths[r] - 1]] for r in range(rows)]

        asks = [encode_text(self.loaded.tokenizer, p, add_prefix=False) for p in ASKED_PREFIXES]
        width = max(map(len, asks))
        results = []
        for r, prompt in enumerate(prompts):
            if self.plain_cache:  # row r's cache, cut at its last real token, once per asked prefix
                row_cache = _rows_cache(out.past_key_values, self.loaded.model, r, len(asks), len(prompt))
            else:  # one prompt, no padding: its cache is the whole cache
                row_cache = out.past_key_values
                row_cache.batch_repeat_interleave(len(asks))
            logits = self._forward(asks, row_cache, width).logits
            after = [logits[a, len(ask) - 1] for a, ask in enumerate(asks)]
            results.append(torch.stack([roots[r], *after]))
        return results

    def _top(self, logits: Any) -> dict[str, TopLogprobs]:
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)
        digits = logp[:, self.digit_ids].tolist()
        others = logp.topk(OTHER_TOKENS, dim=-1)
        result = {}
        for row, prefix in enumerate(("", *ASKED_PREFIXES)):
            chosen = dict(zip(self.digit_ids, digits[row], strict=True))
            chosen.update(zip(others.indices[row].tolist(), others.values[row].tolist(), strict=True))
            result[prefix] = [(self.texts[i], value) for i, value in chosen.items()]
        return result

    def judge_one(self, prompt: str) -> Judgement:
        return self.judge_tops(self.tops([prompt])[0])

    @staticmethod
    def judge_tops(tops: dict[str, TopLogprobs]) -> Judgement:
        async def ask(prefill: str) -> TopLogprobs:
            return tops[prefill]

        return asyncio.run(digit_tree(ask))

    def judge(self, prompts: Sequence[str], on_done: Callable[[Judgement], None] = lambda j: None) -> list[Judgement]:
        """Judge every prompt; results in input order. Cached prompts are not run again."""
        results, todo = split_cached(self.cache, self.identity, prompts, on_done)
        step = max(self.batch_size, 32)  # judgements are saved (and reported) as each group is done
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            for i, tops in zip(part, self.tops([prompts[i] for i in part]), strict=True):
                self.requests_sent += 1
                judgement = self.judge_tops(tops)
                if self.cache:
                    self.cache.put(JudgeCache.key(self.identity, prompts[i]), judgement)
                results[i] = judgement
                on_done(judgement)
        return results  # type: ignore[return-value]


def _plain_cache(model: Any) -> bool:
    """Whether the model's KV cache keeps every position in full ([batch, heads, positions, dim] per
    layer), so a row and a span of positions can be cut out of it. Sliding-window and other caches
    are run one prompt at a time, without a shared prefix."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
    except Exception:  # an unknown config: take the general path
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def _rows_cache(cache: Any, model: Any, row: int, count: int, length: int) -> Any:
    """A new cache: row `row` of `cache`, positions [0, length), `count` times (views, copied on append)."""
    from transformers import DynamicCache

    def cut(tensor: Any) -> Any:
        return tensor[row : row + 1, :, :length].expand(count, -1, -1, -1)

    return DynamicCache([(cut(layer.keys), cut(layer.values)) for layer in cache.layers], config=model.config)
