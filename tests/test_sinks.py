"""Attention sinks never enter a mean or a norm: plain texts, injected massive activations, bad input."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from test_extraction import POSITIONS, make_pairs, naive_rows

from personactl.errors import InputError
from personactl.model.activations import extract_vectors
from personactl.model.chat_format import encode_raw
from personactl.model.loading import load_model
from personactl.steps.extract import pairs_from_jsonl

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
    from personactl.model.steering import Steerer
    from personactl.steps.extract import build_vector
    from personactl.store.vectors import PersonaVector

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


def test_extract_json_and_show_carry_diagnostics_and_single_token_texts_exit_2(isolated_env, tmp_path, tiny_factory):
    from typer.testing import CliRunner

    from personactl.cli.app import app

    runner = CliRunner()
    model, ws = str(tiny_factory("llama")), tmp_path / "ws"
    write_pairs(tmp_path / "plain.jsonl", TEXTS)
    args = ["extract", "--pairs", str(tmp_path / "plain.jsonl"), "--model", model, "-w", str(ws), "--dtype", "float32"]
    ok = runner.invoke(app, [*args, "--json"], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    diagnostics = doc["diagnostics"]
    assert set(diagnostics["positions"]) == {"response_start", "response_avg"} and diagnostics["n_pairs"] == 4
    assert any("only 4 pairs" in w for w in diagnostics["warnings"]) and "warning: only 4 pairs" in ok.stderr
    for layer in doc["layers"]:
        assert -1 <= layer["consistency"] <= 1 and 0 <= layer["anti_steerable"] <= 1
        assert 0 < layer["top_dim_share"] <= 1 and isinstance(layer["top_dim"], int)
    shown = runner.invoke(app, ["show", doc["artifact"]], catch_exceptions=False)
    assert shown.exit_code == 0 and "diagnostics (response_avg" in shown.stdout and "only 4 pairs" in shown.stdout
    write_pairs(tmp_path / "short.jsonl", [("the quick fox", "a lazy dog"), ("x", "the lazy dog")])
    bad = runner.invoke(app, [*args[:2], str(tmp_path / "short.jsonl"), *args[3:]], catch_exceptions=False)
    assert bad.exit_code == 2 and "short.jsonl:2: a text is a single token" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) <= 2  # the line and its hint


@pytest.mark.parametrize("n_pairs", [12, 40])  # fewer pairs than hidden units (32): all kept; more: a sample
def test_diagnostics_equal_a_naive_per_pair_computation(tiny, n_pairs):
    from test_extraction import naive_sinks, naive_span_mean

    from personactl.core.diagnostics import sample_slots

    pairs = make_pairs(tiny.tokenizer, n_pairs, seed=7)
    result = extract_vectors(
        tiny.model, tiny.layers, pairs, pad_id=tiny.tokenizer.pad_token_id, positions=["response_avg"], pca=False
    )
    diffs = []
    for pair in pairs:
        means = []
        for ex in (pair.pos, pair.neg):
            rows = torch.stack(naive_rows(tiny.model, tiny.layers, ex)).double()
            means.append(naive_span_mean(rows, naive_sinks(rows), ex.prompt_len, len(ex.input_ids)))
        diffs.append(means[0] - means[1])
    d = torch.stack(diffs, 1)  # [L+1, N, H]
    m = d.mean(1)
    cos = torch.nn.functional.cosine_similarity(d, m[:, None], dim=-1).mean(1)
    kept = (sample_slots(n_pairs, 31) >= 0).nonzero().squeeze(1)
    assert len(kept) == min(n_pairs, 31)
    anti = ((d[:, kept] * m[:, None]).sum(-1) < 0).double().mean(1)
    share = m.abs().max(-1).values / m.norm(dim=-1)
    stats = result.diagnostics["positions"]["response_avg"]
    assert result.diagnostics["anti_steerable_pairs"] == len(kept)
    torch.testing.assert_close(torch.tensor(stats["consistency"], dtype=torch.double), cos, atol=2e-4, rtol=0)
    assert stats["anti_steerable"] == [round(float(x), 4) for x in anti]
    torch.testing.assert_close(torch.tensor(stats["top_dim_share"], dtype=torch.double), share, atol=2e-4, rtol=0)
    assert stats["top_dim"] == m.abs().argmax(-1).tolist()
    assert 0 < float(anti.max()) and float(cos.min()) < 0.9  # random model: the checks above are not vacuous


def test_warnings_name_dominant_dimensions_small_n_and_dtype_resolution():
    from personactl.core.diagnostics import warnings_for

    stats = {
        "consistency": [0.9, 0.9, 0.9],
        "anti_steerable": [0.0, 0.0, 0.0],
        "top_dim": [7, 507, 507],
        "top_dim_share": [0.2, 0.97, 0.8],
        "relative_size": [0.003, 0.2, 0.2],
    }
    diagnostics = {"rows": [1, 2, 3], "n_pairs": 8, "positions": {"prompt_end": stats}}
    bf16 = warnings_for(diagnostics, torch.bfloat16)
    assert any("only 8 pairs" in w for w in bf16)
    assert any(w.startswith("prompt_end: dimension 507") and "layers 2-3" in w for w in bf16)
    assert any("layers 1 " in w and "--dtype float32" in w for w in bf16)
    fp32 = warnings_for({**diagnostics, "n_pairs": 200}, torch.float32)
    assert len(fp32) == 1 and "dimension 507" in fp32[0]  # fp32 resolves 0.3 % easily; 200 pairs are enough
