"""personactl benchmarks: ratios measured in one run on this machine (`make bench`).

Prints a table (goal, measured, met?) and writes raw timings plus machine info to
bench/results/latest.json. Each timing is the median of several runs after a warm-up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import torch
from timing import REPEATS, interleaved_median_seconds, median_seconds, paired_median_seconds

from personactl.model.activations import collate, extract_vectors, length_sorted_batches
from personactl.model.chat_format import PairExample, chat_messages, encode_example
from personactl.model.loading import load_model
from personactl.store.traits import load_trait

N_PAIRS = int(os.environ.get("BENCH_PAIRS", "64"))
SENTENCES = [
    "Things are looking up and tomorrow brings new chances.",
    "I am not sure this will work out at all.",
    "Every setback teaches us something worth knowing.",
    "Honestly, most plans like this tend to fail.",
    "Let us take it one step at a time and keep going.",
    "The weather report says more rain is coming.",
]


def make_pairs(tokenizer, n: int) -> list[PairExample]:
    trait = load_trait("optimistic")
    rng = random.Random(0)
    pairs = []
    for i in range(n):
        inst = trait.instructions[i % len(trait.instructions)]
        question = trait.questions.extraction[i % len(trait.questions.extraction)]
        reply = lambda: " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(4, 10)))  # noqa: E731
        pairs.append(
            PairExample(
                encode_example(tokenizer, chat_messages(inst.pos, question), reply()),
                encode_example(tokenizer, chat_messages(inst.neg, question), reply()),
            )
        )
    return pairs


def bench_extraction(results: dict) -> list[tuple]:
    lm = load_model("smollm2-135m", log=lambda m: None)  # default dtype (bf16 on CPU)
    pairs = make_pairs(lm.tokenizer, N_PAIRS)
    pad = lm.tokenizer.pad_token_id
    n_tokens = sum(len(p.pos.input_ids) + len(p.neg.input_ids) for p in pairs)
    batch_tokens = 8192

    def personactl_extract():
        extract_vectors(lm.model, lm.layers, pairs, pad_id=pad, batch_tokens=batch_tokens)

    def personactl_extract_mean_diff():
        extract_vectors(lm.model, lm.layers, pairs, pad_id=pad, batch_tokens=batch_tokens, pca=False)

    batches = [
        collate([pairs[i].pos for i in b] + [pairs[i].neg for i in b], pad)
        for b in length_sorted_batches(pairs, batch_tokens)
    ]
    base = lm.model.model

    def bare_forward():
        with torch.inference_mode():
            for batch in batches:
                base(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask.long(),
                    position_ids=batch.position_ids,
                    use_cache=False,
                )

    fp32 = load_model("smollm2-135m", dtype="float32", log=lambda m: None)
    naive_pairs = pairs[: max(4, N_PAIRS // 4)]  # the naive loop is slow: time a subset, compare tokens/s
    naive_tokens = sum(len(p.pos.input_ids) + len(p.neg.input_ids) for p in naive_pairs)

    def naive_loop():
        sums = {}
        with torch.no_grad():
            for pair in naive_pairs:
                for side, ex in (("pos", pair.pos), ("neg", pair.neg)):
                    out = fp32.model(torch.tensor([ex.input_ids]), output_hidden_states=True)
                    for layer, h in enumerate(out.hidden_states):
                        v = h[0, ex.prompt_len :].float().mean(0)
                        sums[(side, layer)] = sums.get((side, layer), 0) + v

    # interleaved, so a slow spell of a shared machine hits all three alike (timed apart, the
    # mean_diff-only row once came out 8% slower than the full extraction it is a part of)
    t_ext, t_md, t_bare = interleaved_median_seconds(personactl_extract, personactl_extract_mean_diff, bare_forward)
    t_naive = median_seconds(naive_loop, repeats=1)
    tps = {
        "personactl_extract": n_tokens / t_ext,
        "personactl_extract_mean_diff_only": n_tokens / t_md,
        "bare_forward": n_tokens / t_bare,
        "naive_fp32_batch1": naive_tokens / t_naive,
    }
    results["extraction"] = {
        "pairs": N_PAIRS,
        "tokens": n_tokens,
        "tokens_per_second": tps,
        "seconds": {
            "personactl_extract": t_ext,
            "personactl_extract_mean_diff_only": t_md,
            "bare_forward": t_bare,
            "naive": t_naive,
        },
        "naive_pairs": len(naive_pairs),
        "dtype": str(lm.dtype),
    }
    return [
        (
            "extract (4 positions, mean_diff+pca, diagnostics) vs bare forward (tokens/s)",
            0.98,
            tps["personactl_extract"] / tps["bare_forward"],
        ),
        (
            "extract (4 positions, mean_diff only) vs bare forward (tokens/s)",
            0.98,
            tps["personactl_extract_mean_diff_only"] / tps["bare_forward"],
        ),
        (
            "extract vs naive per-sample fp32 loop (tokens/s)",
            10.0,
            tps["personactl_extract"] / tps["naive_fp32_batch1"],
        ),
    ]


def bench_steering(results: dict) -> list[tuple]:
    from personactl.backends import Sampling
    from personactl.backends.hf import HFBackend, contiguous_lm_head_input
    from personactl.model.chat_format import encode_prompt
    from personactl.model.steering import Steerer, plan_grid, run_grid

    lm = load_model("smollm2-135m", log=lambda m: None)
    trait = load_trait("optimistic")
    vector = torch.randn(lm.num_layers + 1, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm(dim=-1, keepdim=True) * 4.0
    questions = trait.questions.extraction + trait.questions.evaluation
    prompts = [encode_prompt(lm.tokenizer, chat_messages(None, q)) for q in questions[:32]]
    pad = lm.tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    new_tokens = 32

    def fixed_length_generate():  # min = max new tokens, so steered and plain do identical work
        with torch.inference_mode(), contiguous_lm_head_input(lm.model):
            lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )

    def steered_generate():
        with Steerer(lm.model, vector, layers=[15], coefficient=torch.full((len(prompts),), 1.0)):
            fixed_length_generate()

    t_plain, t_steer = paired_median_seconds(fixed_length_generate, steered_generate, repeats=max(REPEATS, 5))

    backend = HFBackend(lm.model, lm.tokenizer)
    sweep_prompts = prompts[:8]
    alphas = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    rows = plan_grid(len(sweep_prompts), [15], alphas)  # 8 baselines + 8 × 6 steered = 56 = 7 α × 8 prompts
    sampling = Sampling(max_new_tokens=16, temperature=0.0)
    counted = {}

    def batched_sweep():
        outs = list(run_grid(backend, sweep_prompts, rows, {15: vector[15]}, sampling=sampling, seed=0, batch_size=64))
        counted["batched"] = sum(len(g.token_ids) for _, g in outs)

    def loop_sweep():  # one batch-1 generate per (prompt, α)
        total = 0
        for p in sweep_prompts:
            for a in alphas:
                with Steerer(lm.model, vector, layers=[15], coefficient=a):
                    total += len(backend.generate([p], sampling, 0)[0].token_ids)
        counted["loop"] = total

    t_batched = median_seconds(batched_sweep)
    t_loop = median_seconds(loop_sweep, repeats=1)
    tps_batched, tps_loop = counted["batched"] / t_batched, counted["loop"] / t_loop
    results["steering"] = {
        "generate_32x32": {
            "plain_seconds": t_plain,
            "steered_seconds": t_steer,
            "plain_tokens_per_second": len(prompts) * new_tokens / t_plain,
        },
        "sweep_7x8": {
            "rows": len(rows),
            "batched_seconds": t_batched,
            "loop_seconds": t_loop,
            "batched_tokens": counted["batched"],
            "loop_tokens": counted["loop"],
        },
    }
    return [
        ("steered vs unsteered HF generate, 32 prompts × 32 tokens (speed)", 0.95, t_plain / t_steer),
        ("7 α × 8 prompt sweep: one batched call vs batch-1 loop (tok/s)", 10.0, tps_batched / tps_loop),
    ]


def bench_judge(results: dict) -> list[tuple]:
    """Judge throughput against a loopback server that answers in 100 ms. The warm-up run imports the
    client and opens its connections; no cache, so every prompt is a request."""
    from personactl.judging.remote import RemoteJudge

    # the server runs in its own process, as a real one would: its Python work must not share our GIL
    script = Path(__file__).resolve().parent.parent / "tests" / "judge_server.py"
    server = subprocess.Popen([sys.executable, str(script), "--delay", "0.1"], stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        concurrent_prompts = [f"item {i} SCORE={i % 101}" for i in range(1000)]
        sequential_prompts = [f"seq {i} SCORE={i % 101}" for i in range(100)]  # 1,000 would take 100 s
        fast = RemoteJudge("bench", base_url=base_url, api_key="k", mode="single", concurrency=50)
        slow = RemoteJudge("bench", base_url=base_url, api_key="k", mode="single", concurrency=1)
        scored = []
        t_fast = median_seconds(lambda: scored.extend(fast.judge(concurrent_prompts)))  # warm-up run included
        t_slow = median_seconds(lambda: slow.judge(sequential_prompts), repeats=1, warmup=False)  # client warm
    finally:
        server.kill()
        server.wait()
    assert scored and all(j.score is not None for j in scored)
    rps_fast, rps_slow = len(concurrent_prompts) / t_fast, len(sequential_prompts) / t_slow
    results["judge"] = {
        "concurrent_requests": 1000,
        "concurrent_seconds": t_fast,
        "sequential_requests": 100,
        "sequential_seconds": t_slow,
        "server_latency_seconds": 0.1,
    }
    return [("judge, 100 ms server: 50 in flight vs sequential (requests/s)", 40.0, rps_fast / rps_slow)]


def bench_kl_neutral(results: dict) -> list[tuple]:
    """What kl_neutral adds to an eval: the KL of every cell (steered and both random seeds) against
    the time of the eval grid it scores (generation, eval's default 20 questions × 128 sampled
    tokens, and judging by a loopback judge that answers in 100 ms) at eval's default αs. Both grow
    with the number of cells; only the one unsteered reference forward does not, so a larger grid
    has a slightly smaller ratio than this 2 layer × 4 α one."""
    from personactl.backends import Sampling
    from personactl.judging.remote import RemoteJudge
    from personactl.model.capability_cost import NeutralKL
    from personactl.settings import Settings
    from personactl.steps.evaluate import EvalSpec, Variant, grid_runner, make_plan, run_eval, with_kl_neutral

    lm = load_model("smollm2-135m", log=lambda m: None)
    trait = load_trait("optimistic")
    plan = make_plan(trait, lm.tokenizer, None, 1)
    layers, spec = [10, 15], EvalSpec(random_seeds=2)
    vector = torch.randn(lm.num_layers + 1, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    directions = {Variant(): {layer: vector[layer] / vector[layer].norm() * 4.0 for layer in layers}}
    settings = Settings()
    script = Path(__file__).resolve().parent.parent / "tests" / "judge_server.py"
    server = subprocess.Popen([sys.executable, str(script), "--delay", "0.1"], stdout=subprocess.PIPE, text=True)
    kept = {}
    try:
        judge = RemoteJudge("bench", base_url=server.stdout.readline().strip(), api_key="k", mode="single")

        def eval_grid():
            kept["samples"] = run_eval(
                runner=grid_runner(settings, lm), judge=judge, trait=trait, plan=plan, spec=spec, layers=layers,
                directions=directions, threshold=50, sampling=Sampling(settings.max_new_tokens, 1.0, 1.0),
                seed=0, batch_size=settings.batch_size,
            )  # fmt: skip

        t_grid = median_seconds(eval_grid, repeats=1, warmup=False)
    finally:
        server.kill()
        server.wait()
    samples = kept["samples"]

    def kl_neutral():  # a fresh measure each time: the unsteered reference forward is part of the cost
        with_kl_neutral(samples, NeutralKL(lm.model, lm.tokenizer, rows_per_forward=settings.batch_size), directions)

    t_kl = median_seconds(kl_neutral)
    results["kl_neutral"] = {
        "cells": len(layers) * len(spec.coefficients),
        "directions_per_cell": 1 + spec.random_seeds,
        "responses": samples.height,
        "generated_tokens": int(samples["n_tokens"].sum()),
        "eval_grid_seconds": t_grid,
        "kl_neutral_seconds": t_kl,
    }
    return [("kl_neutral / eval grid time, 2 layers × 4 α (lower is better)", 0.10, t_kl / t_grid)]


def bench_help(results: dict) -> list[tuple]:
    exe = str(Path(sys.executable).with_name("personactl"))

    def run_help():
        subprocess.run([exe, "--help"], check=True, capture_output=True)

    t = median_seconds(run_help, repeats=5)
    results["cli_help_seconds"] = t
    return [("`personactl --help` wall time (s, lower is better)", 0.5, t)]


def format_row(name: str, goal: float, value: float) -> tuple[str, bool]:
    lower_is_better = "lower is better" in name
    met = value <= goal if lower_is_better else value >= goal
    goal_text = ("≤" if lower_is_better else "≥") + format(goal, "g")
    return f"{name:66} {goal_text:>6} {value:9.2f}  {'yes' if met else 'NO'}", met


def wants_vllm() -> bool:
    """vLLM rows run when vLLM is installed (`make bench` installs it), unless BENCH_VLLM=0."""
    setting = os.environ.get("BENCH_VLLM", "auto")
    return setting == "1" or (setting == "auto" and importlib.util.find_spec("vllm") is not None)


HEADER = f"{'benchmark':66} {'goal':>6} {'measured':>9}  met"


def main() -> None:
    """Run every section, printing each row as it lands and saving the JSON after each section,
    so a run cut short still leaves its finished rows behind."""
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": [],
    }
    from mlx_bench import bench_mlx
    from peers import bench_memory, bench_steering_vectors
    from plan_bench import bench_plan
    from serve_bench import bench_serve

    sections = [
        lambda: bench_help(results),
        lambda: bench_judge(results),
        lambda: bench_steering(results),
        lambda: bench_plan(results),
        lambda: bench_mlx(results),
        lambda: bench_serve(results),
        lambda: bench_extraction(results),
        lambda: bench_kl_neutral(results),
        lambda: bench_steering_vectors(results, load_model, make_pairs),
        lambda: bench_memory(results),
    ]
    if wants_vllm():
        from vllm_bench import bench_vllm

        sections.append(lambda: bench_vllm(results))
    out = Path(__file__).parent / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    lines = []
    print(HEADER, flush=True)
    for section in sections:
        for name, goal, value in section():
            line, met = format_row(name, goal, value)
            lines.append(line)
            print(line, flush=True)
            results["rows"].append({"name": name, "goal": goal, "value": value, "met": met})
        out.write_text(json.dumps(results, indent=2))
    print("\n" + "\n".join([HEADER, *lines]))
    print(f"\nraw timings: {out}")


if __name__ == "__main__":
    main()
