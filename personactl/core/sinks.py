"""Attention sinks: the positions no mean or norm may include.

Llama-, Qwen-, Mistral- and Gemma-style models park massive activations on the sequence's first
token (and sometimes on a second one): on SmolLM2 its residual norm is 100–200× every other
token's at rows 12–28, carried by one dimension. A mean over a span that holds it measures the
sink, not the text. The rule, applied row by row because rows are read one at a time as the
forward pass streams (and a run may read only some rows):

- the first real token of every sequence is a sink at every row (plain texts make it context,
  never a response token; with a chat template it is part of the prompt);
- any other token whose residual norm at a row exceeds `SINK_FACTOR` × the median token norm of
  its own sequence at that row is a sink at that row and at every deeper row read in the same
  pass (a massive activation appears at some block and persists, while its ratio to the median
  shrinks as ordinary tokens grow: SmolLM2's second-token sinks fall from 30× to 7× by row 29).

Ordinary tokens stay within ~9× the median at every row of SmolLM2 (function words at rows 3–8);
sinks sit at 25–200×, so the factor has room on both sides.
"""

from __future__ import annotations

import torch

SINK_FACTOR = 10.0
SINK_RULE = (
    f"position 0 of every sequence; and any token whose residual norm exceeds {SINK_FACTOR:g}x the median "
    "token norm of its sequence at a row read, from that row on. Left out of response_avg, prompt_avg, "
    "stream norms and per-token projections"
)
STREAM_NORM_RULE = (
    "median over examples of each example's median residual norm over its response tokens (sinks left out), per row"
)


def sink_mask(token_norms: torch.Tensor, real: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """`[B, T]` True at sink positions, from per-token norms `[B, T]`, the real-token mask and
    each sequence's first real column `[B]`. Pads are never sinks."""
    masked = token_norms.masked_fill(~real, float("nan"))
    median = masked.nanmedian(dim=1, keepdim=True).values
    sinks = real & (token_norms > SINK_FACTOR * median)
    sinks[torch.arange(len(first), device=first.device), first] = True
    return sinks


def without_sinks(span: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """`span` `[B, T]` minus its sink positions; a sequence whose span would be left empty keeps its
    span (a mean over nothing would be a silent zero)."""
    kept = span & ~sinks
    empty = ~kept.any(dim=1) & span.any(dim=1)
    return torch.where(empty[:, None], span, kept)


def median_span_norm(token_norms: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Per sequence, the median of `token_norms` `[B, T]` over `span` `[B, T]` (NaN where empty)."""
    return token_norms.masked_fill(~span, float("nan")).nanmedian(dim=1).values
