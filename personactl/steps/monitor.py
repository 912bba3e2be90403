"""Monitoring: project activations onto persona vectors or a readout, per layer and per token.

A probe is a set of unit directions per row (`[K, H]`: one for a persona vector, one per concept
for a readout) and an optional centre per row (a readout's training mean). The projection of an
activation `h` is `(h − centre) · v`. Positions read: `prompt_end` (the last prompt token: what
the model "intends" before it answers, which persona-vectors found predicts the trait of the
reply) and `response_avg` (the reply, absent for a prompt alone), plus every token on request:
a token that is an attention sink at a row (`personactl.core.sinks`) has no projection there (None).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl.core.directions import unit
from personactl.errors import InputError, VectorFileError

if TYPE_CHECKING:
    import polars as pl

    from personactl.model.chat_format import EncodedExample
    from personactl.model.loading import LoadedModel
    from personactl.settings import Settings
    from personactl.store.readout_file import Readout
    from personactl.store.traits import Trait
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

MONITOR_POSITIONS = ("prompt_end", "response_avg")


@dataclass
class Probe:
    name: str
    labels: list[str]  # one per direction
    rows: list[int]
    directions: torch.Tensor  # [R, K, H] unit
    centre: torch.Tensor | None = None  # [R, H]


def probe_from_vector(
    vector: PersonaVector, position: str, aggregator: str, rows: list[int] | None, name: str
) -> Probe:
    usable = [r for r in vector.rows if torch.isfinite(vector.get(position, aggregator)[r]).all()]
    rows = sorted(rows) if rows is not None else usable
    missing = sorted(set(rows) - set(usable))
    if missing:
        raise InputError(f"the vector has no direction at layers {missing}")
    directions = unit(vector.get(position, aggregator)[rows].float())[:, None, :]
    return Probe(name, [name], rows, directions)


def probe_from_readout(readout: Readout, rows: list[int] | None, name: str) -> Probe:
    rows = sorted(rows) if rows is not None else readout.rows
    missing = sorted(set(rows) - set(readout.rows))
    if missing:
        raise InputError(f"the readout was not trained at layers {missing}", hint=f"it has {readout.rows}")
    directions = torch.stack([readout.vectors(r) for r in rows])
    centre = torch.stack([readout.center(r) for r in rows])
    return Probe(name, readout.concepts, rows, directions, centre)


def project(
    lm: LoadedModel, probe: Probe, examples: list[Any], *, tokens: bool, batch_tokens: int = 8192
) -> dict[str, Any]:
    """Projections `{position: [N, R, K]}` (response_avg NaN where there is no reply) and, with
    `tokens`, per example `[T, R, K]`."""
    from personactl.model.example_activations import read_examples

    readings = read_examples(
        lm.model,
        lm.layers,
        examples,
        pad_id=lm.tokenizer.pad_token_id,
        rows=probe.rows,
        positions=list(MONITOR_POSITIONS),
        batch_tokens=batch_tokens,
        directions=probe.directions if tokens else None,
    )
    values = readings.values  # [N, P, R, H]
    offset = torch.zeros(len(probe.rows), len(probe.labels))
    if probe.centre is not None:
        values = values - probe.centre[None, None]
        offset = torch.einsum("rh,rkh->rk", probe.centre, probe.directions)
    proj = torch.einsum("nprh,rkh->nprk", values, probe.directions)
    no_reply = torch.tensor([e.response_len == 0 for e in examples])
    proj[no_reply, MONITOR_POSITIONS.index("response_avg")] = float("nan")
    out: dict[str, Any] = {pos: proj[:, p] for p, pos in enumerate(MONITOR_POSITIONS)}
    if tokens:
        out["tokens"] = [t - offset for t in readings.tokens]
    return out


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> float:
    """(mean a − mean b) / pooled standard deviation (n − 1 in each group's variance)."""
    a, b = a.double(), b.double()
    if len(a) < 2 or len(b) < 2:
        return math.nan
    pooled = ((len(a) - 1) * a.var() + (len(b) - 1) * b.var()) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / pooled.sqrt())


def column_name(label: str, position: str, row: int) -> str:
    return f"proj_{label}_{position}_L{row}"


