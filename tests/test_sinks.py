"""Attention sinks never enter a mean or a norm: plain texts, injected massive activations, bad input."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from test_extraction import POSITIONS, make_pairs, naive_rows

from personactl.activations import extract_vectors
from personactl.chat_format import encode_raw
from personactl.errors import InputError
from personactl.extraction import pairs_from_jsonl
from personactl.models import load_model

TEXTS = [
    ("the quick brown fox jumps", "a lazy dog while gloomy"),
    ("cheerful assistants answer every question", "gloomy assistants answer"),
    ("over the lazy dog", "the brown fox jumps over a dog"),
    ("every question while cheerful", "a gloomy question"),
]


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)


def write_pairs(path, texts) -> None:
    path.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in texts))


def test_plain_text_without_bos_skips_token_zero_like_a_naive_reference(tiny, tmp_path):
    tok = tiny.tokenizer
    assert tok("fox")["input_ids"] == tok("fox", add_special_tokens=False)["input_ids"]  # this tokenizer adds no BOS
    write_pairs(tmp_path / "plain.jsonl", TEXTS)
    pairs, has_prompt = pairs_from_jsonl(tmp_path / "plain.jsonl", tok)
    assert not has_prompt
    for pair, (pos, _) in zip(pairs, TEXTS, strict=True):
        assert list(pair.pos.input_ids) == tok(pos, add_special_tokens=False)["input_ids"]
        assert pair.pos.prompt_len == 1  # token 0 is context
    result = extract_vectors(
        tiny.model, tiny.layers, pairs, pad_id=tok.pad_token_id, positions=["response_start", "response_avg"]
    )
    sums = {"response_start": 0, "response_avg": 0}
    for pair in pairs:
        for sign, ex in ((1, pair.pos), (-1, pair.neg)):
            rows = torch.stack(naive_rows(tiny.model, tiny.layers, ex))  # [L+1, T, H]
            sums["response_start"] = sums["response_start"] + sign * rows[:, 1]
            sums["response_avg"] = sums["response_avg"] + sign * rows[:, 1:].mean(1)
    for position, total in sums.items():
        torch.testing.assert_close(result.mean_diff[position], total / len(pairs), atol=1e-5, rtol=1e-5)


def test_plain_text_with_bos_keeps_every_text_token_as_response(tiny_factory):
    tok = load_model(str(tiny_factory("llama", "bos")), dtype="float32", device="cpu", log=lambda m: None).tokenizer
    example = encode_raw(tok, "the quick brown fox")
    assert example.input_ids[0] == tok.bos_token_id and example.prompt_len == 1
    assert list(example.input_ids[1:]) == tok("the quick brown fox", add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def massive_activation(model, layers, column: int | None, dim: int = 3, size: float = 1e4):
    """Every row 1..L holds `size` on `dim` at each sequence's position `column` (None: its first
    real token), while each block still computes on the untouched stream (its input is restored
    exactly), so every other token's activations are bit-identical to a run without it."""
    saved: dict[int, torch.Tensor] = {}
    where: dict[str, torch.Tensor] = {}

    def locate(_module, _args, kwargs):
        mask = kwargs["attention_mask"].bool()
        first = mask.long().argmax(1)
        where["col"] = first if column is None else first + column

    def add(i):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            saved[i] = hidden
            bumped = hidden.clone()
            bumped[torch.arange(len(bumped)), where["col"], dim] += size
            return (bumped, *output[1:]) if isinstance(output, tuple) else bumped

        return hook

    def restore(i):
        def hook(_module, args, kwargs):
            if args:
                return (saved[i - 1], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": saved[i - 1]}

        return hook

    handles = [model.register_forward_pre_hook(locate, with_kwargs=True)]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(add(i)))
        if i > 0:
            handles.append(layer.register_forward_pre_hook(restore(i), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_massive_activation_at_position_zero_changes_nothing(tiny, padding_side):
    pairs = make_pairs(tiny.tokenizer, 6, seed=2)  # chat pairs: every position, prompt_avg included
    run = lambda: extract_vectors(  # noqa: E731
        tiny.model, tiny.layers, pairs, pad_id=tiny.tokenizer.pad_token_id, padding_side=padding_side, batch_tokens=300
    )
    clean = run()
    with massive_activation(tiny.model, tiny.layers, column=None):
        sunk = run()
    for position in POSITIONS:
        for kind in ("mean_diff", "pos_mean", "neg_mean"):
            torch.testing.assert_close(getattr(sunk, kind)[position], getattr(clean, kind)[position], msg=kind)
    torch.testing.assert_close(sunk.stream_norm, clean.stream_norm)
    assert sunk.diagnostics["positions"] == clean.diagnostics["positions"]


def test_massive_activation_inside_the_response_is_left_out_of_means_and_norms(tiny, tmp_path):
    write_pairs(tmp_path / "plain.jsonl", TEXTS)
    pairs, _ = pairs_from_jsonl(tmp_path / "plain.jsonl", tiny.tokenizer)  # every prompt is token 0
    massive = 2  # the second response token, at rows 1..L
    assert all(min(len(p.pos.input_ids), len(p.neg.input_ids)) > massive + 1 for p in pairs)
    with massive_activation(tiny.model, tiny.layers, column=massive):
        sunk = extract_vectors(tiny.model, tiny.layers, pairs, pad_id=tiny.tokenizer.pad_token_id)
    diff, medians = 0, []
    for pair in pairs:
        for sign, ex in ((1, pair.pos), (-1, pair.neg)):
            rows = torch.stack(naive_rows(tiny.model, tiny.layers, ex))  # the untouched stream
            norms = rows.norm(dim=-1)
            kept = [t for t in range(1, len(ex.input_ids)) if t != massive]
            mean = torch.cat([rows[:1, 1:].mean(1), rows[1:, kept].mean(1)])  # row 0 holds no massive token
            diff = diff + sign * mean
            medians.append(torch.cat([norms[:1, 1:].median(1).values, norms[1:, kept].median(1).values]))
    torch.testing.assert_close(sunk.mean_diff["response_avg"], diff / len(pairs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sunk.stream_norm, torch.stack(medians, 1).median(1).values, atol=1e-5, rtol=1e-5)
    assert float(sunk.stream_norm.max()) < 100  # a mean over tokens would carry 1e4 / T


def test_single_token_plain_texts_are_a_one_line_error(tiny, tmp_path):
    write_pairs(tmp_path / "short.jsonl", [("the quick fox", "a lazy dog"), ("x", "the lazy dog")])
    with pytest.raises(InputError, match=r"short.jsonl:2: a text is a single token"):
        pairs_from_jsonl(tmp_path / "short.jsonl", tiny.tokenizer)


def test_a_vector_file_from_before_the_sink_rule_still_loads_and_steers_with_a_note(tiny, tmp_path, capsys):
    from personactl.extraction import build_vector
    from personactl.steering import Steerer
    from personactl.vectors import PersonaVector

    pairs = make_pairs(tiny.tokenizer, 3)
    vector, _ = build_vector(tiny, pairs, rows=None, batch_tokens=4096, provenance={"source": "responses"})
    assert "sinks" in vector.metadata and vector.metadata["diagnostics"]["n_pairs"] == 3
    vector.save(tmp_path / "new.safetensors")
    PersonaVector.load(tmp_path / "new.safetensors")
    assert "note:" not in capsys.readouterr().err
    del vector.metadata["sinks"], vector.metadata["diagnostics"]
    vector.save(tmp_path / "old.safetensors")
    old = PersonaVector.load(tmp_path / "old.safetensors")
    PersonaVector.load(tmp_path / "old.safetensors")
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "predates sink-safe extraction" in err  # once per path
    direction = old.direction(2, norm="stream")
    ids = torch.tensor([pairs[0].pos.input_ids])
    with torch.inference_mode():
        plain = tiny.model(ids).logits
        with Steerer(tiny.model, direction, layers=[2], coefficient=1.0, decoder_layers=tiny.layers):
            steered = tiny.model(ids).logits
    assert not torch.equal(plain, steered)
