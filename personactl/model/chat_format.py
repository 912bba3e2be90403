"""Chat template -> token ids with exact spans.

A training example is the prompt (system + user + assistant header, from the model's own chat
template) followed by the response tokens. Spans are token counts, never string offsets: tokens
`[0, prompt_len)` are the prompt and `[prompt_len, len(input_ids))` the response.

Thinking models (Qwen3 and its kin) write a `<think>…</think>` section before the answer. The
template's switch (`enable_thinking`) is honoured when asked (`render_prompt(..., thinking=)`, or a
tokenizer marked with `set_thinking`), and every example knows where its answer starts after the
thinking tokens (`answer_start`), so extraction can read the answer alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from personactl.errors import ModelError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    prompt_len: int
    answer_start: int | None = None  # first answer token after a thinking section; None: the response start

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    @property
    def answer_begin(self) -> int:
        return self.prompt_len if self.answer_start is None else self.answer_start

    @property
    def answer_len(self) -> int:
        return len(self.input_ids) - self.answer_begin


@dataclass(frozen=True)
class PairExample:
    """One contrastive pair: the same question answered with and without the trait."""

    pos: EncodedExample
    neg: EncodedExample

    @property
    def max_len(self) -> int:
        return max(len(self.pos.input_ids), len(self.neg.input_ids))


def chat_messages(system: str | None, user: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}]


def set_thinking(tokenizer: Any, thinking: bool | None) -> None:
    """Make every prompt this tokenizer renders turn thinking on or off (None: the template's default)."""
    tokenizer.personactl_thinking = thinking


def apply_thinking(tokenizer: Any, thinking: str) -> None:
    """The `thinking` setting on a tokenizer's prompts: `auto` leaves the chat template's default."""
    set_thinking(tokenizer, {"on": True, "off": False}.get(thinking))


def collate_pairs(by_pair: dict[str, dict[str, EncodedExample]]) -> list[PairExample]:
    """Examples keyed by pair id and polarity as pairs sorted by pair id; incomplete pairs are left out."""
    return [PairExample(v["pos"], v["neg"]) for _, v in sorted(by_pair.items()) if {"pos", "neg"} <= set(v)]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], thinking: bool | None = None) -> str:
    """The prompt text up to and including the assistant header.

    `thinking` (else the tokenizer's `set_thinking` choice) is passed to the template as
    `enable_thinking`; templates without the switch ignore it. Templates that reject a system role
    (e.g. Gemma's) get the system text folded into the first user turn, which is what those
    models' own docs recommend."""
    if thinking is None:
        thinking = getattr(tokenizer, "personactl_thinking", None)
    extra = {} if thinking is None else {"enable_thinking": thinking}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as exc:  # jinja raises its own TemplateError subclasses
        if messages and messages[0]["role"] == "system" and len(messages) > 1:
            folded = [
                {"role": messages[1]["role"], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            ]
            return render_prompt(tokenizer, folded + messages[2:], thinking)
        raise ModelError(f"the chat template failed: {exc}") from None


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text by default (usually BOS), else []."""
    with_special = list(tokenizer("x")["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):  # also finds it when an EOS follows
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def encode_text(tokenizer: Any, text: str, *, add_prefix: bool = True) -> list[int]:
    """Token ids of text as the model expects to see it at sequence start.

    Templates that already write the BOS token are not given a second one."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_prefix:
        prefix = _special_prefix(tokenizer)
        if prefix and ids[: len(prefix)] != prefix:
            ids = prefix + ids
    return ids


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return encode_text(tokenizer, render_prompt(tokenizer, messages))


def encode_example(
    tokenizer: Any,
    messages: list[dict[str, str]],
    response: str | None = None,
    response_ids: list[int] | None = None,
) -> EncodedExample:
    """Prompt ids + response ids. Prefer `response_ids` (the generated tokens themselves) when known."""
    prompt = encode_prompt(tokenizer, messages)
    if response_ids is None:
        response_ids = list(tokenizer(response or "", add_special_tokens=False)["input_ids"])
    ids = tuple(prompt) + tuple(response_ids)
    return EncodedExample(ids, len(prompt), answer_start(tokenizer, ids, len(prompt)))


def think_token_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The ids of `<think>` and `</think>` when the vocabulary has them as single tokens."""
    ids = []
    for token in (THINK_OPEN, THINK_CLOSE):
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == tokenizer.unk_token_id:
            return None
        ids.append(found)
    return ids[0], ids[1]


def answer_start(tokenizer: Any, ids: tuple[int, ...], prompt_len: int) -> int | None:
    """Index of the first answer token after a thinking section inside the response (whitespace
    after `</think>` skipped); the sequence's end when the thinking never closed; None when the
    response has no thinking section (the answer is the whole response)."""
    think = think_token_ids(tokenizer)
    response = ids[prompt_len:]
    if think is None or think[0] not in response and think[1] not in response:
        return None
    if think[1] not in response:
        return len(ids)  # cut off while still thinking: no answer
    start = prompt_len + len(response) - response[::-1].index(think[1])
    while start < len(ids) and not tokenizer.decode([ids[start]]).strip():
        start += 1
    return start


def encode_raw(tokenizer: Any, text: str, prompt: str | None = None) -> EncodedExample:
    """A plain-text example (no chat template): optional prompt text, then the text as the 'response'.

    Without a prompt, the sequence's first token is context, never response: the attention sink
    sits there (`personactl.core.sinks`). The tokenizer's BOS is prepended when it has one; otherwise
    the text's own first token is the prompt, and the response starts at its second token."""
    body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt_ids = encode_text(tokenizer, prompt) if prompt else _special_prefix(tokenizer)
    if not prompt_ids:
        prompt_ids, body = body[:1], body[1:]
    return EncodedExample(tuple(prompt_ids) + tuple(body), len(prompt_ids))
