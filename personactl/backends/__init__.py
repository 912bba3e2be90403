"""Generation engines behind one small interface: `generate(prompts, sampling, seed)`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens, end-of-turn token excluded
    text: str
    finish_reason: str  # "stop" (end of turn) or "length"
