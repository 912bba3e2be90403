"""Thinking models: the template's switch is honoured and extraction can read the answer alone."""

from __future__ import annotations

import pytest
import torch
from conftest import CHATML, build_tokenizer, tiny_config
from test_extraction import naive_rows

from personactl.errors import InputError
from personactl.model.activations import extract_vectors
from personactl.model.chat_format import (
    PairExample,
    apply_thinking,
    chat_messages,
    encode_example,
    encode_prompt,
    render_prompt,
    set_thinking,
)
from personactl.model.loading import load_model

# Qwen3's switch: with enable_thinking false the template writes an empty, closed thinking block
QWEN3_LIKE = CHATML.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}",
)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer("chatml")
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    tokenizer.chat_template = QWEN3_LIKE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", len(tokenizer)), dtype=torch.float32)
    directory = tmp_path_factory.mktemp("tiny-qwen3-think")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return load_model(str(directory), dtype="float32", device="cpu", log=lambda m: None)


def test_the_template_switch_turns_thinking_on_or_off(qwen3):
    tok, messages = qwen3.tokenizer, chat_messages("Be brief.", "How is the weather?")
    assert render_prompt(tok, messages, thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(tok, messages, thinking=True).endswith("<|im_start|>assistant\n")
    assert render_prompt(tok, messages) == render_prompt(tok, messages, thinking=True)  # the template's default
    try:
        apply_thinking(tok, "off")  # what generate and extract do with the `thinking` setting
        assert tok.decode(encode_prompt(tok, messages)).endswith("</think>\n\n")
    finally:
        set_thinking(tok, None)


def test_answer_spans_skip_the_thinking_tokens(qwen3):
    tok, messages = qwen3.tokenizer, chat_messages(None, "How is the weather?")
    thought = encode_example(tok, messages, "<think>\nit might rain tomorrow\n</think>\n\nThe weather is cheerful.")
    assert tok.decode(thought.input_ids[thought.answer_begin :]) == "The weather is cheerful."
    plain = encode_example(tok, messages, "The weather is gloomy.")
    assert plain.answer_start is None and plain.answer_begin == plain.prompt_len
    open_ended = encode_example(tok, messages, "<think>\nstill thinking about")
    assert open_ended.answer_len == 0
    set_thinking(tok, False)  # thinking off: the closed block is part of the prompt
    try:
        off = encode_example(tok, messages, "The weather is fine.")
    finally:
        set_thinking(tok, None)
    assert off.answer_start is None and tok.decode(off.input_ids[: off.prompt_len]).endswith("</think>\n\n")


def test_answer_positions_equal_a_naive_reference_and_need_an_answer(qwen3):
    tok = qwen3.tokenizer
    replies = [
        ("<think>\nthe quick fox\n</think>\n\nThe cheerful dog jumps.", "<think>\na lazy dog\n</think>\nGloomy."),
        ("Cheerful answer with no thinking.", "<think>\n</think>\n\nthe gloomy assistant answers"),
    ]
    pairs = [
        PairExample(
            encode_example(tok, chat_messages(None, "Tell me."), pos),
            encode_example(tok, chat_messages(None, "Tell me."), neg),
        )
        for pos, neg in replies
    ]
    result = extract_vectors(
        qwen3.model,
        qwen3.layers,
        pairs,
        pad_id=tok.pad_token_id,
        positions=["answer_start", "answer_avg", "response_avg"],
    )
    expected = {"answer_start": 0, "answer_avg": 0}
    for pair in pairs:
        for sign, ex in ((1, pair.pos), (-1, pair.neg)):
            rows = torch.stack(naive_rows(qwen3.model, qwen3.layers, ex))
            expected["answer_start"] = expected["answer_start"] + sign * rows[:, ex.answer_begin]
            expected["answer_avg"] = expected["answer_avg"] + sign * rows[:, ex.answer_begin :].mean(1)
    for position, total in expected.items():
        torch.testing.assert_close(result.mean_diff[position], total / len(pairs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(result.mean_diff["answer_avg"], result.mean_diff["response_avg"])
    unfinished = encode_example(tok, chat_messages(None, "Tell me."), "<think>\nno answer yet")
    with pytest.raises(InputError, match="no answer after its thinking section"):
        extract_vectors(qwen3.model, qwen3.layers, [PairExample(unfinished, pairs[0].neg)], pad_id=tok.pad_token_id,
                        positions=["answer_avg"])  # fmt: skip
