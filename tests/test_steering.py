"""Steering invariants: α=0 is a no-op, a batched grid equals runs one at a time, hooks never leak,
position modes touch exactly the positions they promise."""

from __future__ import annotations

import pytest
import torch

from personactl.backends import Sampling
from personactl.backends.hf import HFBackend
from personactl.core.choices import POSITION_MODES
from personactl.errors import InputError
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.loading import load_model
from personactl.model.steering import Steerer, plan_grid, run_grid

GREEDY = Sampling(max_new_tokens=12, temperature=0.0)
QUESTIONS = ["what about the weather today?", "tell me about your plans", "why do they matter?", "hello world"]


@pytest.fixture(scope="module")
def lm(tiny_factory):
    return load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def prompts(lm):
    return [encode_prompt(lm.tokenizer, chat_messages("You are cheerful.", q)) for q in QUESTIONS]


def direction(lm, seed=0):
    torch.manual_seed(seed)
    return torch.randn(lm.num_layers + 1, lm.hidden_size) * 2.0


def no_hooks(lm):
    return not lm.model._forward_pre_hooks and all(not b._forward_hooks for b in lm.layers)


@pytest.mark.parametrize("positions", POSITION_MODES)
def test_alpha_zero_equals_unsteered(lm, prompts, positions):
    backend = HFBackend(lm.model, lm.tokenizer)
    plain = backend.generate(prompts, GREEDY, 0)
    with Steerer(lm.model, direction(lm), layers=[1, 2, 3], coefficient=0.0, positions=positions):
        zero = backend.generate(prompts, GREEDY, 0)
    with Steerer(lm.model, direction(lm), layers=[2], coefficient=8.0, positions=positions):
        steered = backend.generate(prompts, GREEDY, 0)
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    assert [g.token_ids for g in steered] != [g.token_ids for g in plain]  # the test can fail
    assert no_hooks(lm)


def test_batched_grid_equals_one_at_a_time(lm, prompts):
    backend = HFBackend(lm.model, lm.tokenizer)
    vec = direction(lm, 1)
    directions = {layer: vec[layer] for layer in (1, 3)}
    rows = plan_grid(len(prompts), [1, 3], [-4.0, 0.0, 2.0, 6.0])
    batched = dict(run_grid(backend, prompts, rows, directions, sampling=GREEDY, seed=0, batch_size=7))
    assert len(batched) == len(rows) == 4 * (1 + 2 * 3)
    for row in rows:
        if row.layer is None:
            alone = backend.generate([prompts[row.prompt_index]], GREEDY, 0)[0]
        else:
            with Steerer(lm.model, directions[row.layer], layers=[row.layer], coefficient=row.coefficient):
                alone = backend.generate([prompts[row.prompt_index]], GREEDY, 0)[0]
        assert batched[row].token_ids == alone.token_ids, row
    assert len({tuple(g.token_ids) for g in batched.values()}) > len(prompts)  # steering did change outputs
    assert no_hooks(lm)


def test_hooks_removed_after_exception(lm, prompts):
    with pytest.raises(RuntimeError, match="boom"):
        with Steerer(lm.model, direction(lm), layers=[1, 2], coefficient=1.0):
            assert not no_hooks(lm)
            raise RuntimeError("boom")
    assert no_hooks(lm)
    with pytest.raises(InputError, match="2 steering coefficients for a batch of 4"):
        with Steerer(lm.model, direction(lm), layers=[1], coefficient=torch.tensor([1.0, 2.0])):
            HFBackend(lm.model, lm.tokenizer).generate(prompts, GREEDY, 0)
    assert no_hooks(lm)


def test_coefficients_update_in_place(lm):
    steerer = Steerer(lm.model, direction(lm), layers=[2], coefficient=torch.zeros(3))
    buffer = steerer.coefficients[2]
    steerer.set_coefficients(torch.tensor([1.0, 2.0, 3.0]))
    assert steerer.coefficients[2] is buffer and buffer.tolist() == [1.0, 2.0, 3.0]


def layer_deltas(lm, prompt, positions, new_tokens=3):
    """Which sequence positions got steered at layer 2, through prefill + cached decode steps."""
    seen = {"steered": [], "plain": []}

    def run(kind, steer):
        outputs = []
        probe = lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)  # noqa: E731
        ids = torch.tensor([prompt])
        with (
            torch.no_grad(),
            Steerer(lm.model, direction(lm), layers=[2], coefficient=1.0 if steer else 0.0, positions=positions),
        ):
            hook = lm.layers[1].register_forward_hook(probe)  # after the steering hook: sees its result
            try:
                out = lm.model(ids, use_cache=True)
                for step in range(new_tokens):
                    out = lm.model(torch.tensor([[5 + step]]), past_key_values=out.past_key_values, use_cache=True)
            finally:
                hook.remove()
        seen[kind] = torch.cat(outputs, dim=1)[0]

    run("steered", True)
    run("plain", False)
    return (seen["steered"] - seen["plain"]).abs().sum(-1) > 0


def test_position_modes_are_exact_with_the_kv_cache(lm, prompts):
    prompt = prompts[0]
    n = len(prompt)
    steered_all = layer_deltas(lm, prompt, "all")
    assert steered_all.all()
    prompt_only = layer_deltas(lm, prompt, "prompt")
    assert prompt_only.tolist() == [True] * n + [False] * 3
    # the steering hook sits on block 2 and the probe reads block 2's output, so in response mode only
    # the last prompt token and the generated tokens are changed: earlier prompt positions are untouched
    response = layer_deltas(lm, prompt, "response")
    assert response.tolist() == [False] * (n - 1) + [True] * 4


def test_bad_steering_inputs(lm):
    with pytest.raises(InputError, match="out of range"):
        Steerer(lm.model, direction(lm), layers=[0])
    bad = direction(lm)
    bad[2, 0] = float("nan")
    with pytest.raises(InputError, match="not a finite"):
        Steerer(lm.model, bad, layers=[2])
    with pytest.raises(InputError, match="unknown steering positions"):
        Steerer(lm.model, direction(lm), layers=[2], positions="middle")
