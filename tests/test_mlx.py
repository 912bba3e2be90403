"""The MLX engine on MLX's Linux CPU build: the same tokens, steering, plans and readings as the
Hugging Face engine in float32 (MLX's kernels are not torch's, so logits agree to ~1e-4, not bit for
bit; tokens and readings are compared where that is exact enough), and exact invariants of its own
(α = 0 is unsteered, a batched sweep is its rows one by one, a mixed batch is its rows alone)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("mlx.core", reason="MLX cannot be installed here: pip install 'personactl[mlx]'")
pytest.importorskip("mlx_lm", reason="mlx-lm cannot be installed here: pip install 'personactl[mlx]'")

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402

from personactl.backends import Sampling, Steering, engine_for, open_model  # noqa: E402
from personactl.backends.hf_rows import RowRequest  # noqa: E402
from personactl.model.chat_format import chat_messages, encode_example, encode_prompt  # noqa: E402
from personactl.model.example_activations import read_examples  # noqa: E402
from personactl.model.steering import GridRow, Steerer  # noqa: E402
from personactl.model.steering_ops import AddTerm, ablate_term, cap_term  # noqa: E402
from personactl.settings import Settings  # noqa: E402
from tests.test_cli import generate_small, invoke  # noqa: E402

GREEDY = Sampling(max_new_tokens=16, temperature=0.0)
QUESTIONS = ["Tell me about your day.", "What is 2+2?", "Describe the sea in one short line, please."]


def load_pair(model: str) -> tuple:
    """(Hugging Face LoadedModel, MLX engine) of `model`, both float32 on the CPU."""
    return tuple(open_model(Settings(backend=b, model=model, dtype="float32", device="cpu")) for b in ("hf", "mlx"))


@pytest.fixture(scope="module")
def smol():
    return load_pair("smollm2-135m")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_pair(str(tiny_llama))


def prompts_for(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, chat_messages(None, q)) for q in QUESTIONS]


def last_logits_hf(lm, prompt, steerer=None) -> np.ndarray:
    with torch.inference_mode(), steerer or _null():
        return lm.model(torch.tensor([prompt])).logits[0, -1].float().numpy()


def last_logits_mlx(engine, prompt, steerer=None) -> np.ndarray:
    cache = [BatchKVCache([0]) for _ in engine.layers]
    if steerer is None:
        return np.array(engine.net(mx.array([prompt]), cache=cache)[0, -1].astype(mx.float32))
    with steerer:
        steerer.at(0, 1)
        return np.array(engine.net(mx.array([prompt]), cache=cache)[0, -1].astype(mx.float32))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.slow
def test_facts_and_fingerprint_match_the_hf_engine(smol):
    hf, mlx = smol
    assert (mlx.num_layers, mlx.hidden_size, mlx.fingerprint) == (hf.num_layers, hf.hidden_size, hf.fingerprint)
    assert mlx.stop_ids == engine_for(hf).stop_ids
    assert mlx.describe()["backend"] == "mlx"


@pytest.mark.slow
def test_greedy_generation_equals_hf_token_for_token(smol):
    """Three prompts of different lengths in one left-padded batch: the padding is masked and each
    row's positions start at its own first token (mlx-lm's θ from `rope_parameters` included)."""
    hf, mlx = smol
    prompts = prompts_for(hf.tokenizer)
    assert len({len(p) for p in prompts}) == 3
    ours = mlx.generate(prompts, GREEDY, seed=0)
    theirs = engine_for(hf).generate(prompts, GREEDY, seed=0)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    assert all(len(g.token_ids) > 5 for g in ours)


def test_alpha_zero_is_unsteered_and_a_batched_sweep_is_its_rows_one_by_one(tiny):
    _, mlx = tiny
    prompts = prompts_for(mlx.tokenizer)[:2]
    torch.manual_seed(0)
    directions = {2: torch.randn(mlx.hidden_size) * 4, 3: torch.randn(mlx.hidden_size) * 4}
    rows = [GridRow(p, layer, alpha) for p in range(2) for layer, alpha in ((2, 0.0), (2, 3.0), (3, -2.0), (None, 0.0))]
    batched = list(mlx.run_grid(prompts, rows, directions, sampling=GREEDY, seed=0, batch_size=len(rows)))
    alone = [
        next(iter(mlx.run_grid(prompts, [row], directions, sampling=GREEDY, seed=0, batch_size=1))) for row in rows
    ]
    unsteered = mlx.generate(prompts, GREEDY, seed=0)
    assert [g.token_ids for _, g in batched] == [g.token_ids for _, g in alone]
    for row, generation in batched:
        if row.coefficient == 0.0:
            assert generation.token_ids == unsteered[row.prompt_index].token_ids
    assert any(g.token_ids != unsteered[r.prompt_index].token_ids for r, g in batched if r.coefficient != 0)


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steering_at_a_layer_equals_hf_steering_there(smol, positions):
    hf, mlx = smol
    prompt = prompts_for(hf.tokenizer)[0]
    direction = torch.randn(hf.hidden_size, generator=torch.Generator().manual_seed(1)) * 2
    options = {"coefficient": 3.0, "positions": positions}
    theirs = last_logits_hf(hf, prompt, Steerer(hf.model, {10: direction}, **options))
    ours = last_logits_mlx(mlx, prompt, mlx.steerer({10: direction}, **options))
    unsteered = last_logits_hf(hf, prompt)
    assert np.abs(theirs - unsteered).max() > 1.0  # the steering shows
    assert np.abs(ours - theirs).max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("op", ["add-group", "ablate", "ablate-c", "cap"])
def test_every_plan_operation_equals_hf(smol, op):
    hf, mlx = smol
    prompt = prompts_for(hf.tokenizer)[1]
    g = torch.Generator().manual_seed(2)
    v = torch.randn(hf.hidden_size, generator=g)
    plan = {
        "add-group": {k: [AddTerm(1.5 * v)] for k in (8, 9, 10)},
        "ablate": {12: [ablate_term(v)]},
        "ablate-c": {12: [ablate_term(v, 5.0)]},
        "cap": {12: [cap_term(v, -0.5)], 14: [AddTerm(2.0 * v), cap_term(v, 0.0)]},
    }[op]
    theirs = last_logits_hf(hf, prompt, Steerer(hf.model, {}, coefficient=0.0, plan=plan))
    ours = last_logits_mlx(mlx, prompt, mlx.steerer({}, coefficient=0.0, plan=plan))
    assert np.abs(theirs - last_logits_hf(hf, prompt)).max() > 0.05
    assert np.abs(ours - theirs).max() < 1e-3


@pytest.mark.slow
def test_a_steered_sweep_gives_the_hf_engines_tokens(smol):
    hf, mlx = smol
    prompts = prompts_for(hf.tokenizer)[:2]
    vector = torch.randn(hf.hidden_size, generator=torch.Generator().manual_seed(3))
    directions = {12: vector * 4}
    rows = [GridRow(p, 12, alpha) for p in range(2) for alpha in (-2.0, 2.0)]
    sampling = Sampling(max_new_tokens=10, temperature=0.0)
    ours = [g.token_ids for _, g in mlx.run_grid(prompts, rows, directions, sampling=sampling, seed=0)]
    theirs = [
        g.token_ids
        for _, g in engine_for(hf).run_grid(prompts, rows, directions, sampling=sampling, seed=0, batch_size=len(rows))
    ]
    assert ours == theirs


def test_mixed_rows_each_equal_the_row_alone_and_stop_ends_a_row(tiny):
    _, mlx = tiny
    prompts = prompts_for(mlx.tokenizer)
    steering = Steering({2: torch.randn(mlx.hidden_size, generator=torch.Generator().manual_seed(4))}, 3.0, "response")
    sampled = Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9)

    def rows():
        return [
            RowRequest(prompts[0], GREEDY, 0, lambda t: None),
            RowRequest(prompts[1], sampled, 7, lambda t: None, steering=steering),
            RowRequest(prompts[2], Sampling(max_new_tokens=3, temperature=0.0), 0, lambda t: None),
        ]

    together = mlx.stream_batch(rows())
    alone = [mlx.stream_batch([row])[0] for row in rows()]
    assert together == alone
    assert len(together[2]) == 3
    assert mlx.stream_batch(rows()) == together  # the sampled row is reproducible from its seed
    stop = threading.Event()
    seen: list[int] = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == 2:
            stop.set()

    tokens = mlx.stream(prompts[0], GREEDY, 0, on_token, stop)
    assert tokens == seen and len(tokens) == 2


@pytest.mark.slow
def test_readings_equal_the_hf_readings(smol):
    """What extraction, monitor, readouts and conditions read: every row, every position, close to
    the torch model's hooks (right padding, batches of different lengths)."""
    hf, mlx = smol
    examples = [
        encode_example(hf.tokenizer, chat_messages(None, q), answer)
        for q, answer in zip(QUESTIONS, ["A calm one, thanks.", "Four.", "Grey, wide and restless."], strict=True)
    ]
    rows = [0, 1, 15, 30]
    theirs = read_examples(hf.model, hf.layers, examples, pad_id=hf.tokenizer.pad_token_id, rows=rows)
    ours = read_examples(mlx.model, mlx.layers, examples, pad_id=mlx.tokenizer.pad_token_id, rows=rows)
    cosine = torch.nn.functional.cosine_similarity(ours.values.flatten(0, 1), theirs.values.flatten(0, 1), dim=-1)
    assert float(cosine.min()) >= 0.9999
    relative = (ours.values - theirs.values).norm(dim=-1) / theirs.values.norm(dim=-1)
    assert float(relative.max()) < 1e-3


