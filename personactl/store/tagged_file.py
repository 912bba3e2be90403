"""Reading personactl's tagged safetensors files (vectors, readouts, pair differences) safely.

A truncated download, a file overwritten by another tool or metadata edited by hand makes
safetensors (or json) raise its own exception types deep inside a loader; the CLI would report
those as an internal error. Every loader reads inside `reading()`, so any such failure is one
VectorFileError naming the file and how to remake it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from personactl.errors import PersonactlError, VectorFileError


@contextmanager
def reading(path: Path | str, hint: str) -> Iterator[None]:
    """Turn any failure to parse `path` inside the block into a VectorFileError with `hint`;
    project errors and operating-system failures (permissions, a full disk) pass unchanged."""
    try:
        yield
    except (PersonactlError, OSError):
        raise
    except Exception as exc:  # safetensors and json raise their own types for corrupt content
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VectorFileError(f"{path} is not a readable safetensors file: {reason}", hint=hint) from None


def decoded_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    """The string→string safetensors metadata with each value parsed as the JSON it was written as."""
    return {key: json.loads(value) for key, value in (raw or {}).items()}
