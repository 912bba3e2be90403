"""Benchmarks against a peer library and for memory, used by bench/run.py.

- personactl vs `steering_vectors.train_steering_vector`, one token per text, the same 64 pairs.
  steering-vectors pins transformers<5, so `make bench` installs it (and scikit-learn, which it
  imports) with --no-deps into bench/.peers, outside the venv; the row is skipped, and says so,
  when it is not importable. Both read the same token, the first of each response (our
  `response_start`; theirs via `read_*_token_index`), and the JSON records that the texts
  re-tokenize to the same ids and the cosine of the two sides' vectors per layer. Where the row's
  ratio comes from: both sides are forward-bound (torch profiler, SmolLM2-135M bf16, 2 cores:
  matmuls 65-77% of CPU time, attention 9-15%, the rest the blocks' own elementwise ops; neither
  side's recording is over 3%). personactl runs each text only up to the token it reads (7,122
  of 16,844 tokens here) and stops after the last hooked block; theirs runs the whole text and
  the LM head. The JSON keeps two controls, timed interleaved with the row: ours over whole
  texts (what `personactl extract --positions response_start` runs, since the vector file's
  stream norms need every response token), about 1.3x faster than theirs (the LM head and their
  padding), and theirs given texts cut by hand after the read token, about as fast as ours
  (1.05-1.2x timed in two runs). So the 3x is the saving of not running the tokens
  after the read token, which their API leaves to the caller.
- Extraction peak RSS for 1,000 vs 100 pairs, each in a fresh process (streamed sums: memory
  must not grow with the number of pairs). The kernel's high-water mark is reset after the model
  loads, so the peak is the extraction's own (the load peak could be higher and hide it). The JSON
  also keeps the RSS after each batch: `retained_growth_kib` (last minus first) is the part that
  climbs from batch to batch. What grows and why, with what was tried (bench/README.md): PCA
  storage by design (the differences for 100 pairs, the fixed H×H scatter for 1,000), and glibc
  heap fragmentation inside a batch, which rises with the number of batches run; between batches
  `extract_vectors` trims the heap (`activations.release_free_heap`), which keeps RSS nearly flat.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent / ".peers"


def bench_steering_vectors(results: dict, load_model, make_pairs) -> list[tuple]:
    sys.path.insert(0, str(PEERS_DIR))
    try:
        from steering_vectors import SteeringVectorTrainingSample, train_steering_vector
    except ImportError as exc:
        results["steering_vectors"] = {"skipped": f"steering-vectors not importable: {exc}"}
        print(f"skipped steering-vectors row: {exc} (make bench installs it into {PEERS_DIR})")
        return []
    import torch
    from timing import interleaved_median_seconds

    from personactl.model.activations import extract_vectors

    lm = load_model("smollm2-135m", log=lambda m: None)
    pairs = make_pairs(lm.tokenizer, 64)
    tokenizer = lm.tokenizer
    layers = list(range(lm.num_layers))  # their decoder_block k = our row k+1: every block
    decode = lambda ids: tokenizer.decode(list(ids))  # noqa: E731
    # the same token, the first of each response, read by both: our response_start
    samples = [
        SteeringVectorTrainingSample(
            decode(p.pos.input_ids),
            decode(p.neg.input_ids),
            read_positive_token_index=p.pos.prompt_len,
            read_negative_token_index=p.neg.prompt_len,
        )
        for p in pairs
    ]
    # what a careful user of theirs could do by hand: texts cut right after the token read
    cut = lambda ex: decode(ex.input_ids[: ex.prompt_len + 1])  # noqa: E731
    cut_texts = [(cut(p.pos), cut(p.neg)) for p in pairs]
    same_tokens = all(
        tokenizer(decode(ex.input_ids))["input_ids"] == list(ex.input_ids)
        and tokenizer(decode(ex.input_ids[: ex.prompt_len + 1]))["input_ids"] == list(ex.input_ids[: ex.prompt_len + 1])
        for p in pairs
        for ex in (p.pos, p.neg)
    )
    ours = {}

    def personactl_one_token():  # stops at the read token: no stream norm, which needs every response token
        ours["result"] = extract_vectors(
            lm.model,
            lm.layers,
            pairs,
            pad_id=tokenizer.pad_token_id,
            positions=["response_start"],
            pca=False,
            stream_norm=False,
        )

    def personactl_full_pass():  # what `personactl extract --positions response_start` runs (keeps stream norms)
        extract_vectors(
            lm.model, lm.layers, pairs, pad_id=tokenizer.pad_token_id, positions=["response_start"], pca=False
        )

    def steering_vectors_one_token():
        ours["theirs"] = train_steering_vector(lm.model, tokenizer, samples, layers=layers, batch_size=8)

    def steering_vectors_cut_texts():
        train_steering_vector(lm.model, tokenizer, cut_texts, layers=layers, read_token_index=-1, batch_size=8)

    t_ours, t_theirs, t_full, t_theirs_cut = interleaved_median_seconds(
        personactl_one_token, steering_vectors_one_token, personactl_full_pass, steering_vectors_cut_texts
    )
    mine = ours["result"].mean_diff["response_start"]
    theirs = torch.stack([ours["theirs"].layer_activations[k].float().cpu() for k in layers])
    agreement = torch.nn.functional.cosine_similarity(mine[1:], theirs, dim=-1)
    results["steering_vectors"] = {
        "pairs": len(pairs),
        "same_token_ids_after_decode": same_tokens,
        "min_cosine_ours_vs_theirs_per_layer": agreement.min().item(),
        "personactl_seconds": t_ours,
        "theirs_seconds": t_theirs,
        "personactl_full_pass_seconds": t_full,
        "theirs_cut_texts_seconds": t_theirs_cut,
        "tokens_run": {
            "personactl": ours["result"].n_tokens,
            "full_texts": sum(len(p.pos.input_ids) + len(p.neg.input_ids) for p in pairs),
        },
    }
    if not same_tokens or agreement.min().item() < 0.99:
        print(f"steering-vectors row: the two sides disagree ({results['steering_vectors']})")
    return [("extract vs steering-vectors train_steering_vector, 1 token, batch 8 (speed)", 3.0, t_theirs / t_ours)]


MEMORY_SCRIPT = """
import sys, json
sys.path.insert(0, {bench!r})
from run import make_pairs
from personactl.model.activations import extract_vectors
from personactl.model.loading import load_model
lm = load_model("smollm2-135m", log=lambda m: None)
pairs = make_pairs(lm.tokenizer, {n})
def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))
with open("/proc/self/clear_refs", "w") as refs:  # reset the high-water mark: the peak is extraction's, not loading's
    refs.write("5")
