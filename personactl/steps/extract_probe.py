"""The `probe` aggregator of `personactl extract`: logistic-regression directions (`core.probe`)
fitted on every pair's own activations.

The streamed extraction keeps only sums, so the probe reads the pairs again, per example
(`model.example_activations.read_examples`: the same hooks, spans and sink rule): a second forward
pass over the pairs, made only when `probe` is asked for. The readings take 2N × positions × rows ×
hidden fp32; past `READ_BYTES` they are read one position at a time (one pass each), and the
float64 fits run on chunks of rows of at most `FIT_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from personactl.core.probe import HOLDOUT, L2, PROBE_RULE, fit_probe
from personactl.model.chat_format import PairExample

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel

READ_BYTES = 2 << 30  # per-example readings held at once (fp32)
FIT_BYTES = 256 << 20  # features of one float64 fit (a chunk of rows)


@dataclass
class ProbeResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # `probe.<position>` [L+1, H]
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)  # accuracy and split per position
    n_tokens: int = 0


def probe_settings(seed: int) -> dict[str, Any]:
    """What decides a probe besides the data: recorded in the vector file and its fingerprint."""
    return {"l2": L2, "holdout": HOLDOUT, "seed": seed, "split": "by pair (both members on one side), seeded"}


def position_groups(n_examples: int, positions: Sequence[str], n_rows: int, hidden: int) -> list[list[str]]:
    """All positions in one pass when their readings fit in `READ_BYTES`, else one position a pass."""
    if n_examples * len(positions) * n_rows * hidden * 4 <= READ_BYTES:
        return [list(positions)]
    return [[p] for p in positions]


def fit_position(pos: torch.Tensor, neg: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """`fit_probe` over chunks of rows (each chunk's float64 features at most `FIT_BYTES`):
    directions [R, H], accuracy [R], train and test pair counts."""
    n, n_rows, hidden = pos.shape
    per_chunk = max(1, FIT_BYTES // (2 * n * hidden * 8))
    directions, accuracy, split = [], [], (0, 0)
    for start in range(0, n_rows, per_chunk):
        fit = fit_probe(pos[:, start : start + per_chunk], neg[:, start : start + per_chunk], seed=seed)
        directions.append(fit.directions)
        accuracy.append(fit.accuracy)
        split = (fit.train_pairs, fit.test_pairs)
    return torch.cat(directions), torch.cat(accuracy), *split


def probe_pass(
    lm: LoadedModel,
    pairs: Sequence[PairExample],
    positions: Sequence[str],
    rows: list[int],
    *,
    seed: int,
    batch_tokens: int,
    names: dict[str, str] | None = None,
    into: ProbeResult,
    also: Callable[[list[str], Any, dict[str, torch.Tensor]], None] | None = None,
) -> None:
    """Read `pairs` per example at `positions` and `rows`, fit the probes and add them to `into`
    (a position is stored under `names[position]` when given: the user pass reads `response_avg`
    for `user_avg`). `also(group, readings, probes)` then gets each pass's readings and the probes fitted
    so far: work that needs the same per-example reading (`extract --quantiles`) shares the pass."""
    from personactl.model.example_activations import read_examples

    examples = [p.pos for p in pairs] + [p.neg for p in pairs]
    n, hidden = len(pairs), lm.hidden_size
    for group in position_groups(len(examples), positions, len(rows), hidden):
        readings = read_examples(
            lm.model,
            lm.layers,
            examples,
            pad_id=lm.tokenizer.pad_token_id,
            rows=rows,
            positions=group,
            batch_tokens=batch_tokens,
        )
        into.n_tokens += sum(len(e.input_ids) for e in examples)
        for p, position in enumerate(group):
            values = readings.values[:, p]  # [2N, R, H]
            directions, accuracy, n_train, n_test = fit_position(values[:n], values[n:], seed)
            name = (names or {}).get(position, position)
            table = torch.full((lm.num_layers + 1, hidden), float("nan"))
            table[readings.rows] = directions
            into.tensors[f"probe.{name}"] = table
            into.positions[name] = {
                "accuracy": [None if math.isnan(a) else round(a, 6) for a in accuracy.tolist()],
                "train_pairs": n_train,
                "test_pairs": n_test,
            }
        if also is not None:
            also(group, readings, into.tensors)
        del readings


def probe_vectors(
    lm: LoadedModel,
    pairs: Sequence[PairExample],
    positions: Sequence[str],
    rows: list[int],
    *,
    seed: int,
    batch_tokens: int,
    user_pairs: Sequence[PairExample] | None = None,
    note: Callable[[str], None] = lambda message: None,
    also: Callable[[list[str], Any, dict[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`probe.<position>` tensors and the metadata that describes them: how they were fitted, the
    held-out accuracy per position and row, and the tokens the extra pass ran. `also` shares the
    main pairs' readings (`probe_pass`)."""
    main = [p for p in positions if p != "user_avg"]
    size = 2 * len(pairs) * len(main) * len(rows) * lm.hidden_size * 4
    passes = len(position_groups(2 * len(pairs), main, len(rows), lm.hidden_size))
    note(
        f"probe: a second forward pass over the {len(pairs)} pairs for per-example activations "
        f"({size / 2**20:,.0f} MiB fp32{f', read in {passes} passes, one per position' if passes > 1 else ''})"
    )
    result = ProbeResult()
    if main:
        probe_pass(lm, pairs, main, rows, seed=seed, batch_tokens=batch_tokens, into=result, also=also)
    if "user_avg" in positions and user_pairs is not None:
        names = {"response_avg": "user_avg"}
        probe_pass(
            lm, user_pairs, ["response_avg"], rows, seed=seed, batch_tokens=batch_tokens, names=names, into=result
        )
    metadata = {"rule": PROBE_RULE, **probe_settings(seed), "rows": rows, "positions": result.positions}
    return result.tensors, {**metadata, "n_tokens": result.n_tokens}