def test_extract_and_steer_through_the_cli_match_hf(isolated_env, tmp_path, tiny_llama):
    """`extract --backend mlx` writes the HF engine's vectors (cosine ≥ 0.9999 per row) and a file
    from either engine steers on the other."""
    from safetensors.torch import load_file

    model = str(tiny_llama)
    ws = tmp_path / "ws"
    assert generate_small(ws, model).exit_code == 0
    common = ["--trait", "optimistic", "--model", model, "-w", ws, "--dtype", "float32", "--json"]
    hf_run = invoke("extract", *common)
    assert hf_run.exit_code == 0, hf_run.output
    hf_file = json.loads(hf_run.stdout)["artifact"]
    hf_vectors = load_file(hf_file)
    mlx_run = invoke("extract", *common, "--backend", "mlx", "--force")
    assert mlx_run.exit_code == 0, mlx_run.output
    mlx_vectors = load_file(json.loads(mlx_run.stdout)["artifact"])
    compared = 0
    for name, theirs in hf_vectors.items():
        if name.startswith("mean_diff") and theirs.dim() == 2:
            cosine = torch.nn.functional.cosine_similarity(mlx_vectors[name][1:], theirs[1:], dim=-1)
            assert float(cosine.min()) >= 0.9999, name
            compared += 1
    assert compared
    steer = ["steer", "--vector", "optimistic", "--prompt", "hello world", "--layers", "2", "--coefficients=-2,0,2"]
    outputs = {}
    for backend in ("hf", "mlx"):
        run = invoke(
            *steer,
            "--model",
            model,
            "-w",
            ws,
            "--dtype",
            "float32",
            "--max-new-tokens",
            "5",
            "--json",
            "--backend",
            backend,
        )
        assert run.exit_code == 0, run.output
        outputs[backend] = [json.loads(line)["text"] for line in run.stdout.splitlines()]
    assert outputs["mlx"] == outputs["hf"]


