"""Batched, streamed extraction equals a naive per-sample fp32 reference, for every architecture."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ARCHES

from personactl.core.choices import POSITIONS
from personactl.model.activations import collate, extract_vectors
from personactl.model.chat_format import EncodedExample, PairExample, chat_messages, encode_example
from personactl.model.loading import load_model

WORDS = "the quick brown fox jumps over a lazy dog while cheerful gloomy assistants answer every question".split()


def make_pairs(tokenizer, n: int, seed: int = 0) -> list[PairExample]:
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    pairs = []
    for _ in range(n):
        question = text(rng.randint(2, 12))
        pos = encode_example(tokenizer, chat_messages("You are cheerful.", question), text(rng.randint(1, 20)))
        neg = encode_example(
            tokenizer, chat_messages("You are gloomy and very sad.", question), text(rng.randint(1, 20))
        )
        pairs.append(PairExample(pos, neg))
    return pairs


def naive_rows(model, layers, example) -> list[torch.Tensor]:
    """Residual rows 0..L for one unpadded example, the way persona-vectors does it (batch 1,
    output_hidden_states); row L read from the last block's output (HF's is after the final norm)."""
    captured = {}
    handle = layers[-1].register_forward_hook(
        lambda m, a, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            out = model(torch.tensor([example.input_ids]), output_hidden_states=True)
    finally:
        handle.remove()
    rows = [h[0].float() for h in out.hidden_states[: len(layers)]]
    return rows + [captured["last"][0].float()]


def naive_sinks(rows: torch.Tensor) -> torch.Tensor:
    """[L+1, T] sink flags of one unpadded sequence, written out from the rule: token 0, and any
    token whose norm at a row is over SINK_FACTOR times that row's median token norm, from that
    row on (every row is read here)."""
    from personactl.core.sinks import SINK_FACTOR

    norms = rows.norm(dim=-1)
    flags = torch.zeros_like(norms, dtype=torch.bool)
    for row in range(norms.shape[0]):
        median = norms[row].median()
        for t in range(norms.shape[1]):
            earlier = row > 0 and bool(flags[row - 1, t])
            flags[row, t] = t == 0 or earlier or bool(norms[row, t] > SINK_FACTOR * median)
    return flags


def naive_span_mean(rows: torch.Tensor, sinks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[L+1, H]: per row, the mean over tokens start..stop-1 that are not sinks at that row."""
    out = []
    for row in range(rows.shape[0]):
        keep = [t for t in range(start, stop) if not sinks[row, t]] or list(range(start, stop))
        out.append(rows[row, keep].mean(0))
    return torch.stack(out)


def naive_reference(model, layers, pairs):
    """Per-position mean differences [L+1, H] computed one example at a time in fp32."""
    sums = {p: {"pos": 0, "neg": 0} for p in POSITIONS}
    for pair in pairs:
        for side, ex in (("pos", pair.pos), ("neg", pair.neg)):
            rows = torch.stack(naive_rows(model, layers, ex))  # [L+1, T, H]
            sinks = naive_sinks(rows)
            P, T = ex.prompt_len, len(ex.input_ids)
            values = {
                "prompt_end": rows[:, P - 1],
                "response_start": rows[:, P],
                "response_avg": naive_span_mean(rows, sinks, P, T),
                "prompt_avg": naive_span_mean(rows, sinks, 0, P),
            }
            for p in POSITIONS:
                sums[p][side] = sums[p][side] + values[p]
    n = len(pairs)
    return {p: sums[p]["pos"] / n - sums[p]["neg"] / n for p in POSITIONS}


@pytest.mark.parametrize("arch", ARCHES)
def test_batched_extraction_equals_naive_reference(tiny_factory, arch):
    lm = load_model(str(tiny_factory(arch)), dtype="float32", device="cpu", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, 9)
    reference = naive_reference(lm.model, lm.layers, pairs)
    for padding_side in ("right", "left"):
        result = extract_vectors(
            lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, batch_tokens=200, padding_side=padding_side
        )  # small budget: several batches
        for p in POSITIONS:
            torch.testing.assert_close(
                result.mean_diff[p], reference[p], atol=1e-5, rtol=1e-5, msg=f"{arch} {padding_side} {p}"
            )


@pytest.mark.parametrize("kind", ["bos", "bos_template"])
def test_bos_tokenizers_extract_exactly(tiny_factory, kind):
    lm = load_model(str(tiny_factory("llama", kind)), dtype="float32", device="cpu", log=lambda m: None)
    bos = lm.tokenizer.bos_token_id
    pairs = make_pairs(lm.tokenizer, 5)
    for pair in pairs:  # exactly one BOS, at the start
        assert pair.pos.input_ids[0] == bos and pair.pos.input_ids.count(bos) == 1
    reference = naive_reference(lm.model, lm.layers, pairs)
    result = extract_vectors(
        lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, padding_side="left", batch_tokens=150
    )
    for p in POSITIONS:
        torch.testing.assert_close(result.mean_diff[p], reference[p], atol=1e-5, rtol=1e-5)


def test_spans_are_exact_under_padding(tiny_factory):
    lm = load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, 4, seed=3)
    examples = [e for p in pairs for e in (p.pos, p.neg)]
    for side in ("left", "right"):
        batch = collate(examples, pad_id=0, padding_side=side)
        for i, ex in enumerate(examples):
            real = batch.input_ids[i][batch.attention_mask[i]].tolist()
            assert real == list(ex.input_ids)
            assert batch.input_ids[i, batch.prompt_end[i]].item() == ex.input_ids[ex.prompt_len - 1]
            assert batch.input_ids[i, batch.response_start[i]].item() == ex.input_ids[ex.prompt_len]
            assert batch.input_ids[i][batch.prompt_mask[i]].tolist() == list(ex.input_ids[: ex.prompt_len])
            assert batch.input_ids[i][batch.response_mask[i]].tolist() == list(ex.input_ids[ex.prompt_len :])
            assert batch.position_ids[i][batch.attention_mask[i]].tolist() == list(range(len(ex.input_ids)))