def check_monitor_inputs(
    vector: str | None,
    readout: Path | str | None,
    texts: list[str],
    replies: list[str] | None,
    conversation: list[dict[str, str]] | None,
    responses: Trait | None,
) -> None:
    """Exactly one probe (vector or readout), exactly one input, and one reply per text when any."""
    if (vector is None) == (readout is None):
        raise InputError("pass exactly one of --vector or --readout")
    if sum([bool(texts), conversation is not None, responses is not None]) != 1:
        raise InputError("pass texts (--text), a --conversation file or --responses TRAIT")
    if replies and len(replies) != len(texts):
        raise InputError(
            f"{len(replies)} --reply for {len(texts)} --text",
            hint="give one --reply per --text, in the same order (each is the assistant's answer to it)",
        )


def open_probe(
    workspace: Workspace,
    slug: str,
    vector: str | None,
    readout: Path | str | None,
    *,
    position: str,
    aggregator: str,
    rows: list[int] | None,
) -> tuple[Probe, dict[str, Any]]:
    """The probe from a vector (a path or a trait name in the workspace) or a readout file, and the
    document's record of where it came from. Read before the model loads, so a bad file fails fast."""
    from personactl.store.readout_file import Readout
    from personactl.store.vectors import PersonaVector

    if vector is not None:
        path = workspace.find_vector(vector, slug)
        vec = PersonaVector.load(path)
        name = vec.metadata.get("trait") or path.stem
        probe = probe_from_vector(vec, position, aggregator, rows, name)
        return probe, {"vector": str(path), "position": position, "aggregator": aggregator}
    return probe_from_readout(Readout.load(readout), rows, "readout"), {"readout": str(readout)}


def check_probe_fits(probe: Probe, lm: LoadedModel, spec: str) -> None:
    """A clear error when the vector or readout was made for a model of another shape."""
    hidden = probe.directions.shape[-1]
    if hidden != lm.hidden_size or max(probe.rows, default=0) > lm.num_layers:
        raise VectorFileError(
            f"{spec} was made for a model with hidden size {hidden} and rows up to {max(probe.rows, default=0)}; "
            f"{lm.source.spec} has hidden size {lm.hidden_size} and {lm.num_layers} layers",
            hint="extract the vector (or train the readout) for this model, or pass --model with its model",
        )


def encode_texts(
    tokenizer: Any, texts: list[str], replies: list[str] | None
) -> tuple[list[dict[str, Any]], list[EncodedExample]]:
    """Each text as a user message alone, or with its reply as the assistant's answer."""
    from personactl.model.chat_format import chat_messages, encode_example

    if replies:
        items = [{"text": t, "reply": r} for t, r in zip(texts, replies, strict=True)]
        pairs = zip(texts, replies, strict=True)
        return items, [encode_example(tokenizer, chat_messages(None, t), r) for t, r in pairs]
    items = [{"text": t} for t in texts]
    return items, [encode_example(tokenizer, chat_messages(None, t), response_ids=[]) for t in texts]


def encode_conversation(
    tokenizer: Any, conversation: list[dict[str, str]]
) -> tuple[list[dict[str, Any]], list[EncodedExample]]:
    """One example: a final assistant turn is the reply; otherwise the conversation is the prompt."""
    from personactl.model.chat_format import encode_example

    if conversation and conversation[-1]["role"] == "assistant":
        examples = [encode_example(tokenizer, conversation[:-1], conversation[-1]["content"])]
    else:
        examples = [encode_example(tokenizer, conversation, response_ids=[])]
    return [{"conversation": len(conversation)}], examples


def encode_responses(tokenizer: Any, table: pl.DataFrame) -> tuple[list[dict[str, Any]], list[EncodedExample]]:
    """Every row of a responses table, re-encoded as it was generated."""
    import json

    from personactl.model.chat_format import encode_example

    rows = list(table.iter_rows(named=True))
    examples = [
        encode_example(tokenizer, json.loads(r["messages"]), response_ids=list(r["response_token_ids"])) for r in rows
    ]
    return [{"pair_id": r["pair_id"], "polarity": r["polarity"]} for r in rows], examples


