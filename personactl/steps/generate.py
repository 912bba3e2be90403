"""Contrastive response generation for a trait, resumable at batch granularity.

The plan (every row to generate, in a fixed order and fixed batches) is derived from the trait
and settings alone, and each batch is seeded with `seed + batch_index`. A finished batch is one
atomically written shard, so a run killed at any point resumes with the missing batches only, and
the final table holds every row exactly once, identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.backends import Sampling, open_engine
from personactl.errors import InputError, WorkspaceError
from personactl.model.chat_format import apply_thinking, chat_messages, encode_prompt
from personactl.model.loading import context_limit
from personactl.steps.skeleton import StepArtifact
from personactl.store.atomic import atomic_path, atomic_write_text
from personactl.store.responses import RESPONSE_SCHEMA, PlannedRow, fingerprint_of
from personactl.store.traits import Trait

if TYPE_CHECKING:
    from personactl.backends import Engine
    from personactl.settings import Settings
    from personactl.store.workspace import Workspace


def plan_rows(trait: Trait, tokenizer: Any, samples_per_question: int, max_questions: int | None) -> list[PlannedRow]:
    """Every (instruction pair × extraction question × sample × polarity), prompts tokenized."""
    questions = trait.questions.extraction[:max_questions] if max_questions else trait.questions.extraction
    rows = []
    for i, pair in enumerate(trait.instructions):
        for q, question in enumerate(questions):
            for s in range(samples_per_question):
                for polarity, system in (("pos", pair.pos), ("neg", pair.neg)):
                    ids = encode_prompt(tokenizer, chat_messages(system, question))
                    rows.append(PlannedRow(f"i{i}-q{q}-s{s}", polarity, i, q, s, question, system, tuple(ids)))
    return rows


def plan_batches(rows: list[PlannedRow], batch_size: int) -> list[list[int]]:
    """Fixed batches of similar prompt length (less padding), in a deterministic order."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].prompt_ids), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def check_context(rows: list[PlannedRow], max_new_tokens: int, context: int | None) -> None:
    """Refuse a plan whose longest prompt plus reply exceeds the model's context (`context` tokens):
    past it, positions are extrapolated and the replies are garbage that would still be scored."""
    if context is None or not rows:
        return
    longest = max(rows, key=lambda r: len(r.prompt_ids))
    if len(longest.prompt_ids) + max_new_tokens > context:
        raise InputError(
            f"question {longest.question_index} with its system prompt is {len(longest.prompt_ids)} tokens; "
            f"with --max-new-tokens {max_new_tokens} that exceeds the model's context of {context} tokens",
            hint="shorten the question or the instructions, or lower --max-new-tokens",
        )


class ShardStore:
    """Finished batches as `batch-NNNNN.parquet` files under one directory, tagged with the plan."""

    def __init__(self, directory: Path, plan_fingerprint: str):
        self.directory = directory
        self.plan_fingerprint = plan_fingerprint

    def open(self, force: bool) -> None:
        plan_file = self.directory / "plan.json"
        if self.directory.exists():
            stale = not plan_file.is_file() or json.loads(plan_file.read_text()).get("plan") != self.plan_fingerprint
            if force or stale:
                shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not plan_file.is_file():
            atomic_write_text(plan_file, json.dumps({"plan": self.plan_fingerprint}))

    def path(self, batch_index: int) -> Path:
        return self.directory / f"batch-{batch_index:05d}.parquet"

    def done(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.directory.glob("batch-*.parquet")}

    def write(self, batch_index: int, frame: pl.DataFrame) -> None:
        with atomic_path(self.path(batch_index)) as tmp:
            frame.write_parquet(tmp)

    def read_all(self) -> pl.DataFrame:
        paths = sorted(self.directory.glob("batch-*.parquet"))
        return pl.concat([pl.read_parquet(p) for p in paths]) if paths else pl.DataFrame(schema=RESPONSE_SCHEMA)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def run_generation(
    *,
    trait: Trait,
    backend: Engine,
    tokenizer: Any,
    model_info: dict[str, Any],
    sampling: Sampling,
    seed: int,
    batch_size: int,
    samples_per_question: int,
    max_questions: int | None,
    shards: ShardStore,
    output: Path,
    force: bool,
    planned: list[PlannedRow] | None = None,
    persona: str = "model",
    context: int | None = None,
    on_start: Callable[[int, int], None] = lambda total, done: None,
    on_batch: Callable[[int, int], None] = lambda rows, tokens: None,
) -> pl.DataFrame:
    """Generate every missing batch into `shards`, then write the combined table to `output`."""
    rows = planned if planned is not None else plan_rows(trait, tokenizer, samples_per_question, max_questions)
    if not rows:
        raise InputError(f"trait {trait.name} yields no rows to generate")
    check_context(rows, sampling.max_new_tokens, context)
    batches = plan_batches(rows, batch_size)
    shards.open(force)
    done = shards.done()
    on_start(len(rows), sum(len(b) for i, b in enumerate(batches) if i in done))
    for index, batch in enumerate(batches):
        if index in done:
            continue
        batch_seed = seed + index
        outputs = backend.generate([rows[i].prompt_ids for i in batch], sampling, batch_seed)
        records = []
        for i, gen in zip(batch, outputs, strict=True):
            row = rows[i]
            records.append(
                {
                    "trait": trait.name,
                    "persona": persona,
                    "polarity": row.polarity,
                    "pair_id": row.pair_id,
                    "instruction_index": row.instruction_index,
                    "question_index": row.question_index,
                    "sample_index": row.sample_index,
                    "question": row.question,
                    "system_prompt": row.system_prompt,
                    "messages": json.dumps(chat_messages(row.system_prompt, row.question)),
                    "response": gen.text,
                    "response_token_ids": gen.token_ids,
                    "n_prompt_tokens": len(row.prompt_ids),
                    "n_response_tokens": len(gen.token_ids),
                    "finish_reason": gen.finish_reason,
                    "model": model_info["model"],
                    "model_fingerprint": model_info["model_fingerprint"],
                    "backend": backend.name,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_new_tokens": sampling.max_new_tokens,
                    "seed": batch_seed,
                    "batch_index": index,
                }
            )
        shards.write(index, pl.DataFrame(records, schema=RESPONSE_SCHEMA))
        on_batch(len(batch), sum(len(g.token_ids) for g in outputs))
    table = shards.read_all().sort(
        ["instruction_index", "question_index", "sample_index", "polarity"], descending=[False, False, False, True]
    )
    if table.height != len(rows) or table.select(pl.struct("pair_id", "polarity").n_unique()).item() != len(rows):
        raise WorkspaceError(
            f"shards in {shards.directory} are inconsistent ({table.height} rows, plan has {len(rows)})",
            hint="rerun with --force",
        )
    with atomic_path(output) as tmp:
        table.write_parquet(tmp)
    return table


