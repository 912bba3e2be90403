"""A JSON description beside a tensor file: `{"vector": "evil.pt", "layer": 16, "model": "...", ...}`.

`vector` is a path relative to the JSON file (`.pt`, `.safetensors` or `.npy`, read without
unpickling) or the numbers inline. `layer` is a personactl row (= HF `hidden_states` index);
`layer_idx` is a 0-based decoder block (Janus-style files, whose tensor is `<stem>.pt` beside the
JSON and whose `-1` means the last block); a `layer_index` of "row" or "block" says so explicitly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from personactl.errors import InputError
from personactl.store.interop.foreign import ForeignVector, IndexKind
from personactl.store.interop.torch_files import load_weights_only, single_vector
from personactl.store.text_input import read_user_text


def _load_tensor(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"the vector file {path} named by the JSON does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return load_weights_only(path)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise InputError(f"{path} holds {len(tensors)} tensors; the JSON format needs exactly one")
        return next(iter(tensors.values()))
    if suffix == ".npy":
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise InputError(f"{path} is not a plain .npy array: {exc}") from None
    raise InputError(f"{path}: unknown tensor file type {suffix!r}", hint="use .pt, .safetensors or .npy")


def read_json_pair(path: Path, *, layer_index: IndexKind | None) -> ForeignVector:
    try:
        record = json.loads(read_user_text(path, "vector record"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a readable JSON file: {exc}") from None
    if not isinstance(record, dict):
        raise InputError(f"{path} holds a JSON {type(record).__name__}, not an object")
    reference = record.get("vector")
    if reference is None and "layer_idx" in record:
        reference = path.with_suffix(".pt").name  # Janus saves the tensor beside the JSON
    if isinstance(reference, str):
        vector = _load_tensor((path.parent / reference).resolve())
    elif isinstance(reference, list):
        vector = reference
    else:
        raise InputError(f'{path} has no "vector" (a tensor file name or a list of numbers)')
    return single_vector(record, str(path), layer_index, vector=vector)


def write_json_pair(path: Path, row: int, vector: torch.Tensor, fields: dict[str, Any]) -> Path:
    """Write `<stem>.pt` (a 1-D tensor) and the JSON naming it; returns the tensor's path."""
    from personactl.store.workspace import atomic_path, atomic_write_text

    tensor_path = path.with_suffix(".pt")
    with atomic_path(tensor_path) as tmp:
        torch.save(vector.detach().to("cpu", torch.float32).clone(), tmp)
    record = {"vector": tensor_path.name, "layer": row, "layer_index": "row", **fields}
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return tensor_path