def test_what_mlx_lm_cannot_load_is_refused_naming_the_hf_engine(isolated_env, tmp_path, tiny_factory):
    from personactl.model.loading import builtin_gguf_path

    for model in (str(builtin_gguf_path("smollm2-135m")), str(tiny_factory("opt"))):
        run = invoke(
            "generate",
            "--trait",
            "optimistic",
            "--questions",
            "1",
            "--model",
            model,
            "--backend",
            "mlx",
            "-w",
            tmp_path / "ws",
        )
        assert run.exit_code == 2, run.output
        assert "--backend hf" in run.output


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma"])
def test_each_architecture_generates_steers_and_reads_as_the_hf_engine(tiny_factory, arch):
    """Every architecture both engines load, in float32: greedy tokens of a left-padded batch, a
    sweep with a plan in each position mode (prefill and decode steps), and readings. Qwen2's mlx-lm
    model walks a fresh slice of its blocks at each call: steering and reading its exposed `layers`
    would silently change nothing."""
    from personactl.core.choices import POSITION_MODES
    from personactl.model.steering_ops import ablate_term

    hf, mlx = load_pair(str(tiny_factory(arch)))
    prompts, engine = prompts_for(hf.tokenizer), engine_for(hf)
    unsteered = [g.token_ids for g in engine.generate(prompts, GREEDY, seed=0)]
    assert [g.token_ids for g in mlx.generate(prompts, GREEDY, seed=0)] == unsteered
    g = torch.Generator().manual_seed(5)
    directions = {2: torch.randn(hf.hidden_size, generator=g) * 8}
    plan = {1: [ablate_term(torch.randn(hf.hidden_size, generator=g))]}
    rows = [GridRow(p, 2, alpha, planned=True) for p in range(len(prompts)) for alpha in (-4.0, 4.0)]
    for positions in POSITION_MODES:
        options = dict(sampling=GREEDY, seed=0, batch_size=len(rows), positions=positions, plan=plan)
        ours = [g.token_ids for _, g in mlx.run_grid(prompts, rows, directions, **options)]
        assert ours == [g.token_ids for _, g in engine.run_grid(prompts, rows, directions, **options)], positions
        assert ours != [unsteered[r.prompt_index] for r in rows]
    examples = [encode_example(hf.tokenizer, chat_messages(None, q), "A short answer.") for q in QUESTIONS]
    ours = read_examples(mlx.model, mlx.layers, examples, pad_id=hf.tokenizer.pad_token_id, rows=[0, 1, 3])
    theirs = read_examples(hf.model, hf.layers, examples, pad_id=hf.tokenizer.pad_token_id, rows=[0, 1, 3])
    assert float((ours.values - theirs.values).abs().max()) < 1e-4 * float(theirs.values.abs().max())


def test_a_model_whose_padded_batches_mlx_lm_gets_wrong_is_refused(tiny_factory):
    """mlx-lm's Gemma 2 applies a batch's padding mask per KV head, not per row: refused at load
    (exit 2 through the CLI), not left to give another row's tokens."""
    from personactl.errors import InputError

    with pytest.raises(InputError) as refused:
        open_model(Settings(backend="mlx", model=str(tiny_factory("gemma2")), dtype="float32", device="cpu"))
    assert "--backend hf" in (refused.value.hint or "")


def test_a_quantized_model_computes_in_its_float_dtype(tiny_llama):
    """A 4-bit model's first parameters are packed uint32 weights; its stream is in its float dtype."""
    import mlx.nn as nn

    from personactl.backends.mlx_model import load_mlx_net, net_dtype

    net = load_mlx_net(tiny_llama, "float32", trust_remote_code=False)
    nn.quantize(net, group_size=32, bits=4)
    assert net_dtype(net) == torch.float32
