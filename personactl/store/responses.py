"""The responses table's vocabulary, shared by generate, extract and the user persona: its schema,
a planned row, the pair filter and the loader of a finished table with its optional scores."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.store.workspace import read_table

if TYPE_CHECKING:
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

RESPONSE_SCHEMA = {
    "trait": pl.String,
    "persona": pl.String,  # "model": the system prompt gives the assistant the trait
    "polarity": pl.String,  # "pos" (trait) or "neg" (opposite)
    "pair_id": pl.String,  # rows sharing a pair_id differ only in polarity
    "instruction_index": pl.Int32,
    "question_index": pl.Int32,
    "sample_index": pl.Int32,
    "question": pl.String,
    "system_prompt": pl.String,
    "messages": pl.String,  # JSON list of the prompt's chat messages
    "response": pl.String,
    "response_token_ids": pl.List(pl.Int32),  # the generated tokens, end-of-turn excluded
    "n_prompt_tokens": pl.Int32,
    "n_response_tokens": pl.Int32,
    "finish_reason": pl.String,  # "stop" or "length"
    "model": pl.String,
    "model_fingerprint": pl.String,
    "backend": pl.String,
    "temperature": pl.Float64,
    "top_p": pl.Float64,
    "max_new_tokens": pl.Int32,
    "seed": pl.Int64,  # the seed of this row's batch
    "batch_index": pl.Int32,
}


@dataclass(frozen=True)
class PlannedRow:
    pair_id: str
    polarity: str
    instruction_index: int
    question_index: int
    sample_index: int
    question: str
    system_prompt: str
    prompt_ids: tuple[int, ...]


def fingerprint_of(values: dict[str, Any]) -> str:
    """A short stable hash of a step's inputs."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def select_pairs(responses: pl.DataFrame, scores: pl.DataFrame | None = None) -> pl.DataFrame:
    """Rows of complete (pos, neg) pairs with non-empty responses on both sides.

    With `scores` (from `personactl score`), only the pairs its filter keeps survive."""
    ok = responses.filter(pl.col("n_response_tokens") > 0)
    if scores is not None:
        ok = ok.join(scores.filter(pl.col("keep")).select("pair_id").unique(), on="pair_id")
    counts = ok.group_by("pair_id").agg(pl.col("polarity").n_unique().alias("n"))
    complete = counts.filter(pl.col("n") == 2).select("pair_id")
    return ok.join(complete, on="pair_id").sort("pair_id", "polarity", descending=[False, True])


@dataclass(frozen=True)
class ScoredResponses:
    """A finished responses table and, when `personactl score` ran, its scores (both by path)."""

    path: Path
    manifest: dict[str, Any]
    scores_path: Path
    scores_manifest: dict[str, Any] | None

    @property
    def scores_fingerprint(self) -> Any:
        return self.scores_manifest.get("fingerprint") if self.scores_manifest else None

    def read(self) -> tuple[pl.DataFrame, pl.DataFrame | None]:
        """The responses table and the scores table (None when nothing was scored)."""
        return read_table(self.path), read_table(self.scores_path) if self.scores_manifest else None


def scored_responses(
    workspace: Workspace, slug: str, model: str, trait: Trait, persona: str = "model"
) -> ScoredResponses:
    """The finished responses of `trait` for a model and persona, with its scores' manifest when
    scored (a clear error when the responses are missing or stale, or the scores incomplete)."""
    path, manifest = workspace.require_responses(slug, model, trait, persona)
    scores_path = workspace.scores_path(slug, trait.name, persona)
    scores_manifest = workspace.complete_manifest(scores_path, "personactl score") if scores_path.is_file() else None
    return ScoredResponses(path, manifest, scores_path, scores_manifest)
