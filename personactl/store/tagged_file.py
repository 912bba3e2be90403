"""The one reader/writer of personactl's tagged safetensors files (vectors, readouts, pair differences).

A tagged file is a safetensors file whose metadata values are JSON strings and whose `format` value
names what it is (`personactl.vector/1`, ...). Writes are atomic (`store.atomic`). A truncated
download, a file overwritten by another tool or metadata edited by hand makes safetensors (or json)
raise its own exception types; `read_tagged` turns those, and a file tagged as something else, into
one VectorFileError naming the file and how to remake it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personactl.errors import PersonactlError, VectorFileError
from personactl.store.atomic import atomic_path

if TYPE_CHECKING:
    import torch

FORMAT_KEY = "format"


@dataclass(frozen=True)
class TaggedFile:
    """What a tagged file holds: tensors by name and its metadata decoded from JSON, the tag left out."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]


def write_tagged(path: Path, tensors: Mapping[str, torch.Tensor], format: str, metadata: Mapping[str, Any]) -> None:
    """Write `tensors` with `metadata` (each value as JSON) tagged `format`, atomically."""
    from safetensors.torch import save_file

    encoded = {key: json.dumps(value) for key, value in {FORMAT_KEY: format, **metadata}.items()}
    contiguous = {key: tensor.contiguous() for key, tensor in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(contiguous, str(tmp), metadata=encoded)


def read_tagged(
    path: Path | str, expected_format: str, hint: str, *, what: str, keys: Collection[str] | None = None
) -> TaggedFile:
    """The tensors (all, or those of `keys` the file has) and metadata of a file tagged `expected_format`.

    A corrupt file, or one tagged otherwise ("`path` is not a `what` (format=...)"), is a
    VectorFileError with `hint`; a missing file is the caller's to report (each names its own remedy)."""
    from safetensors import safe_open

    with _reading(path, hint), safe_open(str(path), framework="pt") as f:
        metadata = _decoded_metadata(f.metadata())
        found = metadata.pop(FORMAT_KEY, None)
        if found != expected_format:
            raise VectorFileError(f"{path} is not a {what} (format={found!r})", hint=hint)
        wanted = [key for key in f.keys() if keys is None or key in keys]
        return TaggedFile({key: f.get_tensor(key) for key in wanted}, metadata)


@contextmanager
def _reading(path: Path | str, hint: str) -> Iterator[None]:
    """Turn any failure to parse `path` inside the block into a VectorFileError with `hint`;
    project errors and operating-system failures (permissions, a full disk) pass unchanged."""
    try:
        yield
    except (PersonactlError, OSError):
        raise
    except Exception as exc:  # safetensors and json raise their own types for corrupt content
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VectorFileError(f"{path} is not a readable safetensors file: {reason}", hint=hint) from None


def _decoded_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    """The string→string safetensors metadata with each value parsed as the JSON it was written as."""
    return {key: json.loads(value) for key, value in (raw or {}).items()}
