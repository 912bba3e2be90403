"""personactl benchmarks: ratios measured in one run on this machine (`make bench`).

Prints a table (goal, measured, met?) and writes raw timings plus machine info to
bench/results/latest.json. Each timing is the median of several runs after a warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from personactl.activations import collate, extract_vectors, length_sorted_batches
from personactl.chat_format import PairExample, chat_messages, encode_example
from personactl.models import load_model
from personactl.traits import load_trait

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
N_PAIRS = int(os.environ.get("BENCH_PAIRS", "64"))
SENTENCES = [
    "Things are looking up and tomorrow brings new chances.",
    "I am not sure this will work out at all.",
    "Every setback teaches us something worth knowing.",
    "Honestly, most plans like this tend to fail.",
    "Let us take it one step at a time and keep going.",
    "The weather report says more rain is coming.",
]


def median_seconds(fn, repeats=REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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

    t_ext = median_seconds(personactl_extract)
    t_md = median_seconds(personactl_extract_mean_diff)
    t_bare = median_seconds(bare_forward)
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
            "extract (4 positions, mean_diff+pca) vs bare forward (tokens/s)",
            0.9,
            tps["personactl_extract"] / tps["bare_forward"],
        ),
        (
            "extract (4 positions, mean_diff only) vs bare forward (tokens/s)",
            0.9,
            tps["personactl_extract_mean_diff_only"] / tps["bare_forward"],
        ),
        (
            "extract vs naive per-sample fp32 loop (tokens/s)",
            10.0,
            tps["personactl_extract"] / tps["naive_fp32_batch1"],
        ),
    ]


def bench_help(results: dict) -> list[tuple]:
    exe = str(Path(sys.executable).with_name("personactl"))

    def run_help():
        subprocess.run([exe, "--help"], check=True, capture_output=True)

    t = median_seconds(run_help, repeats=5)
    results["cli_help_seconds"] = t
    return [("`personactl --help` wall time (s, lower is better)", 0.5, t)]


def main() -> None:
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    }
    rows = bench_help(results) + bench_extraction(results)
    print(f"\n{'benchmark':66} {'goal':>6} {'measured':>9}  met")
    for name, goal, value in rows:
        lower_is_better = "lower is better" in name
        met = value <= goal if lower_is_better else value >= goal
        goal_text = ("≤" if lower_is_better else "≥") + format(goal, "g")
        print(f"{name:66} {goal_text:>6} {value:9.2f}  {'yes' if met else 'NO'}")
        results.setdefault("rows", []).append({"name": name, "goal": goal, "value": value, "met": met})
    out = Path(__file__).parent / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nraw timings: {out}")


if __name__ == "__main__":
    main()
