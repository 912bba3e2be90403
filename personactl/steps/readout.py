"""Multi-concept readout: one unit vector per concept per layer, from short first-person texts.

A concept directory holds one text file per concept (`calm.txt`: descriptions separated by blank
lines); files starting with `_` are a neutral pool added to every concept's negatives. Each text
is the assistant's reply to a fixed question (`READOUT_PROMPT`) in the model's chat template and
is read as `response_avg`. Each concept is trained one-vs-rest (its texts against every other
concept's texts plus the neutral pool) by mean difference, by PCA (the uncentred first principal
direction of each positive text minus the negatives' mean, sign aligned with the mean difference),
or by a logistic-regression probe (`core.probe.direction`, fitted on all texts, no held-out split).

The file it makes, and its reader, are `store/readout_file.py` (`Readout`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl import __version__
from personactl.core.choices import AGGREGATORS
from personactl.core.directions import principal_direction_of_rows, unit
from personactl.core.probe import direction as probe_direction
from personactl.core.sinks import SINK_RULE
from personactl.errors import InputError
from personactl.store.readout_file import Readout
from personactl.store.text_input import read_user_text
from personactl.store.vectors import LAYER_CONVENTION

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel

READOUT_PROMPT = "Describe yourself in a sentence or two."


def read_concept_dir(directory: Path) -> tuple[dict[str, list[str]], list[str]]:
    """`{concept: [texts]}` from `*.txt` (sorted by name) and the neutral pool from `_*.txt`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"concept directory not found: {directory}")
    concepts, neutral = {}, []
    for path in sorted(directory.glob("*.txt")):
        texts = [block.strip() for block in read_user_text(path, "texts file").split("\n\n") if block.strip()]
        if path.name.startswith("_"):
            neutral.extend(texts)
        elif texts:
            concepts[path.stem] = texts
    if len(concepts) + bool(neutral) < 2:
        raise InputError(
            f"{directory} needs at least two concept files (or one and a _neutral.txt pool)",
            hint="one NAME.txt per concept, descriptions separated by blank lines",
        )
    return concepts, neutral


def text_example(tokenizer: Any, text: str):
    """A description as the assistant's reply to READOUT_PROMPT (the span read is the reply)."""
    from personactl.model.chat_format import chat_messages, encode_example

    return encode_example(tokenizer, chat_messages(None, READOUT_PROMPT), text)


def one_vs_rest(values: torch.Tensor, labels: list[int], n_concepts: int, aggregator: str) -> torch.Tensor:
    """`values` `[N, R, H]` with a concept index per text (-1 = neutral) → unit `[R, C, H]`."""
    if aggregator not in AGGREGATORS:
        raise InputError(f"unknown aggregator {aggregator!r}", hint=", ".join(AGGREGATORS))
    label = torch.tensor(labels)
    out = []
    for c in range(n_concepts):
        pos, neg = values[label == c].double(), values[label != c].double()
        diff = pos.mean(0) - neg.mean(0)  # [R, H]
        if aggregator == "pca":
            centred = pos - neg.mean(0)  # [n_c, R, H]
            diff = principal_direction_of_rows(centred.transpose(0, 1), diff).double()
        elif aggregator == "probe":
            diff = probe_direction(values.transpose(0, 1), (label == c).double()).double()
        out.append(unit(diff))
    return torch.stack(out, dim=1).float()


def train_readout(
    lm: LoadedModel,
    concepts: dict[str, list[str]],
    neutral: list[str],
    *,
    rows: list[int],
    aggregator: str = "mean_diff",
    batch_tokens: int = 8192,
    source: str | None = None,
) -> Readout:
    """One forward pass over every text, then one-vs-rest vectors per concept and row."""
    from personactl.model.example_activations import read_examples

    names = list(concepts)
    texts = [t for name in names for t in concepts[name]] + list(neutral)
    labels = [i for i, name in enumerate(names) for _ in concepts[name]] + [-1] * len(neutral)
    readings = read_examples(
        lm.model,
        lm.layers,
        [text_example(lm.tokenizer, t) for t in texts],
        pad_id=lm.tokenizer.pad_token_id,
        rows=rows,
        positions=["response_avg"],
        batch_tokens=batch_tokens,
    )
    values = readings.values[:, 0]  # [N, R, H]
    vectors = one_vs_rest(values, labels, len(names), aggregator)
    center = values.mean(0)
    tensors = {}
    for i, row in enumerate(readings.rows):
        tensors[f"vectors.{row}"] = vectors[i]
        tensors[f"center.{row}"] = center[i]
    metadata = {
        **lm.describe(),
        "layer_convention": LAYER_CONVENTION,
        "concepts": names,
        "rows": readings.rows,
        "aggregator": aggregator,
        "position": "response_avg",
        "prompt": READOUT_PROMPT,
        "n_texts": {name: len(concepts[name]) for name in names},
        "n_neutral": len(neutral),
        "scoring": "(h - center) . v, v unit norm, per row",
        "sinks": SINK_RULE,
        "source": source,
        "personactl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Readout(tensors, metadata)