def test_layer_subset_stops_early_and_matches_full(tiny_factory):
    lm = load_model(str(tiny_factory("qwen2")), dtype="float32", device="cpu", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, 6)
    full = extract_vectors(lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id)
    calls = []
    handle = lm.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        part = extract_vectors(lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, rows=[0, 2])
    finally:
        handle.remove()
    assert calls == []  # block 3 (row 3) never ran
    for p in POSITIONS:
        torch.testing.assert_close(part.mean_diff[p][[0, 2]], full.mean_diff[p][[0, 2]])
        assert torch.isnan(part.mean_diff[p][[1, 3]]).all()
    assert len(lm.layers[0]._forward_pre_hooks) == 0 and all(len(layer._forward_hooks) == 0 for layer in lm.layers[:2])


@pytest.mark.parametrize("n_pairs", [12, 40])  # fewer pairs than hidden units (32): Gram route; more: scatter
def test_pca_is_top_principal_direction_of_pair_differences(tiny_factory, n_pairs):
    lm = load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, n_pairs, seed=5)
    result = extract_vectors(lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, positions=["response_avg"])
    diffs = []
    for pair in pairs:
        pos = torch.stack(naive_rows(lm.model, lm.layers, pair.pos))[:, pair.pos.prompt_len :].mean(1)
        neg = torch.stack(naive_rows(lm.model, lm.layers, pair.neg))[:, pair.neg.prompt_len :].mean(1)
        diffs.append(pos - neg)
    D = torch.stack(diffs, 1).double()  # [L+1, N, H]
    for row in range(D.shape[0]):
        top = torch.linalg.svd(D[row], full_matrices=False).Vh[0]
        got = result.pca["response_avg"][row].double()
        assert abs(got.norm().item() - 1) < 1e-5
        assert abs(abs(torch.dot(got, top).item()) - 1) < 1e-4  # same axis
        assert torch.dot(got, result.mean_diff["response_avg"][row].double()) > 0  # sign follows mean diff


def test_stream_norm_is_median_of_example_median_response_token_norms(tiny_factory):
    lm = load_model(str(tiny_factory("llama")), dtype="float32", device="cpu", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, 4, seed=9)
    result = extract_vectors(lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, positions=["prompt_end"])
    medians = []
    for ex in [e for pair in pairs for e in (pair.pos, pair.neg)]:
        rows = torch.stack(naive_rows(lm.model, lm.layers, ex))
        sinks = naive_sinks(rows)
        norms = rows.norm(dim=-1)
        per_row = [norms[r, ex.prompt_len :][~sinks[r, ex.prompt_len :]].median() for r in range(rows.shape[0])]
        medians.append(torch.stack(per_row))
    expected = torch.stack(medians, dim=1).median(dim=1).values
    torch.testing.assert_close(result.stream_norm, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_single_token_positions_without_stream_norm_stop_at_the_read_token(tiny_factory, arch):
    lm = load_model(str(tiny_factory(arch)), dtype="float32", device="cpu", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, 7, seed=11)
    pad = lm.tokenizer.pad_token_id
    for positions in (["response_start"], ["prompt_end"], ["prompt_end", "response_start"]):
        for side in ("right", "left"):
            full = extract_vectors(lm.model, lm.layers, pairs, pad_id=pad, positions=positions, padding_side=side)
            widths: list[int] = []
            handle = lm.layers[0].register_forward_pre_hook(lambda m, args, seen=widths: seen.append(args[0].shape[1]))
            try:
                cut = extract_vectors(
                    lm.model,
                    lm.layers,
                    pairs,
                    pad_id=pad,
                    positions=positions,
                    padding_side=side,
                    stream_norm=False,
                    batch_tokens=120,
                )
            finally:
                handle.remove()
            extra = 1 if "response_start" in positions else 0
            ran = [e.prompt_len + extra for p in pairs for e in (p.pos, p.neg)]
            assert cut.n_tokens == sum(ran) < full.n_tokens
            assert max(widths) == max(ran)  # nothing after the read token ran
            assert torch.isnan(cut.stream_norm).all() and not torch.isnan(full.stream_norm).any()
            for p in positions:
                for kind in ("mean_diff", "pos_mean", "neg_mean", "pca"):
                    torch.testing.assert_close(  # NaN: PCA of all-zero differences (same token at row 0)
                        getattr(cut, kind)[p],
                        getattr(full, kind)[p],
                        atol=1e-5,
                        rtol=1e-5,
                        equal_nan=True,
                        msg=f"{p} {side} {kind}",
                    )


def test_single_token_reduction_without_norms_is_the_same_values():
    from personactl.model.activations import reduce_positions

    torch.manual_seed(0)
    lengths, prompt_lens = [5, 9, 7], [2, 4, 6]
    examples = [EncodedExample(tuple(range(1, n + 1)), p) for n, p in zip(lengths, prompt_lens, strict=True)]
    for side in ("right", "left"):
        batch = collate(examples, pad_id=0, padding_side=side)
        hidden = torch.randn(3, 9, 16).to(torch.bfloat16)
        hidden[~batch.attention_mask] = float("nan")  # pads may hold anything
        positions = ["response_start", "prompt_end"]
        full, norm_sum = reduce_positions(hidden, batch, positions)
        fast, none = reduce_positions(hidden, batch, positions, norms=False)
        assert none is None and norm_sum is not None
        assert fast.dtype == torch.float32 and torch.equal(fast, full)
