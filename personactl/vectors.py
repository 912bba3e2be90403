"""PersonaVector (a safetensors file that describes itself) and the pure math on vectors.

File layout: tensors `<aggregator>.<position>` of shape `[L+1, hidden]` (rows not computed are
NaN), `pos_mean.<position>`, `neg_mean.<position>`, and `stream_norm` `[L+1]`. Metadata values
are JSON strings; `layer_convention` spells out what row `l` means.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personactl.errors import VectorFileError
from personactl.ranges import format_ranges

FORMAT = "personactl.vector/1"
LAYER_CONVENTION = (
    "row l = residual stream after decoder block l (1-based), row 0 = embeddings; rows 0..L-1 equal "
    "HF hidden_states[l], row L is before the final norm; steering at layer l adds to the output of block l"
)
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


# ---------------------------------------------------------------- pure math


def unit(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=eps)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (per layer for `[L+1, H]` inputs)."""
    return (unit(a.double()) * unit(b.double())).sum(-1).float()


def principal_direction(scatter: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """First principal direction of pair differences from their (uncentred) scatter `Σ d dᵀ`.

    Uncentred, so the direction captures the consistent pos→neg shift weighted by how much pairs
    agree; unit norm, sign chosen to agree with `reference` (the mean difference). `[R,H,H] -> [R,H]`.
    fp32 `eigh` (2.6× faster than fp64 on CPU; a fixed cost per layer, independent of the data size).
    Rows where every difference is exactly zero have no direction: they come back as NaN."""
    _, eigvecs = torch.linalg.eigh(scatter.float())
    top = eigvecs[..., -1]  # eigh sorts eigenvalues ascending
    return _oriented(top, reference, scatter.diagonal(dim1=-2, dim2=-1).sum(-1) == 0)


def principal_direction_of_rows(diffs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`principal_direction` of the scatter of `diffs` `[R, N, H]`, without forming it when N < H.

    The top eigenvector of DᵀD is Dᵀu/‖Dᵀu‖ for u the top eigenvector of the N×N Gram matrix DDᵀ,
    so with fewer pairs than hidden units the eigh runs on the smaller side (for 64 pairs of a
    576-wide model, 64² instead of 576²; for a 3584-wide model the H×H eigh costs seconds a layer).
    The small eigh runs on the CPU, where every backend has one; the matmuls stay on `diffs`' device."""
    d = diffs.float()
    if d.shape[-2] >= d.shape[-1]:
        return principal_direction((d.transpose(-1, -2) @ d).cpu(), reference.cpu())
    gram = d @ d.transpose(-1, -2)  # [R, N, N]
    _, eigvecs = torch.linalg.eigh(gram.cpu())
    top = torch.einsum("rn,rnh->rh", eigvecs[..., -1].to(d.device), d).cpu()
    return _oriented(top, reference.cpu(), gram.diagonal(dim1=-2, dim2=-1).sum(-1).cpu() == 0)


def _oriented(top: torch.Tensor, reference: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Unit `top` rows signed to agree with `reference`; rows flagged `empty` (no spread) are NaN."""
    top = top.double()
    sign = torch.sign((top * reference.double()).sum(-1, keepdim=True))
    sign[sign == 0] = 1
    out = unit(top * sign).float()
    out[empty] = float("nan")
    return out


NORM_MODES = ("raw", "unit", "stream")


def scale_direction(vector: torch.Tensor, mode: str, stream_norm: float | None = None) -> torch.Tensor:
    """`raw`: as extracted; `unit`: norm 1; `stream`: norm = the layer's mean residual-stream norm,
    so that α = 1 means "one typical residual-stream length" at any layer of any model."""
    if mode == "raw":
        return vector
    if mode == "unit":
        return unit(vector)
    if mode == "stream":
        if stream_norm is None or not stream_norm > 0:
            raise ValueError("stream normalisation needs the layer's stream norm")
        return unit(vector) * stream_norm
    raise ValueError(f"unknown norm mode {mode!r}")


def project(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Scalar projection of activations onto a direction (unit-normalised)."""
    return (hidden.float() * unit(direction.float())).sum(-1)


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
        from safetensors.torch import save_file

        from personactl.workspace import atomic_path

        metadata = {k: json.dumps(v) for k, v in {"format": FORMAT, **self.metadata}.items()}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors.items()}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: Path | str, note: Callable[[str, str], None] = _note_once) -> PersonaVector:
        """Read a vector file; one that `predates_sinks` loads as it is, with a note (once per path)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise VectorFileError(f"vector file not found: {path}")
        from personactl.tagged_file import decoded_metadata, reading

        with reading(path, hint="re-extract it (personactl extract --force)"):
            with safe_open(str(path), framework="pt") as f:
                metadata = decoded_metadata(f.metadata())
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != FORMAT:
            raise VectorFileError(f"{path} is not a personactl vector file (format={metadata.get('format')!r})")
        metadata.pop("format")
        from personactl.vector_checks import validate_against_metadata

        validate_against_metadata(tensors, metadata, path)
        vector = cls(tensors, metadata)
        if vector.predates_sinks:
            note(PRE_SINK_NOTE.format(path=path), str(path.resolve()))
        return vector
