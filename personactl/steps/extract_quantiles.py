"""Percentiles of each response's projection on every direction of a vector file (`extract
--quantiles`), so that a cap's τ can come from data: `--steer evil:12:p90:cap` caps at the 90th
percentile of the trait-free responses' projections (`store.plan_values`).

The streamed extraction keeps only sums, so this reads the pairs again, per example
(`model.example_activations.read_examples`: the same hooks, spans and sink rule as extraction), a
second forward pass made only when asked for, and shared with the probe's when both are
(`steps.extract.shared_quantiles`). For each direction tensor `<aggregator>.<position>`
it saves `quantiles.pos.<aggregator>.<position>` and `quantiles.neg.<aggregator>.<position>`, each
`[L+1, 101]`: row l holds percentiles 0, 1, …, 100 of h·û over the pos (neg) examples, h the
example's reading at that position and row, û the direction's unit vector there; stream units.
Rows not read, or whose direction is undefined, are NaN. The user persona's `user_avg` is not covered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from personactl.core.choices import AGGREGATORS
from personactl.model.chat_format import PairExample
from personactl.steps.extract_probe import position_groups
from personactl.store.plan_values import POINTS, quantile_key

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel

QUANTILE_RULE = (
    "quantiles.<side>.<aggregator>.<position>[l, k] = k-th percentile over the side's examples of the "
    "example's reading at (position, row l) projected on the unit direction of <aggregator>.<position>[l]"
)


def add_quantiles(
    lm: LoadedModel,
    pairs: Sequence[PairExample],
    positions: Sequence[str],
    rows: list[int],
    tensors: dict[str, torch.Tensor],
    *,
    batch_tokens: int,
    note: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Add the quantile tensors of every direction in `tensors` at `positions`; their metadata."""
    from personactl.model.example_activations import read_examples

    examples = [p.pos for p in pairs] + [p.neg for p in pairs]
    n = len(pairs)
    note(f"quantiles: a second forward pass over the {n} pairs for each response's projections")
    for group in position_groups(len(examples), positions, len(rows), lm.hidden_size):
        readings = read_examples(
            lm.model, lm.layers, examples, pad_id=lm.tokenizer.pad_token_id, rows=rows,
            positions=group, batch_tokens=batch_tokens,
        )  # fmt: skip
        add_group_quantiles(group, readings, tensors, n, into=tensors)
        del readings
    return quantile_metadata(positions, n)


def quantile_metadata(positions: Sequence[str], n_pairs: int) -> dict[str, Any]:
    return {"rule": QUANTILE_RULE, "points": POINTS, "positions": list(positions), "examples_per_side": n_pairs}


def add_group_quantiles(
    group: Sequence[str], readings: Any, directions: dict[str, torch.Tensor], n_pairs: int, *, into: dict[str, Any]
) -> None:
    """The quantile tensors of every direction in `directions` at the positions of `group`, added to
    `into`, from one pass's `readings` (`read_examples` of the pos examples, then the neg ones)."""
    for p, position in enumerate(group):
        for aggregator in AGGREGATORS:
            key = f"{aggregator}.{position}"
            if key in directions:
                tables = side_quantiles(readings.values[:, p], directions[key][readings.rows], n_pairs)
                for side, table in tables.items():
                    full = torch.full((directions[key].shape[0], POINTS), float("nan"))
                    full[readings.rows] = table
                    into[quantile_key(side, aggregator, position)] = full


def side_quantiles(values: torch.Tensor, directions: torch.Tensor, n_pos: int) -> dict[str, torch.Tensor]:
    """`values` [2N, R, H] (pos examples first), `directions` [R, H] → {"pos", "neg"}: [R, 101]."""
    unit = directions.float() / torch.linalg.vector_norm(directions.float(), dim=-1, keepdim=True)
    projections = (values.float() * unit[None]).sum(-1)  # [2N, R]; NaN where a direction is undefined
    levels = torch.linspace(0, 1, POINTS, dtype=torch.float64)
    out = {}
    for side, part in (("pos", projections[:n_pos]), ("neg", projections[n_pos:])):
        out[side] = torch.quantile(part.double(), levels, dim=0).T.float()  # [R, 101]
    return out