def responses_fingerprint(settings: Settings, trait: Trait, max_questions: int | None) -> dict[str, Any]:
    """The inputs a model-persona responses table is made from: equal ones mean it is finished."""
    fingerprint = {
        "trait_sha256": trait.sha256,
        "model": settings.model,
        "revision": settings.revision,
        "dtype": settings.dtype,
        "backend": settings.backend,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "samples_per_question": settings.samples_per_question,
        "max_questions": max_questions,
    }
    if settings.thinking != "auto":  # absent when unset, so earlier responses stay complete
        fingerprint["thinking"] = settings.thinking
    return fingerprint


def response_counts(table: pl.DataFrame) -> dict[str, int]:
    """The responses manifest's counts: rows, pairs, tokens, and the replies that are empty or cut."""
    return {
        "rows": table.height,
        "pairs": table["pair_id"].n_unique(),
        "response_tokens": int(table["n_response_tokens"].sum()),
        "empty_responses": int((table["n_response_tokens"] == 0).sum()),
        "truncated": int((table["finish_reason"] == "length").sum()),
    }


def generate_step(
    *,
    settings: Settings,
    trait: Trait,
    workspace: Workspace,
    load: Callable[[], Any],
    max_questions: int | None,
    force: bool,
    persona: str = "model",
    on_start: Callable[[int, int], None] = lambda total, done: None,
    on_batch: Callable[[int, int], None] = lambda rows, tokens: None,
) -> dict[str, Any]:
    """`personactl generate`: skip if done with the same inputs, else (resume and) generate."""
    import time

    from personactl.model.loading import resolve_model

    source = resolve_model(settings.model)
    output = workspace.responses_path(source.slug, trait.name, persona)
    fingerprint = responses_fingerprint(settings, trait, max_questions)
    source_table = None
    if persona == "user":  # the user turns are the kept model-persona answers: those inputs count too
        from personactl.steps.user_persona import user_persona_inputs

        source_table, fingerprint["user_persona"] = user_persona_inputs(workspace, source.slug, settings.model, trait)
    out = StepArtifact(workspace, output, "responses", fingerprint, {"trait": trait.name, "model": settings.model})
    if out.current(force):
        return out.skipped(rows=pl.read_parquet(output).height)

    lm = load()  # the vllm backend is its own model handle (tokenizer, describe()), with no HF weights
    apply_thinking(lm.tokenizer, settings.thinking)
    backend = open_engine(settings, lm)
    shards = ShardStore(workspace.shards_dir(source.slug, trait.name, persona), fingerprint_of(fingerprint))
    planned = None
    if source_table is not None:
        from personactl.steps.user_persona import plan_user_rows

        planned = plan_user_rows(source_table, lm.tokenizer)
    start = time.perf_counter()
    table = run_generation(
        trait=trait,
        backend=backend,
        tokenizer=lm.tokenizer,
        model_info=lm.describe(),
        sampling=Sampling(settings.max_new_tokens, settings.temperature, settings.top_p),
        seed=settings.seed,
        batch_size=settings.batch_size,
        samples_per_question=settings.samples_per_question,
        max_questions=max_questions,
        planned=planned,
        persona=persona,
        shards=shards,
        output=output,
        force=force,
        context=context_limit(lm),
        on_start=on_start,
        on_batch=on_batch,
    )
    seconds = round(time.perf_counter() - start, 2)
    counts = response_counts(table)
    out.commit(
        None,  # run_generation wrote the table atomically
        settings=settings,
        trait={"name": trait.name, "sha256": trait.sha256},
        model=lm.describe(),
        counts=counts,
        timings={"seconds_this_run": seconds},
        schema={k: str(v) for k, v in RESPONSE_SCHEMA.items()},
    )
    shards.remove()
    return out.done(**counts, seconds=seconds)
