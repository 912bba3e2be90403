"""Steering plans on a real (tiny, random-init) model in float32: ablation, capping and composition
inside the Steerer's hooks, and rows with different plans in one batch."""

from __future__ import annotations

import pytest
import torch

from personactl.backends import Sampling, Steering
from personactl.backends.hf import HFBackend
from personactl.backends.hf_rows import RowRequest
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.loading import load_model
from personactl.model.steering import Steerer
from personactl.model.steering_ops import AddTerm, ablate_term, cap_term

LAYER = 2


@pytest.fixture(scope="module")
def lm(tiny_factory):
    return load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def prompts(lm):
    questions = ["what about the weather today?", "tell me about your plans", "why?"]
    return [encode_prompt(lm.tokenizer, chat_messages("You are cheerful.", q)) for q in questions]


def vector(lm, seed: int) -> torch.Tensor:
    return torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed)) * 2.0


def batch(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def stream_after(lm, steerer: Steerer | None, prompts, layer: int = LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after block `layer` (as the next block sees it) and the logits."""
    seen = {}
    ids, mask = batch(prompts)

    def keep(_module, _args, output):
        seen["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    with torch.inference_mode():
        if steerer is not None:
            steerer.__enter__()
        handle = lm.layers[layer - 1].register_forward_hook(keep)  # after the steerer's hook
        try:
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
            if steerer is not None:
                steerer.remove()
    return seen["h"], logits, mask.bool()


def test_ablation_leaves_no_projection_at_its_layer(lm, prompts):
    v = vector(lm, 1)
    unit = v / v.norm()
    plain, _, mask = stream_after(lm, None, prompts)
    ablated, logits, _ = stream_after(lm, Steerer(lm.model, {}, plan={LAYER: [ablate_term(v, 0.0)]}), prompts)
    before, after = (plain[mask] @ unit).abs().max(), (ablated[mask] @ unit).abs().max()
    assert after < 1e-6 * float(plain.norm(dim=-1).max())  # zero, up to float32 rounding
    assert before > 1e4 * after
    rest = lambda h: h - (h @ unit)[..., None] * unit  # noqa: E731
    assert torch.allclose(rest(ablated), rest(plain), atol=1e-5)


def test_capping_leaves_nothing_above_tau_and_changes_nothing_below(lm, prompts):
    v = vector(lm, 2)
    unit = v / v.norm()
    plain, _, mask = stream_after(lm, None, prompts)
    tau = float((plain[mask] @ unit).median())
    capped, _, _ = stream_after(lm, Steerer(lm.model, {}, plan={LAYER: [cap_term(v, tau)]}), prompts)
    below = (plain @ unit) <= tau
    assert below[mask].any() and (~below[mask]).any()
    assert torch.equal(capped[below], plain[below])
    assert float((capped[mask] @ unit).max()) <= tau + 1e-5


def test_two_add_terms_equal_one_term_of_their_sum(lm, prompts):
    a, b = vector(lm, 3), vector(lm, 4)
    two = Steerer(lm.model, {}, plan={LAYER: [AddTerm(a), AddTerm(b)], LAYER + 1: [AddTerm(a)]})
    one = Steerer(lm.model, {}, plan={LAYER: [AddTerm(a + b)], LAYER + 1: [AddTerm(a)]})
    _, logits_two, _ = stream_after(lm, two, prompts)
    _, logits_one, _ = stream_after(lm, one, prompts)
    _, plain, _ = stream_after(lm, None, prompts)
    assert torch.equal(logits_two, logits_one)
    assert not torch.allclose(logits_two, plain, atol=1e-3)


def test_a_plan_add_equals_classic_steering(lm, prompts):
    """α·v as a plan term is exactly α·v through the classic coefficient path."""
    v, alpha = vector(lm, 5), 3.0
    delta = torch.tensor(alpha).to(torch.float32) * v
    _, classic, _ = stream_after(lm, Steerer(lm.model, {LAYER: v}, coefficient=alpha), prompts)
    _, planned, _ = stream_after(lm, Steerer(lm.model, {}, plan={LAYER: [AddTerm(delta)]}), prompts)
    assert torch.equal(classic, planned)


def test_terms_follow_the_position_mode(lm, prompts):
    """In `response` mode the prompt's positions before the last one are untouched."""
    v = vector(lm, 6)
    plain, _, mask = stream_after(lm, None, prompts)
    steerer = Steerer(lm.model, {}, positions="response", plan={LAYER: [ablate_term(v, 0.0)]})
    ablated, _, _ = stream_after(lm, steerer, prompts)
    assert torch.equal(ablated[:, :-1], plain[:, :-1])
    assert not torch.allclose(ablated[:, -1], plain[:, -1], atol=1e-3)


def test_rows_with_different_plans_equal_each_alone(lm, prompts):
    """Generation: each row of a mixed batch (its own plan, or none) equals the row alone; a row
    without steering equals unsteered, token for token."""
    backend = HFBackend(lm.model, lm.tokenizer)
    v, w = vector(lm, 7), vector(lm, 8)
    plans = [
        Steering({LAYER: v}, 4.0, "all", plan={LAYER: [ablate_term(w, 0.0)], LAYER + 1: [cap_term(v, 0.5)]}),
        Steering({}, 0.0, "all", plan={LAYER: [AddTerm(-4.0 * w), ablate_term(v, 1.0)]}),
        None,
    ]

    def row(prompt, steering):
        return RowRequest(prompt, Sampling(10, 0.0), 0, lambda t: None, steering=steering)

    mixed = backend.stream_batch([row(p, s) for p, s in zip(prompts, plans, strict=True)])
    alone = [backend.stream_batch([row(p, s)])[0] for p, s in zip(prompts, plans, strict=True)]
    assert mixed == alone
    assert mixed[0] != backend.stream_batch([row(prompts[0], None)])[0]
    assert mixed[1] != backend.stream_batch([row(prompts[1], None)])[0]


def test_alpha_v_and_a_plan_add_at_its_layer_act_as_one_add_of_their_sum(lm, prompts):
    """α·v (the classic coefficient path) then a plan's add w at the same layer is one add of
    α·v + w, exactly, as consecutive plan adds are (and as the vLLM tables add them)."""
    v, w, alpha = vector(lm, 9), vector(lm, 10) * 0.3, 1.7
    summed = torch.tensor(alpha).to(torch.float32) * v + w  # α·v as the Steerer computes it, plus w
    both = Steerer(lm.model, {LAYER: v}, coefficient=alpha, plan={LAYER: [AddTerm(w), ablate_term(v, 0.5)]})
    one = Steerer(lm.model, {}, plan={LAYER: [AddTerm(summed), ablate_term(v, 0.5)]})
    after_both, _, _ = stream_after(lm, both, prompts)
    after_one, _, _ = stream_after(lm, one, prompts)
    assert torch.equal(after_both, after_one)
