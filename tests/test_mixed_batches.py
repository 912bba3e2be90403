"""Mixed batches: every row its own steering, sampling, seed and budget in one generate call.

In float32 a row's reply inside a mixed batch equals the same row alone, token for token; α = 0 rows
equal unsteered; a row never sees another row's steering (two opposite α side by side)."""

from __future__ import annotations

import threading

import pytest
import torch

from personactl.backends import Sampling, Steering
from personactl.backends.hf import HFBackend
from personactl.backends.hf_rows import RowRequest
from personactl.core.choices import POSITION_MODES
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.loading import load_model
from personactl.model.steering import Steerer

QUESTIONS = ["what about the weather today?", "tell me about your plans", "why?", "hello world, how are you"]


@pytest.fixture(scope="module")
def lm(tiny_factory):
    return load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def backend(lm):
    return HFBackend(lm.model, lm.tokenizer)


@pytest.fixture(scope="module")
def prompts(lm):
    return [encode_prompt(lm.tokenizer, chat_messages("You are cheerful.", q)) for q in QUESTIONS]


def steering(lm, layers, alpha, positions="all", seed=0):
    torch.manual_seed(seed)
    vector = torch.randn(lm.num_layers + 1, lm.hidden_size) * 2.0
    return Steering({layer: vector[layer] for layer in layers}, alpha, positions)


def row(prompt, steer=None, temperature=0.0, seed=0, max_new_tokens=10, top_p=1.0):
    return RowRequest(prompt, Sampling(max_new_tokens, temperature, top_p), seed, lambda t: None, steering=steer)


def alone(backend, r):
    return backend.stream_batch([r])[0]


def no_hooks(lm):
    return not lm.model._forward_pre_hooks and all(not b._forward_hooks for b in lm.layers)


def test_each_row_of_a_mixed_batch_equals_itself_alone(lm, backend, prompts):
    rows = [
        row(prompts[0], steering(lm, [2], 6.0)),
        row(prompts[0], steering(lm, [2], -6.0)),  # the opposite α beside it
        row(prompts[1], steering(lm, [1, 3], 4.0, "response", seed=1), max_new_tokens=6),
        row(prompts[2], None, temperature=0.9, seed=7, top_p=0.9),
        row(prompts[3], steering(lm, [3], 5.0, "prompt", seed=2), temperature=1.2, seed=3),
        row(prompts[1], steering(lm, [2], 0.0)),
    ]
    batched = backend.stream_batch(rows)
    for r, tokens in zip(rows, batched, strict=True):
        assert tokens == alone(backend, r)
        assert len(tokens) <= r.sampling.max_new_tokens
    assert batched[0] != batched[1]  # opposite α give different replies: the test can fail
    assert no_hooks(lm)


@pytest.mark.parametrize("positions", POSITION_MODES)
def test_a_row_alone_equals_the_one_vector_steerer(lm, backend, prompts, positions):
    steer = steering(lm, [1, 2], 5.0, positions)
    tokens = alone(backend, row(prompts[1], steer, max_new_tokens=12))
    stop = threading.Event()
    reference = backend.stream(prompts[1], Sampling(12, 0.0), 0, lambda t: None, stop, steer)
    assert tokens == reference
    unsteered = backend.stream(prompts[1], Sampling(12, 0.0), 0, lambda t: None, stop, None)
    assert tokens != unsteered  # the steering did something


def test_alpha_zero_rows_are_exactly_unsteered(lm, backend, prompts):
    """Rows with α = 0 beside steered rows: the hidden states they see equal an unsteered run's of
    the same batch (same shapes, so the same kernels whatever the thread count)."""
    ids = torch.tensor([prompts[3][-6:], prompts[3][-6:]])
    seen = []
    probe = lm.layers[2].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            plain = lm.model(ids).logits
            with Steerer.per_row(lm.model, [steering(lm, [2, 3], 0.0), steering(lm, [2, 3], 9.0)]):
                mixed = lm.model(ids).logits
    finally:
        probe.remove()
    assert torch.equal(mixed[0], plain[0])
    assert not torch.equal(mixed[1], plain[0])
    assert torch.equal(seen[1][0], seen[0][0])


def test_tokens_reach_their_own_row_as_they_come(lm, backend, prompts):
    got = {0: [], 1: []}
    rows = [
        RowRequest(prompts[0], Sampling(5, 0.0), 0, got[0].append, steering=steering(lm, [2], 6.0)),
        RowRequest(prompts[2], Sampling(9, 0.0), 0, got[1].append),
    ]
    tokens = backend.stream_batch(rows)
    assert got[0] == tokens[0] and got[1] == tokens[1]
    assert len(tokens[0]) <= 5 and len(tokens[1]) <= 9


def test_a_stopped_row_ends_and_the_others_go_on(lm, backend, prompts):
    stop = threading.Event()
    seen = []

    def on_token(token):
        seen.append(token)
        if len(seen) == 2:
            stop.set()

    rows = [
        RowRequest(prompts[0], Sampling(20, 0.0), 0, on_token, stop),
        RowRequest(prompts[1], Sampling(20, 0.0), 0, lambda t: None),
    ]
    tokens = backend.stream_batch(rows)
    assert tokens[0] == seen and len(seen) == 2
    assert tokens[1] == alone(backend, row(prompts[1], max_new_tokens=20))
