"""PersonaVector: a safetensors file that describes itself (the math on vectors is core/directions.py).

File layout: tensors `<aggregator>.<position>` of shape `[L+1, hidden]` (rows not computed are
NaN), `pos_mean.<position>`, `neg_mean.<position>`, and `stream_norm` `[L+1]`. A tagged file
(`store/tagged_file.py`: metadata values are JSON strings); `layer_convention` spells out what row
`l` means. `load_for_model` finds a vector for a loaded model and checks it fits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personactl.core.directions import scale_direction
from personactl.core.ranges import format_ranges
from personactl.errors import VectorFileError
from personactl.store.tagged_file import read_tagged, write_tagged
from personactl.store.vector_checks import validate_against_metadata

if TYPE_CHECKING:
    from personactl.store.workspace import Workspace

FORMAT = "personactl.vector/1"
REEXTRACT = "re-extract it (personactl extract --force)"
LAYER_CONVENTION = (
    "row l = residual stream after decoder block l (1-based), row 0 = embeddings; rows 0..L-1 equal "
    "HF hidden_states[l], row L is before the final norm; steering at layer l adds to the output of block l"
)
HOOK_SITE = "output of decoder block l (the residual stream after block l, HF hidden_states[l]) for row l"
PRE_SINK_NOTE = (
    "{path} predates sink-safe extraction: its means and stream norms may include the attention sink "
    "(one massive token), so --norm stream may steer far too hard; it still loads and steers: "
    "re-extract it (personactl extract ... --force) for vectors you can trust"
)
_noted_paths: set[str] = set()


def _note_once(message: str, key: str) -> None:
    if key not in _noted_paths:
        _noted_paths.add(key)
        print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------- the file


@dataclass
class PersonaVector:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> list[str]:
        return list(self.metadata.get("positions", []))

    @property
    def aggregators(self) -> list[str]:
        return list(self.metadata.get("aggregators", []))

    @property
    def rows(self) -> list[int]:
        return list(self.metadata.get("rows", []))

    @property
    def num_layers(self) -> int:
        return int(self.metadata["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.metadata["hidden_size"])

    def get(self, position: str = "response_avg", aggregator: str = "mean_diff") -> torch.Tensor:
        key = f"{aggregator}.{position}"
        if key not in self.tensors:
            have = sorted(k for k in self.tensors if "." in k and not k.startswith(("pos_mean", "neg_mean")))
            raise VectorFileError(f"this vector file has no {key}", hint=f"available: {', '.join(have)}")
        return self.tensors[key]

    def at(self, layer: int, position: str = "response_avg", aggregator: str = "mean_diff") -> torch.Tensor:
        """The `[H]` vector for one layer (same convention as everywhere: row = layer)."""
        if layer not in self.rows:
            raise VectorFileError(
                f"layer {layer} was not extracted", hint=f"extracted layers: {format_ranges(self.rows)}"
            )
        return self.get(position, aggregator)[layer]

    def direction(
        self, layer: int, position: str = "response_avg", aggregator: str = "mean_diff", norm: str = "raw"
    ) -> torch.Tensor:
        """The `[H]` steering direction at `layer`, scaled per `norm` (see `scale_direction`)."""
        vector = self.at(layer, position, aggregator)
        if not torch.isfinite(vector).all() or (norm != "raw" and float(vector.norm()) == 0):
            raise VectorFileError(f"the vector at layer {layer} ({aggregator}.{position}) is not finite and non-zero")
        stream = self.tensors.get("stream_norm")
        stream_norm = float(stream[layer]) if stream is not None else None
        if norm == "stream" and not (stream_norm is not None and stream_norm > 0):
            raise VectorFileError(
                f"--norm stream needs the residual-stream norm at layer {layer}, which this vector file lacks",
                hint="imported vectors carry no stream norms: use --norm raw or unit",
            )
        return scale_direction(vector, norm, stream_norm)

    def check_compatible(self, model_info: dict[str, Any]) -> None:
        """A clear error when this vector was made for a model of another shape."""
        mine = (self.metadata.get("hidden_size"), self.metadata.get("num_layers"))
        theirs = (model_info["hidden_size"], model_info["num_layers"])
        if mine != theirs:
            raise VectorFileError(
                f"vector made for {self.metadata.get('model')} (hidden {mine[0]}, {mine[1]} layers) does not fit "
                f"{model_info['model']} (hidden {theirs[0]}, {theirs[1]} layers)",
                hint="extract vectors for this model, or pass --model with the vector's model",
            )

    @property
    def predates_sinks(self) -> bool:
        """Made from activations (it has stream norms) before sinks were left out of every mean."""
        return "stream_norm" in self.tensors and "sinks" not in self.metadata

    def norms(self, position: str = "response_avg", aggregator: str = "mean_diff") -> torch.Tensor:
        return torch.linalg.vector_norm(self.get(position, aggregator), dim=-1)

    def save(self, path: Path) -> None:
        tensors = {k: v.detach().to("cpu", torch.float32) for k, v in self.tensors.items()}
        write_tagged(path, tensors, FORMAT, self.metadata)

    @classmethod
    def load(cls, path: Path | str, note: Callable[[str, str], None] = _note_once) -> PersonaVector:
        """Read a vector file; one that `predates_sinks` loads as it is, with a note (once per path)."""
        path = Path(path)
        if not path.is_file():
            raise VectorFileError(f"vector file not found: {path}")
        file = read_tagged(path, FORMAT, REEXTRACT, what="personactl vector file")
        validate_against_metadata(file.tensors, file.metadata, path)
        vector = cls(file.tensors, file.metadata)
        if vector.predates_sinks:
            note(PRE_SINK_NOTE.format(path=path), str(path.resolve()))
        return vector


# ---------------------------------------------------------------- finding a vector for a model


@dataclass(frozen=True)
class LoadedVector:
    path: Path
    vector: PersonaVector
    label: str  # the trait name, else the file name: names a chat transcript's workspace directory
    warning: str | None  # set when the vector was made from another model of the same shape


def made_for_other_model(metadata: dict[str, Any], model_info: dict[str, Any]) -> bool:
    """The one compatibility rule beyond shape: compare model fingerprints when both sides have one
    (a new revision of the same hub id counts as another model), else the model spec strings."""
    mine, theirs = metadata.get("model_fingerprint"), model_info.get("model_fingerprint")
    if mine and theirs:
        return mine != theirs
    return metadata.get("model") != model_info.get("model")


class _Source(Protocol):
    @property
    def slug(self) -> str: ...


class DescribedModel(Protocol):
    """What vector loading needs of a loaded model (model.loading.ModelHandle has it)."""

    @property
    def source(self) -> _Source: ...

    def describe(self) -> dict[str, Any]: ...


def load_for_model(workspace: Workspace, spec: str, lm: DescribedModel, persona: str = "model") -> LoadedVector:
    """The one way to find a vector for a loaded model: a file path or a trait name looked up in the
    workspace, refused when made for another shape, and a warning when made for another model of
    the same shape (`made_for_other_model`)."""
    model_info = lm.describe()
    path = workspace.find_vector(spec, lm.source.slug, persona)
    vector = PersonaVector.load(path)
    vector.check_compatible(model_info)
    warning = None
    if made_for_other_model(vector.metadata, model_info):
        warning = (
            f"the vector was extracted from {vector.metadata.get('model')}, you are using "
            f"{model_info['model']} (same shape, so it runs; is that intended?)"
        )
    return LoadedVector(path, vector, str(vector.metadata.get("trait") or path.stem), warning)
