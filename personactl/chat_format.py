"""Chat template -> token ids with exact spans.

A training example is the prompt (system + user + assistant header, from the model's own chat
template) followed by the response tokens. Spans are token counts, never string offsets: tokens
`[0, prompt_len)` are the prompt and `[prompt_len, len(input_ids))` the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from personactl.errors import ModelError


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


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


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text up to and including the assistant header.

    Templates that reject a system role (e.g. Gemma's) get the system text folded into the first
    user turn, which is what those models' own docs recommend."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises its own TemplateError subclasses
        if messages and messages[0]["role"] == "system" and len(messages) > 1:
            folded = [
                {"role": messages[1]["role"], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            ]
            return render_prompt(tokenizer, folded + messages[2:])
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
    return EncodedExample(tuple(prompt) + tuple(response_ids), len(prompt))


def encode_raw(tokenizer: Any, text: str, prompt: str | None = None) -> EncodedExample:
    """A plain-text example (no chat template): optional prompt text, then the text as the 'response'.

    Without a prompt, the sequence's first token is context, never response: the attention sink
    sits there (`personactl.sinks`). The tokenizer's BOS is prepended when it has one; otherwise
    the text's own first token is the prompt, and the response starts at its second token."""
    body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt_ids = encode_text(tokenizer, prompt) if prompt else _special_prefix(tokenizer)
    if not prompt_ids:
        prompt_ids, body = body[:1], body[1:]
    return EncodedExample(tuple(prompt_ids) + tuple(body), len(prompt_ids))
