"""Generation engines: `hf.HFBackend` (transformers) and `vllm.VLLMBackend` both offer
`generate(prompts, sampling, seed)`; the vLLM one also steers (`steering`, `run_grid`), streams and closes.
This module holds what they share: `Sampling`, `Generation`, the end-of-turn tokens and `finish_generation`.

May import: model, store, core, and the top-level errors and settings (layers: pyproject.toml, [tool.importlinter]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def end_of_turn_ids(eos_token_id: int | list[int] | None, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the generation config's eos id(s), plus the tokenizer's eos."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


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


def finish_generation(tokens: list[int], stop_ids: list[int], tokenizer: Any) -> Generation:
    """Generated tokens cut at the first end-of-turn token ("stop"), else kept whole ("length")."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            kept = tokens[:i]
            return Generation(kept, tokenizer.decode(kept, skip_special_tokens=True), "stop")
    return Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), "length")
