"""vLLM backend benchmarks: steered vs unsteered, per-request steering (P10), compiled tables vs
eager hooks, vLLM vs HF.

`bench_vllm(results)` returns (name, goal, value) rows for bench/run.py's table and stores raw
timings in `results["vllm"]`; `python bench/vllm_bench.py` runs it alone. Every comparison is
64 prompts × 64 new tokens in bf16 with a fixed length (min = max tokens, end-of-turn ignored), so
both sides do identical work. Two engines are timed alternately (medians after a warm-up), both
alive, so machine drift hits both; HF is timed with no engine alive (its processes would take CPU
from the HF side on a small machine), once before the engines start and once after they stop.
It also reports how often greedy bf16 outputs agree (vLLM vs HF, and HF batched vs HF one prompt
at a time: the bf16 noise floor).

P12 (issue 22): the same prompts under a steering plan of three terms (add at layers 10-14, an
ablation at 15, a cap at 16) against unsteered vLLM. The steering engine has the default two
projection slots per layer, so every steered row above pays for them.

P10 (issue 21): the same prompts, each with its own (layer, α), as one engine call (per-request
steering) against unsteered vLLM and against one batch per configuration (how sweeps ran before).
A small check of the code paths: `BENCH_REPEATS=1 BENCH_VLLM_PROMPTS=8 python bench/vllm_bench.py`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from plan_bench import three_term_plan
from timing import median_seconds, paired_median_seconds

N_PROMPTS = int(os.environ.get("BENCH_VLLM_PROMPTS", "64"))
NEW_TOKENS = 64
LAYER = 15
AGREE_PROMPTS, AGREE_TOKENS = 16, 32


def bench_prompts(tokenizer, n: int) -> list[list[int]]:
    from personactl.model.chat_format import chat_messages, encode_prompt
    from personactl.store.traits import load_trait

    questions = []
    for name in ("optimistic", "evil", "humorous"):
        trait = load_trait(name)
        questions += trait.questions.extraction + trait.questions.evaluation
    return [encode_prompt(tokenizer, chat_messages(None, questions[i % len(questions)])) for i in range(n)]


def fixed_length_run(backend, prompts, configs=None, new_tokens: int = NEW_TOKENS, reset: bool = True):
    """One batched call generating exactly `new_tokens` per prompt, request `i` steered by
    `configs[i]` (a `SteeringConfig`; None, or no `configs`: as `backend.steering(...)` says, else
    unsteered), with its key and salt as the backend sends them."""
    from vllm import SamplingParams

    from personactl.backends.vllm_plugin import KEY

    configs = list(configs) if configs is not None else [backend._active] * len(prompts)
    params = [
        SamplingParams(
            max_tokens=new_tokens,
            min_tokens=new_tokens,
            ignore_eos=True,
            temperature=0.0,
            extra_args={KEY: c.key} if c is not None else None,
        )
        for c in configs
    ]
    requests = [backend._request(p, c) for p, c in zip(prompts, configs, strict=True)]

    def run():
        if reset:
            backend.llm.reset_prefix_cache()  # no run reuses another's prompt states
        with backend._using(configs):
            outputs = backend.llm.generate(requests, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)

    return run


def own_configurations(backend, vector, n: int) -> list:
    """`n` distinct steering configurations, one (layer, α) each: layers 5.., α in 0.25 steps."""
    from personactl.backends.vllm_configs import SteeringConfig

    layers = max(1, min(16, backend.num_layers - 5))
    return [SteeringConfig.of(backend.deltas({5 + i % layers: vector}, 0.25 * (1 + i // layers))) for i in range(n)]


def per_configuration_batches(backend, prompts, configs):
    """One `llm.generate` call per configuration, each with that configuration's prompts (the
    sweep before per-request steering: the engine held one configuration at a time)."""
    groups: dict[str | None, tuple[list, list]] = {}
    for prompt, config in zip(prompts, configs, strict=True):
        same_prompts, same_configs = groups.setdefault(config.key if config is not None else None, ([], []))
        same_prompts.append(prompt)
        same_configs.append(config)
    runs = [fixed_length_run(backend, ps, cs, reset=False) for ps, cs in groups.values()]

    def run():
        backend.llm.reset_prefix_cache()
        for one in runs:
            one()

    return run


def bench_per_request(stock, steer, prompts, vector, seconds: dict) -> None:
    """P10: every prompt its own (layer, α), one engine call, against unsteered vLLM (the stock
    engine) and against one batch per configuration; per-configuration is timed fewer times (it
    is the slow side by design)."""
    from timing import REPEATS, interleaved_median_seconds, median_seconds

    configs = own_configurations(steer, vector, len(prompts))
    assert len({c.key for c in configs}) == len(prompts)
    seconds["compiled_stock_p10"], seconds["compiled_own_configuration_each"] = interleaved_median_seconds(
        fixed_length_run(stock, prompts), fixed_length_run(steer, prompts, configs)
    )
    seconds["compiled_one_batch_per_configuration"] = median_seconds(
        per_configuration_batches(steer, prompts, configs), repeats=max(1, REPEATS // 3), warmup=False
    )


def timed_open(**kwargs):
    from personactl.backends.vllm import open_vllm

    start = time.perf_counter()
    backend = open_vllm("smollm2-135m", **kwargs)
    return backend, time.perf_counter() - start


def greedy_tokens(generate, prompts) -> list[list[int]]:
    from personactl.backends import Sampling

    return [g.token_ids for g in generate(prompts, Sampling(AGREE_TOKENS, 0.0), 0)]


def identical_share(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def bench_vllm(results: dict) -> list[tuple]:
    import torch

    from personactl.backends.hf import HFBackend, contiguous_lm_head_input
    from personactl.model.loading import load_model

    lm = load_model("smollm2-135m", log=lambda m: None)  # bf16
    prompts = bench_prompts(lm.tokenizer, N_PROMPTS)
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm() * 4.0
    tokens = N_PROMPTS * NEW_TOKENS
    seconds: dict[str, float] = {}

    ids = torch.full((N_PROMPTS, max(map(len, prompts))), lm.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as the HF backend does
        ids[i, ids.shape[1] - len(p) :], mask[i, ids.shape[1] - len(p) :] = torch.tensor(p), 1

    def hf_run():
        with torch.inference_mode(), contiguous_lm_head_input(lm.model):
            lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id,
            )

    hf_run()  # warm-up
    hf_times = [median_seconds(hf_run, warmup=False)]
    agree = prompts[:AGREE_PROMPTS]
    hf_backend = HFBackend(lm.model, lm.tokenizer)
    hf_batched = greedy_tokens(hf_backend.generate, agree)
    hf_single = [greedy_tokens(hf_backend.generate, [p])[0] for p in agree]

    stock, seconds["start_compiled_stock"] = timed_open(steering=False)
    steer, seconds["start_compiled_steering"] = timed_open(steering=True)
    try:
        plain_run = fixed_length_run(stock, prompts)
        with steer.steering({LAYER: vector}, 1.0):
            seconds["compiled_stock"], seconds["compiled_steered"] = paired_median_seconds(
                plain_run, fixed_length_run(steer, prompts)
            )
        seconds["compiled_steering_alpha0"] = paired_median_seconds(fixed_length_run(steer, prompts), plain_run)[0]
        with steer.steering({}, plan=three_term_plan(lm)):  # P12 (issue 22)
            seconds["compiled_stock_p12"], seconds["compiled_plan_3_terms"] = paired_median_seconds(
                plain_run, fixed_length_run(steer, prompts)
            )
        bench_per_request(stock, steer, prompts, vector, seconds)
        vllm_stock = greedy_tokens(stock.generate, agree)
        vllm_steering_engine = greedy_tokens(steer.generate, agree)
    finally:
        stock.close()

    eager, seconds["start_eager"] = timed_open(steering=True, enforce_eager=True)
    try:
        with steer.steering({LAYER: vector}, 1.0), eager.steering({LAYER: vector}, 1.0):
            seconds["compiled_steered_vs_eager"], seconds["eager_steered"] = paired_median_seconds(
                fixed_length_run(steer, prompts), fixed_length_run(eager, prompts)
            )
        vllm_eager = greedy_tokens(eager.generate, agree)
    finally:
        eager.close()
        steer.close()
    hf_times.append(median_seconds(hf_run, warmup=False))
    seconds["hf"] = statistics.median(hf_times)

    agreement = {
        "vllm_compiled_vs_hf_batched": identical_share(vllm_stock, hf_batched),
        "vllm_eager_vs_hf_batched": identical_share(vllm_eager, hf_batched),
        "vllm_compiled_steering_engine_alpha0_vs_compiled_stock": identical_share(vllm_steering_engine, vllm_stock),
        "hf_batched_vs_hf_one_prompt_at_a_time": identical_share(hf_batched, hf_single),
    }
    tps = {k: tokens / v for k, v in seconds.items() if not k.startswith("start_")}
    results["vllm"] = {
        "prompts": N_PROMPTS,
        "new_tokens": NEW_TOKENS,
        "dtype": "bfloat16",
        "seconds": seconds,
        "tokens_per_second": tps,
        "greedy_agreement_bf16": {"prompts": AGREE_PROMPTS, "tokens": AGREE_TOKENS, **agreement},
    }
    return [
        (
            "vLLM steered, one configuration, vs unsteered, compiled, 64×64 (tok/s)",
            0.95,
            tps["compiled_steered"] / tps["compiled_stock"],
        ),
        (
            "P10 vLLM, each prompt its own (layer, α), one call, vs unsteered",
            0.85,
            tps["compiled_own_configuration_each"] / tps["compiled_stock_p10"],
        ),
        (
            "P10 vLLM, each prompt its own (layer, α), one call, vs a batch per configuration",
            5.0,
            tps["compiled_own_configuration_each"] / tps["compiled_one_batch_per_configuration"],
        ),
        (
            "P12 vLLM under a 3-term plan (add 10-14, ablate, cap) vs unsteered, compiled",
            0.9,
            tps["compiled_plan_3_terms"] / tps["compiled_stock_p12"],
        ),
        (
            "vLLM compiled buffers vs eager hooks, steered (tok/s)",
            1.0,
            tps["compiled_steered_vs_eager"] / tps["eager_steered"],
        ),
        ("vLLM (compiled) vs HF generate, 64×64 bf16 (tok/s)", 1.0, tps["compiled_stock"] / tps["hf"]),
    ]


def main() -> None:
    results: dict = {}
    rows = bench_vllm(results)
    print(f"\n{'benchmark':66} {'goal':>6} {'measured':>9}  met")
    for name, goal, value in rows:
        print(f"{name:66} {'≥' + format(goal, 'g'):>6} {value:9.2f}  {'yes' if value >= goal else 'NO'}")
    print(json.dumps(results["vllm"], indent=2))
    out = Path(__file__).parent / "results" / "vllm.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nraw timings: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
