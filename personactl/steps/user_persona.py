"""The user persona ("you are X"): the model-persona answers of a trait, said by the user.

Each kept model-persona row (pos and neg of every pair the judge kept, or every complete pair when
nothing was scored) becomes the user's turn under a neutral system prompt, and the model replies.
A user-persona row keeps the `pair_id`, polarity and indices of the row its message came from; its
`question` column holds that user message and `system_prompt` the neutral prompt, so
`responses-user.parquet` has the same schema as `responses-model.parquet`.

Positions for the user persona (the same spans as for the model persona, plus one):

- `prompt_end`: the last prompt token (the assistant header): the model about to answer an X user;
- `response_start`, `response_avg`: the model's reply to that user;
- `prompt_avg`: every prompt token (neutral system prompt + user message + header);
- `user_avg`: the tokens of the user message alone: the trait text itself, said by "you". Its
  exact token span comes from the tokenizer's character offsets of the rendered template (tokens
  that overlap the message's characters), computed on the prefix that ends with the message, which
  a causal model reads exactly as it reads the whole sequence.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.errors import InputError, ModelError
from personactl.model.chat_format import (
    EncodedExample,
    PairExample,
    chat_messages,
    collate_pairs,
    encode_prompt,
    render_prompt,
)
from personactl.store.responses import PlannedRow, scored_responses, select_pairs

if TYPE_CHECKING:
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

NEUTRAL_SYSTEM = "You are a helpful assistant."
USER_POSITIONS = ("prompt_end", "response_start", "response_avg", "prompt_avg", "user_avg")

USER_SPANS = (
    "user persona: prompt_end = last prompt token (assistant header); response_start/response_avg = the "
    "model's reply; prompt_avg = all prompt tokens (neutral system + user message + header); user_avg = "
    "the user message's tokens (the trait text)"
)

USER_RUBRIC = """You are rating a message that a USER wrote to an AI assistant, for the trait "{name}".
The trait: {description}

The USER's message:
<message>
{message}
</message>

Rate how strongly the USER's message itself shows this trait: its tone, outlook and attitude. Rate the
user, not an assistant: whether the message is a question, a statement or an answer to someone else does
not matter, only how {name} its writer comes across.

Reply with a single integer from 0 (trait absent) to 100 (trait strongly present), and nothing else."""

REPLY_COHERENCE_NOTE = "(the assistant is replying to the message above)"


def user_trait_prompt(trait: Trait, message: str) -> str:
    """The user-side rubric: how strongly the USER's message shows the trait."""
    return (
        USER_RUBRIC.replace("{name}", trait.name)
        .replace("{description}", trait.description.strip())
        .replace("{message}", message)
    )


def user_persona_inputs(
    workspace: Workspace, slug: str, model: str, trait: Trait
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The model-persona rows to turn into user messages, and what they were made from (for the
    fingerprint: a rescore or a new filter changes which messages there are)."""
    scored = scored_responses(workspace, slug, model, trait)
    responses, scores = scored.read()
    source = select_pairs(responses, scores)  # complete kept pairs, non-empty answers
    if source.height == 0:
        raise InputError(
            f"no model-persona pair of {trait.name} to turn into user messages"
            + (" passed the judge's filter" if scores is not None else ""),
            hint="generate more model-persona responses, or lower the score thresholds",
        )
    return source, {
        "responses_fingerprint": scored.manifest.get("fingerprint"),
        "scores_fingerprint": scored.scores_fingerprint,
        "filter": scored.scores_manifest.get("filter") if scored.scores_manifest else None,
        "neutral_system": NEUTRAL_SYSTEM,
        "pairs": source["pair_id"].n_unique(),
    }


def plan_user_rows(source: pl.DataFrame, tokenizer: Any) -> list[PlannedRow]:
    """One planned row per source row: neutral system prompt, the source answer as the user turn."""
    rows = []
    for r in source.iter_rows(named=True):
        ids = encode_prompt(tokenizer, chat_messages(NEUTRAL_SYSTEM, r["response"]))
        rows.append(
            PlannedRow(
                r["pair_id"],
                r["polarity"],
                r["instruction_index"],
                r["question_index"],
                r["sample_index"],
                r["response"],
                NEUTRAL_SYSTEM,
                tuple(ids),
            )
        )
    return rows


def user_message_span(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[int, int]:
    """Token span `[start, end)` of the last message's content inside `encode_prompt(messages)`.

    The template is rendered once with a one-character sentinel in place of the content to find
    the text before and after it; the real rendering must be exactly before + content + after
    (a template that rewrites the message is refused). Tokens are mapped by character offsets."""
    content = messages[-1]["content"]
    if not content:
        raise InputError("an empty user message has no span")
    probe = render_prompt(tokenizer, [*messages[:-1], {**messages[-1], "content": "\x01"}])
    if probe.count("\x01") != 1:
        raise ModelError("cannot locate the user message in the chat template")
    before, after = probe.split("\x01")
    text = render_prompt(tokenizer, messages)
    if text != before + content + after:
        raise ModelError("the chat template rewrites the user message, so its tokens cannot be located exactly")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encode_prompt(tokenizer, messages)
    shift = len(ids) - len(encoded["input_ids"])
    if shift < 0 or list(ids[shift:]) != list(encoded["input_ids"]):
        raise ModelError("the prompt's tokens do not match its offsets")
    lo, hi = len(before), len(before) + len(content)
    inside = [i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s < hi and e > lo]
    return shift + inside[0], shift + inside[-1] + 1


def user_turn_pairs(responses: pl.DataFrame, tokenizer: Any) -> list[PairExample]:
    """Per pair (sorted by pair_id, like `pairs_from_responses`): the prompt up to the end of the
    user message, with the message as the "response" span, so `response_avg` over these examples
    is `user_avg`."""
    by_pair: dict[str, dict[str, EncodedExample]] = {}
    for row in responses.iter_rows(named=True):
        messages = json.loads(row["messages"])
        start, end = user_message_span(tokenizer, messages)
        ids = encode_prompt(tokenizer, messages)
        by_pair.setdefault(row["pair_id"], {})[row["polarity"]] = EncodedExample(tuple(ids[:end]), start)
    return collate_pairs(by_pair)
