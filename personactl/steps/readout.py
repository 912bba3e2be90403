"""Multi-concept readout: one unit vector per concept per layer, from short first-person texts.

A concept directory holds one text file per concept (`calm.txt`: descriptions separated by blank
lines); files starting with `_` are a neutral pool added to every concept's negatives. Each text
is the assistant's reply to a fixed question (`READOUT_PROMPT`) in the model's chat template and
is read as `response_avg`. Each concept is trained one-vs-rest (its texts against every other
concept's texts plus the neutral pool) by mean difference, or by PCA (the uncentred first principal
direction of each positive text minus the negatives' mean, sign aligned with the mean difference).

File (`personactl.readout/1` safetensors): `vectors.<row>` `[n_concepts, hidden]` (unit norm) and
`center.<row>` `[hidden]` (the mean of all training texts; scores are `(h − center) · v`, so a
common offset in the stream does not favour one concept), metadata naming concepts and rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl import __version__
from personactl.core.directions import principal_direction_of_rows, unit
from personactl.core.sinks import SINK_RULE
from personactl.errors import InputError, VectorFileError
from personactl.store.text_input import read_user_text
from personactl.store.vectors import LAYER_CONVENTION

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel

FORMAT = "personactl.readout/1"
READOUT_PROMPT = "Describe yourself in a sentence or two."
AGGREGATORS = ("mean_diff", "pca")
RETRAIN = "retrain it: personactl readout train DIR -o FILE"


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
        raise InputError(f"unknown aggregator {aggregator!r}", hint="mean_diff or pca")
    label = torch.tensor(labels)
    out = []
    for c in range(n_concepts):
        pos, neg = values[label == c].double(), values[label != c].double()
        diff = pos.mean(0) - neg.mean(0)  # [R, H]
        if aggregator == "pca":
            centred = pos - neg.mean(0)  # [n_c, R, H]
            diff = principal_direction_of_rows(centred.transpose(0, 1), diff).double()
        out.append(unit(diff))
    return torch.stack(out, dim=1).float()


@dataclass
class Readout:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return list(self.metadata["concepts"])

    @property
    def rows(self) -> list[int]:
        return list(self.metadata["rows"])

    def vectors(self, row: int) -> torch.Tensor:
        return self.tensors[f"vectors.{row}"]

    def center(self, row: int) -> torch.Tensor:
        return self.tensors[f"center.{row}"]

    def scores(self, values: torch.Tensor) -> torch.Tensor:
        """`[N, R, H]` activations at this readout's rows → `[N, R, C]` scores."""
        return torch.stack(
            [(values[:, i] - self.center(r)) @ self.vectors(r).T for i, r in enumerate(self.rows)], dim=1
        )

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from personactl.store.workspace import atomic_path

        meta = {k: json.dumps(v) for k, v in {"format": FORMAT, **self.metadata}.items()}
        with atomic_path(Path(path)) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> Readout:
        """Read a readout file; a corrupt one, or one whose tensors disagree with its metadata, is a
        VectorFileError naming it."""
        from safetensors import safe_open

        from personactl.store.tagged_file import decoded_metadata, reading

        if not Path(path).is_file():
            raise VectorFileError(f"readout file not found: {path}")
        with reading(path, hint=RETRAIN):
            with safe_open(str(path), framework="pt") as f:
                metadata = decoded_metadata(f.metadata())
                if metadata.pop("format", None) != FORMAT:
                    raise VectorFileError(f"{path} is not a personactl readout file", hint=RETRAIN)
                readout = cls({k: f.get_tensor(k) for k in f.keys()}, metadata)
        readout.check_shapes(path)
        return readout

    def check_shapes(self, path: Path) -> None:
        """Every listed row has `vectors.<row>` [concepts, H] and `center.<row>` [H], one H for all."""
        try:
            concepts, rows = self.concepts, [int(r) for r in self.rows]
        except (KeyError, TypeError, ValueError):
            raise VectorFileError(f"{path}: readout metadata lacks concepts or rows", hint=RETRAIN) from None
        hidden = {t.shape[-1] for t in self.tensors.values() if t.ndim}
        for row in rows:
            vectors, center = self.tensors.get(f"vectors.{row}"), self.tensors.get(f"center.{row}")
            if (
                vectors is None
                or center is None
                or len(hidden) != 1
                or tuple(vectors.shape) != (len(concepts), *hidden)
                or tuple(center.shape) != tuple(hidden)
            ):
                raise VectorFileError(
                    f"{path}: the tensors at row {row} do not match its {len(concepts)} concepts", hint=RETRAIN
                )


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
