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
  (1.05x timed, 1.2x in profiled CPU time). So the 3x is the saving of not running the tokens
  after the read token, which their API leaves to the caller.
- Extraction peak RSS for 1,000 vs 100 pairs, each in a fresh process (streamed sums: memory
  must not grow with the number of pairs). The row is the ratio of whole-process peaks (model
  weights included); the JSON also keeps the peak above the RSS before extraction (the
  extraction's own memory: one batch's activations, the sums, and for PCA, on by default, the
  fixed positions x rows x H x H fp32 scatter, 165 MB on SmolLM2-135M, which does not grow with
  pairs) and the RSS after each batch, which shows whether memory climbs from batch to batch.
  The pairs' token ids are built before the `before` reading (about 7 MB for 1,000 pairs);
  extraction keeps no per-pair data (tracemalloc: 0.09 MB of Python objects left after a
  300-pair run, 0.6 MB peak).
  What made the earlier 1.60x: glibc heap retention. RSS after each batch climbed ~15-25 MiB a
  batch (800 -> 1,440 MiB over the 36 batches of 1,000 pairs; 100 pairs have 4), bare forwards
  over 30 different widths climbed the same way and a repeated width did not, and
  `malloc_trim(0)` after each batch removed the climb. extract_vectors now trims after each CPU
  batch (`activations.release_free_heap`); its cost, counted rather than timed: +0.9% minor page
  faults over a 100-pair extraction and 1-3 ms per call. Also tried: widest batch first (flat
  for 300 pairs, climbed again for 1,000), MALLOC_ARENA_MAX=2 (worse),
  ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 (climb halved, extraction 2-3x slower).
  What still grows is 1.5-2.7 MiB per new batch shape (oneDNN/ideep kernel caches among it:
  disabling either halves it): running the same 30 shapes a second time adds nothing, so it is
  bounded by the number of distinct batch shapes (about the spread of sequence lengths), not by
  the number of pairs; here 36 shapes vs 4, about 70 MiB. The rest of the ratio is noise in the
  peak inside a batch: glibc reuses heap blocks across a batch's layers differently each run
  (300 pairs: per-batch peaks 888-968 MiB; with MALLOC_MMAP_THRESHOLD_=1048576 they are a flat
  800-807 MiB, but at 5x the page faults, so extraction does not set it), and 1,000 pairs take
  the highest of 36 such peaks where 100 take the highest of 4. Two runs of this benchmark after
  the fix: 1.09 and 1.16 (whole-process peaks 1.06/1.16 GB and 1.11/1.29 GB; before the fix
  0.93/1.51 GB, 1.61), so the ratio is good to about +-0.1; `retained_growth_kib` (RSS after the
  last batch minus after the first) is the part that would grow with the pairs.
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

    from personactl.activations import extract_vectors

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
from personactl.activations import extract_vectors
from personactl.models import load_model
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