def fill_items(items: list[dict], examples: list[Any], result: dict[str, Any], tokenizer: Any, *, tokens: bool) -> None:
    """Each item's projections per position (None where NaN) and, with `tokens`, per token (a sink
    token is marked and has no projection)."""
    nan_to_none = lambda x: None if math.isnan(x) else x  # noqa: E731
    for i, item in enumerate(items):
        for pos in MONITOR_POSITIONS:
            item[pos] = [[nan_to_none(float(x)) for x in row] for row in result[pos][i]]
        if tokens:
            ids = examples[i].input_ids
            item["tokens"] = [
                {
                    "token": tokenizer.decode([t]),
                    "response": j >= examples[i].prompt_len,
                    "sink": bool(torch.isnan(p).any()),
                    "projection": [[nan_to_none(float(x)) for x in row] for row in p],
                }
                for j, (t, p) in enumerate(zip(ids, result["tokens"][i], strict=True))
            ]


def with_projection_columns(table: pl.DataFrame, result: dict[str, Any], probe: Probe) -> pl.DataFrame:
    """The responses table with one Float64 column per position, layer and label (`column_name`)."""
    import polars as pl

    columns = {
        column_name(label, pos, row): result[pos][:, r, k].tolist()
        for pos in MONITOR_POSITIONS
        for r, row in enumerate(probe.rows)
        for k, label in enumerate(probe.labels)
    }
    return table.with_columns(*[pl.Series(name, values, dtype=pl.Float64) for name, values in columns.items()])


def monitor_step(
    *,
    settings: Settings,
    workspace: Workspace,
    load: Callable[[], LoadedModel],
    vector: str | None,
    readout: Path | str | None,
    texts: list[str],
    replies: list[str] | None = None,
    conversation: list[dict[str, str]] | None,
    responses: Trait | None,
    persona: str,
    position: str,
    aggregator: str,
    rows: list[int] | None,
    tokens: bool,
) -> tuple[dict[str, Any], pl.DataFrame | None]:
    """Projections for texts, a conversation or a trait's responses table. Returns the JSON document
    and, for a responses table, the table with one column per label, position and layer."""
    import polars as pl

    from personactl.model.loading import resolve_model

    check_monitor_inputs(vector, readout, texts, replies, conversation, responses)
    slug = resolve_model(settings.model).slug
    probe, source = open_probe(workspace, slug, vector, readout, position=position, aggregator=aggregator, rows=rows)
    lm = load()
    check_probe_fits(probe, lm, vector or str(readout))
    table = None
    if texts:
        items, examples = encode_texts(lm.tokenizer, texts, replies)
    elif conversation is not None:
        items, examples = encode_conversation(lm.tokenizer, conversation)
    else:
        path, _ = workspace.require_responses(slug, settings.model, responses, persona)
        table = pl.read_parquet(path)
        items, examples = encode_responses(lm.tokenizer, table)
    result = project(lm, probe, examples, tokens=tokens, batch_tokens=settings.extract_batch_tokens)
    fill_items(items, examples, result, lm.tokenizer, tokens=tokens)
    doc: dict[str, Any] = {**source, "model": settings.model, "labels": probe.labels, "layers": probe.rows}
    doc["items"] = items
    if table is not None:
        doc["effect"] = polarity_effect(table["polarity"].to_list(), result, probe)
        table = with_projection_columns(table, result, probe)
    return doc, table


def polarity_effect(polarity: list[str], result: dict[str, Any], probe: Probe) -> list[dict[str, Any]]:
    """Per layer, position and label: mean projection of pos and neg rows and Cohen's d."""
    is_pos = torch.tensor([p == "pos" for p in polarity])
    rows = []
    for pos in MONITOR_POSITIONS:
        for r, row in enumerate(probe.rows):
            for k, label in enumerate(probe.labels):
                values = result[pos][:, r, k]
                a, b = values[is_pos], values[~is_pos]
                a, b = a[torch.isfinite(a)], b[torch.isfinite(b)]
                rows.append(
                    {
                        "position": pos,
                        "layer": row,
                        "label": label,
                        "mean_pos": float(a.mean()) if len(a) else None,
                        "mean_neg": float(b.mean()) if len(b) else None,
                        "cohens_d": nan_or(cohens_d(a, b)),
                    }
                )
    return rows


def nan_or(x: float) -> float | None:
    return None if math.isnan(x) else x