before = status_kib("VmRSS")
per_batch = []
on_batch = lambda k: per_batch.append(status_kib("VmRSS"))
extract_vectors(lm.model, lm.layers, pairs, pad_id=lm.tokenizer.pad_token_id, on_batch=on_batch)
print(json.dumps({{"peak_kib": status_kib("VmHWM"), "before_kib": before, "rss_after_each_batch_kib": per_batch}}))
"""


def bench_memory(results: dict) -> list[tuple]:
    """Peak RSS of the extraction itself (high-water mark reset after the model loads), each size
    in a fresh process. Linux only: it needs /proc/self/clear_refs."""
    bench_dir = str(Path(__file__).resolve().parent)
    peaks = {}
    for n in (100, 1000):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT.format(bench=bench_dir, n=n)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[n] = {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - start}
    for peak in peaks.values():
        peak["extraction_growth_kib"] = peak["peak_kib"] - peak["before_kib"]
        peak["retained_growth_kib"] = peak["rss_after_each_batch_kib"][-1] - peak["rss_after_each_batch_kib"][0]
    results["memory"] = peaks
    ratio = peaks[1000]["peak_kib"] / peaks[100]["peak_kib"]
    return [("extraction peak RSS, 1,000 vs 100 pairs (ratio, lower is better)", 1.1, ratio)]
