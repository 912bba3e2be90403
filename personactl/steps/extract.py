"""From a responses table (or a pairs file) to a PersonaVector."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl import __version__
from personactl.core.choices import AGGREGATORS, DEFAULT_AGGREGATORS, POSITIONS
from personactl.core.sinks import SINK_RULE, STREAM_NORM_RULE
from personactl.errors import InputError
from personactl.model.activations import ExtractionResult, extract_vectors
from personactl.model.chat_format import (
    EncodedExample,
    PairExample,
    apply_thinking,
    collate_pairs,
    encode_example,
    encode_raw,
)
from personactl.model.loading import resolve_model
from personactl.steps.skeleton import StepArtifact
from personactl.store.responses import ScoredResponses, scored_responses, select_pairs
from personactl.store.vectors import HOOK_SITE, LAYER_CONVENTION, PersonaVector

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


def pairs_from_responses(responses: pl.DataFrame, tokenizer: Any) -> list[PairExample]:
    """Re-encode each row exactly as it was generated: template prompt + the generated token ids."""
    from personactl.errors import WorkspaceError

    by_pair: dict[str, dict[str, EncodedExample]] = {}
    for row in responses.iter_rows(named=True):
        example = encode_example(tokenizer, json.loads(row["messages"]), response_ids=list(row["response_token_ids"]))
        if example.prompt_len != row["n_prompt_tokens"]:
            raise WorkspaceError(
                f"the prompt of {row['pair_id']} now encodes to {example.prompt_len} tokens, "
                f"not the {row['n_prompt_tokens']} it was generated with: the tokenizer or chat template changed",
                hint="regenerate the responses with this model: personactl generate --force",
            )
        by_pair.setdefault(row["pair_id"], {})[row["polarity"]] = example
    return collate_pairs(by_pair)


def pairs_from_jsonl(path: Path, tokenizer: Any) -> tuple[list[PairExample], bool]:
    """Pairs from a JSON-lines file: `{"positive": ..., "negative": ...}` and optionally `"prompt"`
    (and `"system"`). With a prompt, the texts are assistant replies in the chat template; without,
    they are plain text. Returns the pairs and whether they have prompts (a lone BOS is no prompt)."""
    pairs, chat = [], None
    from personactl.store.text_input import read_user_text

    lines = read_user_text(path, "pairs file").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            pos, neg = item["positive"], item["negative"]
            if not (isinstance(pos, str) and isinstance(neg, str) and pos and neg):
                raise ValueError("positive and negative must be non-empty strings")
            if not all(isinstance(item.get(k, ""), (str, type(None))) for k in ("prompt", "system")):
                raise ValueError("prompt and system must be strings")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}:{number}: bad pair ({exc})",
                hint='each line: {"positive": "...", "negative": "...", "prompt": "..." (optional)}',
            ) from None
        has_prompt = bool(item.get("prompt"))
        if chat is None:
            chat = has_prompt
        elif chat != has_prompt:
            raise InputError(f"{path}:{number}: either every line has a prompt or none does")
        if has_prompt:
            messages = [
                *([{"role": "system", "content": item["system"]}] if item.get("system") else []),
                {"role": "user", "content": item["prompt"]},
            ]
            pairs.append(
                PairExample(encode_example(tokenizer, messages, pos), encode_example(tokenizer, messages, neg))
            )
        else:
            pair = PairExample(encode_raw(tokenizer, pos), encode_raw(tokenizer, neg))
            if min(pair.pos.response_len, pair.neg.response_len) < 1:
                raise InputError(
                    f"{path}:{number}: a text is a single token, and the first token is the attention sink's "
                    "context, so nothing is left to average",
                    hint='use texts of two or more tokens, or add a "prompt" to each line',
                )
            pairs.append(pair)
    if not pairs:
        raise InputError(f"{path} holds no pairs")
    return pairs, bool(chat)


def build_vector(
    lm: LoadedModel,
    pairs: Sequence[PairExample],
    *,
    rows: Sequence[int] | None,
    positions: Sequence[str] = POSITIONS,
    aggregators: Sequence[str] = DEFAULT_AGGREGATORS,
    batch_tokens: int,
    provenance: dict[str, Any],
    on_batch: Callable[[int], None] | None = None,
    user_pairs: Sequence[PairExample] | None = None,
    seed: int = 0,
    note: Callable[[str], None] = lambda message: None,
    quantiles: bool = False,
) -> tuple[PersonaVector, dict[str, Any]]:
    """Run extraction and wrap the result as a self-describing PersonaVector.

    `user_avg` (user persona only) is extracted from `user_pairs`, the prompts cut after the user
    message with the message as the span (see `personactl.steps.user_persona`). `probe` reads the
    pairs a second time (`personactl.steps.extract_probe`); `seed` splits its held-out pairs.
    `quantiles` reads them once more for each response's projections (`steps.extract_quantiles`)."""
    check_aggregators(aggregators)
    if "user_avg" in positions and user_pairs is None:
        raise InputError("user_avg exists only for the user persona", hint="extract --persona user")
    main_positions = [p for p in positions if p != "user_avg"]
    start = time.perf_counter()
    result = extract_vectors(
        lm.model,
        lm.layers,
        pairs,
        pad_id=lm.tokenizer.pad_token_id,
        rows=rows,
        positions=main_positions or ["response_avg"],  # stream norms need one pass over the responses
        pca="pca" in aggregators,
        batch_tokens=batch_tokens,
        on_batch=on_batch,
    )
    n_tokens = result.n_tokens
    tensors = {"stream_norm": result.stream_norm}
    diagnostics = result.diagnostics
    if "user_avg" in positions:
        user = add_user_avg(lm, user_pairs, rows, aggregators, batch_tokens, tensors)
        n_tokens += user.n_tokens
        diagnostics = merge_user_diagnostics(diagnostics, user.diagnostics, main_positions)
    seconds = time.perf_counter() - start
    timing = {"seconds": round(seconds, 3), "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1)}
    add_directions(tensors, result, main_positions, aggregators)
    probe_meta, quantile_meta = None, None
    if "probe" in aggregators:  # with --quantiles, the probe's pass gives the quantiles their readings too
        shared = shared_quantiles(tensors, len(pairs)) if quantiles and main_positions else None
        probe_meta, timing["probe_seconds"] = add_probe(
            lm, pairs, positions, result.rows, tensors, seed, batch_tokens, user_pairs, note, also=shared
        )
        if shared is not None:
            from personactl.steps.extract_quantiles import quantile_metadata

            quantile_meta = {**quantile_metadata(main_positions, len(pairs)), "read": "in the probe's pass"}
    if quantiles and quantile_meta is None:
        quantile_meta, timing["quantile_seconds"] = timed_quantiles(
            lm, pairs, main_positions, result.rows, tensors, batch_tokens, note
        )
    metadata = {
        **lm.describe(),
        "layer_convention": LAYER_CONVENTION,
        "hook_site": HOOK_SITE,
        "rows": result.rows,
        "positions": list(positions),
        "aggregators": list(aggregators),
        "n_pairs": result.n_pairs,
        "n_tokens": n_tokens,
        "stream_norm": STREAM_NORM_RULE,
        "sinks": SINK_RULE,
        "diagnostics": diagnostics,
        **({"probe": probe_meta} if probe_meta is not None else {}),
        **({"quantiles": quantile_meta} if quantile_meta is not None else {}),
        "personactl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance,
    }
    return PersonaVector(tensors, metadata), timing


def add_directions(
    tensors: dict[str, Any], result: ExtractionResult, positions: Sequence[str], aggregators: Sequence[str]
) -> None:
    """The streamed pass's directions and means, `<kind>.<position>`, added to `tensors`."""
    for position in positions:
        tensors[f"mean_diff.{position}"] = result.mean_diff[position]
        tensors[f"pos_mean.{position}"] = result.pos_mean[position]
        tensors[f"neg_mean.{position}"] = result.neg_mean[position]
        if "pca" in aggregators:
            tensors[f"pca.{position}"] = result.pca[position]


def timed_quantiles(
    lm: LoadedModel,
    pairs: Sequence[PairExample],
    positions: Sequence[str],
    rows: list[int],
    tensors: dict[str, Any],
    batch_tokens: int,
    note: Callable[[str], None],
) -> tuple[dict[str, Any], float]:
    """The `quantiles.*` tensors added to `tensors`; their metadata and the seconds they took."""
    from personactl.steps.extract_quantiles import add_quantiles

    start = time.perf_counter()
    meta = add_quantiles(lm, pairs, positions, rows, tensors, batch_tokens=batch_tokens, note=note)
    return meta, round(time.perf_counter() - start, 3)


def shared_quantiles(tensors: dict[str, Any], n_pairs: int) -> Callable[[list[str], Any, dict[str, Any]], None]:
    """A probe-pass callback (`add_probe`'s `also`) that adds the quantiles of every direction at the
    pass's positions, the probes just fitted included: one forward pass for both."""
    from personactl.steps.extract_quantiles import add_group_quantiles

    def add(group: list[str], readings: Any, probes: dict[str, Any]) -> None:
        add_group_quantiles(group, readings, {**tensors, **probes}, n_pairs, into=tensors)

    return add


def add_user_avg(
    lm: LoadedModel,
    user_pairs: Sequence[PairExample],
    rows: Sequence[int] | None,
    aggregators: Sequence[str],
    batch_tokens: int,
    tensors: dict[str, Any],
) -> ExtractionResult:
    """The user persona's pass: `<kind>.user_avg` tensors added to `tensors` (its `response_avg`)."""
    user = extract_vectors(
        lm.model,
        lm.layers,
        user_pairs,
        pad_id=lm.tokenizer.pad_token_id,
        rows=rows,
        positions=["response_avg"],
        pca="pca" in aggregators,
        batch_tokens=batch_tokens,
    )
    for kind in ("mean_diff", "pos_mean", "neg_mean", *(["pca"] if "pca" in aggregators else [])):
        tensors[f"{kind}.user_avg"] = getattr(user, kind)["response_avg"]
    return user


def check_aggregators(aggregators: Sequence[str]) -> None:
    unknown = set(aggregators) - set(AGGREGATORS)
    if unknown:
        raise InputError(f"unknown aggregator(s) {sorted(unknown)}", hint=f"choose from {', '.join(AGGREGATORS)}")


def add_probe(
    lm: LoadedModel,
    pairs: Sequence[PairExample],
    positions: Sequence[str],
    rows: list[int],
    tensors: dict[str, Any],
    seed: int,
    batch_tokens: int,
    user_pairs: Sequence[PairExample] | None,
    note: Callable[[str], None],
    also: Callable[[list[str], Any, dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], float]:
    """The `probe.<position>` tensors added to `tensors`; their metadata and the seconds they took.
    `also` shares the probe's per-example readings (`extract_probe.probe_pass`)."""
    from personactl.steps.extract_probe import probe_vectors

    start = time.perf_counter()
    probes, meta = probe_vectors(
        lm, pairs, positions, rows, seed=seed, batch_tokens=batch_tokens, user_pairs=user_pairs, note=note, also=also
    )
    tensors.update(probes)
    return meta, round(time.perf_counter() - start, 3)


def merge_user_diagnostics(main: dict[str, Any], user: dict[str, Any], kept: Sequence[str]) -> dict[str, Any]:
    """One diagnostics record for a user-persona file: the main pass's `kept` positions, and the
    user pass's `response_avg` as `user_avg` (warnings are per position, prefixed by its name)."""
    positions = {p: stats for p, stats in main["positions"].items() if p in kept}
    positions["user_avg"] = user["positions"]["response_avg"]
    warnings = [w for w in main["warnings"] if ":" not in w.split(" ")[0] or w.split(":")[0] in kept]
    warnings += [w.replace("response_avg:", "user_avg:", 1) for w in user["warnings"] if w.startswith("response_avg:")]
    return {**main, "positions": positions, "warnings": warnings}


@dataclass
class ExtractionInput:
    """The pairs one extraction reads, and what the vector file records about where they came from."""

    pairs: list[PairExample]
    pair_ids: list[str]
    positions: list[str]
    provenance: dict[str, Any]
    user_pairs: list[PairExample] | None = None


def pairs_file_identity(pairs_file: Path) -> dict[str, Any]:
    """A pairs file by path and content (its hash is what the fingerprint compares)."""
    import hashlib

    if not Path(pairs_file).is_file():
        raise InputError(f"pairs file not found: {pairs_file}")
    return {"pairs_file": str(pairs_file), "pairs_sha256": hashlib.sha256(Path(pairs_file).read_bytes()).hexdigest()}


def scored_identity(scored: ScoredResponses) -> dict[str, Any]:
    """A trait's responses (and scores, when judged) by the fingerprints of the steps that made them."""
    return {
        "responses": str(scored.path),
        "responses_fingerprint": scored.manifest.get("fingerprint"),
        "scores_fingerprint": scored.scores_fingerprint,
    }


def extract_fingerprint(
    settings: Settings,
    input_id: dict[str, Any],
    *,
    rows: list[int] | None,
    positions: Sequence[str] | None,
    aggregators: Sequence[str],
    persona: str,
    keep_pairs: bool,
    quantiles: bool = False,
) -> dict[str, Any]:
    """The inputs a vector file is made from (persona, keep_pairs, quantiles and the probe's settings
    only when not the default, so earlier files stay current)."""
    fingerprint = {
        **input_id,
        "model": settings.model,
        "revision": settings.revision,
        "dtype": settings.dtype,
        "rows": rows,
        "positions": list(positions) if positions is not None else "default",
        "aggregators": list(aggregators),
    }
    if "probe" in aggregators:
        from personactl.steps.extract_probe import probe_settings

        fingerprint["probe"] = probe_settings(settings.seed)
    if persona != "model":
        fingerprint["persona"] = persona
    if keep_pairs:
        fingerprint["keep_pairs"] = True
    if quantiles:
        fingerprint["quantiles"] = True
    return fingerprint


def judged_pairs_table(scored: ScoredResponses) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The complete pairs that passed the judge's filter (every complete pair when not scored), and
    the scores; an error when none is left."""
    responses, scores = scored.read()
    table = select_pairs(responses, scores)
    if scores is not None and table.height == 0:
        raise InputError(
            f"no pair passed the judge's filter ({scores['pair_id'].n_unique()} scored)",
            hint="lower --trait-threshold/--coherence-threshold in score, generate more samples, "
            "or use a stronger judge",
        )
    if table.height == 0:
        raise InputError(
            f"{scored.path} has no complete pairs with non-empty responses",
            hint="regenerate with more questions or a larger --max-new-tokens",
        )
    return table, scores


def trait_provenance(
    trait: Trait, persona: str, scored: ScoredResponses, scores: pl.DataFrame | None
) -> dict[str, Any]:
    """What a vector file extracted from a trait's responses records: trait, persona, judge and filter."""
    from personactl.steps.user_persona import USER_SPANS

    scores_manifest = scored.scores_manifest
    return {
        "trait": trait.name,
        "trait_sha256": trait.sha256,
        "persona": persona,
        **({"spans": USER_SPANS} if persona == "user" else {}),
        "source": "responses",
        "judge": scores_manifest["settings"]["judge_model"] if scores_manifest else None,
        "filter": (
            f"judge filter: pos trait >= {scores_manifest['filter']['trait_threshold']:g}, neg trait < it, "
            f"coherence >= {scores_manifest['filter']['coherence_threshold']:g}"
            if scores_manifest
            else "complete non-empty pairs (not scored)"
        ),
        "pairs_scored": scores["pair_id"].n_unique() if scores is not None else None,
    }


def input_from_responses(
    scored: ScoredResponses, trait: Trait, persona: str, positions: Sequence[str] | None, tokenizer: Any
) -> ExtractionInput:
    """The judged pairs of a trait's responses, re-encoded as generated (and, for the user persona,
    the user turns that `user_avg` reads)."""
    table, scores = judged_pairs_table(scored)
    pairs = pairs_from_responses(table, tokenizer)
    user_pairs = None
    if persona == "user":
        from personactl.steps.user_persona import USER_POSITIONS, user_turn_pairs

        positions = list(positions or USER_POSITIONS)
        user_pairs = user_turn_pairs(table, tokenizer) if "user_avg" in positions else None
    return ExtractionInput(
        pairs,
        sorted(set(table["pair_id"])),
        list(positions or POSITIONS),
        trait_provenance(trait, persona, scored, scores),
        user_pairs,
    )


def input_from_pairs_file(
    pairs_file: Path, label: str, positions: Sequence[str] | None, tokenizer: Any
) -> ExtractionInput:
    """The pairs of a JSON-lines file; without prompts, only the response positions exist."""
    pairs, has_prompt = pairs_from_jsonl(Path(pairs_file), tokenizer)
    if positions is None:
        positions = list(POSITIONS) if has_prompt else ["response_start", "response_avg"]
    if not has_prompt:
        dropped = [p for p in positions if p.startswith("prompt")]
        if dropped:
            raise InputError(
                f"{pairs_file} has no prompts, so {', '.join(dropped)} cannot be computed",
                hint='pass --positions response_start,response_avg or add "prompt" to each line',
            )
    provenance = {
        "trait": label,
        "trait_sha256": None,
        "persona": "model",
        "source": "pairs_file",
        "pairs_file": str(pairs_file),
        "judge": None,
    }
    return ExtractionInput(pairs, [f"line-{i}" for i in range(len(pairs))], positions, provenance)


def load_for_extraction(load: Callable[[], LoadedModel], settings: Settings, rows: list[int] | None) -> LoadedModel:
    """The model, its tokenizer set to re-encode prompts as they were generated, `rows` checked against it."""
    from personactl.core.ranges import check_in_range

    lm = load()
    apply_thinking(lm.tokenizer, getattr(settings, "thinking", "auto"))
    if rows is not None:
        check_in_range(rows, lm.num_layers)
    return lm


def extract_step(
    *,
    settings: Settings,
    workspace: Workspace,
    load: Callable[[], LoadedModel],
    trait: Trait | None,
    pairs_file: Path | None,
    name: str | None,
    rows: list[int] | None,
    positions: Sequence[str] | None,
    aggregators: Sequence[str],
    force: bool,
    on_start: Callable[[int], None] = lambda n: None,
    on_batch: Callable[[int], None] | None = None,
    persona: str = "model",
    keep_pairs: bool = False,
    on_note: Callable[[str], None] = lambda message: None,
    quantiles: bool = False,
) -> tuple[PersonaVector | None, dict[str, Any]]:
    """`personactl extract`: from the trait's responses table or a pairs file to a vector file.

    `positions=None` means every position the data has: all four, or only the response positions
    for plain-text pairs (which have no prompt)."""
    check_aggregators(aggregators)  # before the model loads
    source = resolve_model(settings.model)
    label = trait.name if trait is not None else (name or Path(pairs_file).stem)
    if persona != "model" and trait is None:
        raise InputError("--persona user needs --trait (its user-persona responses)")
    scored = scored_responses(workspace, source.slug, settings.model, trait, persona) if trait is not None else None
    input_id = scored_identity(scored) if scored is not None else pairs_file_identity(pairs_file)
    fingerprint = extract_fingerprint(
        settings,
        input_id,
        rows=rows,
        positions=positions,
        aggregators=aggregators,
        persona=persona,
        keep_pairs=keep_pairs,
        quantiles=quantiles,
    )
    out = StepArtifact(
        workspace,
        workspace.vectors_path(source.slug, label, persona),
        "vectors",
        fingerprint,
        {"name": label, "model": settings.model},
    )
    if out.current(force):
        return PersonaVector.load(out.path), out.skipped()

    lm = load_for_extraction(load, settings, rows)
    if scored is not None:
        job = input_from_responses(scored, trait, persona, positions, lm.tokenizer)
    else:
        job = input_from_pairs_file(Path(pairs_file), label, positions, lm.tokenizer)
    on_start(len(job.pairs))
    vector, timing = build_vector(
        lm,
        job.pairs,
        rows=rows,
        positions=job.positions,
        aggregators=aggregators,
        batch_tokens=settings.extract_batch_tokens,
        provenance=job.provenance,
        on_batch=on_batch,
        user_pairs=job.user_pairs,
        seed=settings.seed,
        note=on_note,
        quantiles=quantiles,
    )
    vector.save(out.path)
    if keep_pairs:
        from personactl.steps.pair_diffs import keep_pair_diffs

        keep_pair_diffs(
            workspace, out.path, lm, vector, job.pairs, job.user_pairs, job.pair_ids, settings.extract_batch_tokens
        )
    counts = {"pairs": len(job.pairs), "tokens": vector.metadata["n_tokens"]}
    out.commit(None, settings=settings, model=lm.describe(), counts=counts, timings=timing, metadata=vector.metadata)
    return vector, out.done(pairs=len(job.pairs), **timing)
