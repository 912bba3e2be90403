"""llama.cpp control vectors (GGUF), the format repeng's `export_gguf` writes too.

Layout: GGUF v3 with `general.architecture = "controlvector"`, `controlvector.model_hint`
(string), `controlvector.layer_count` (u32, the number of direction tensors) and one 1-D F32 tensor
`direction.k` per steered block. llama.cpp adds `direction.k` to the output of 0-based block k
(personactl row k+1), reads only the tensors, and rejects a file holding `direction.0`; repeng
indexes the same way (its layer k reads `hidden_states[k+1]`). personactl adds one string key,
`personactl.metadata` (JSON), that both ignore and that `import` reads back as provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from personactl.errors import InputError
from personactl.store.interop.foreign import ForeignVector, as_vector

ARCH = "controlvector"
METADATA_KEY = "personactl.metadata"
LLAMA_CPP_MIN_BLOCK = 1  # llama.cpp refuses direction.0, the output of the first block


def write_control_vector(
    path: Path, directions: dict[int, torch.Tensor], model_hint: str, metadata: dict[str, Any]
) -> None:
    """Write `{block: vector}` as a control vector file, atomically."""
    import gguf

    from personactl.store.workspace import atomic_path

    with atomic_path(Path(path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        writer.add_string(METADATA_KEY, json.dumps(metadata, default=str))
        for block in sorted(directions):
            writer.add_tensor(f"direction.{block}", directions[block].detach().to("cpu", torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _field(reader: Any, name: str) -> Any:
    """A scalar or string GGUF field (read through `parts`, which every gguf version has)."""
    field = reader.get_field(name)
    if field is None or not len(field.data):
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if len(value) else None


def read_control_vector(path: Path) -> ForeignVector:
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise InputError(
            f"{path} is not a readable GGUF file: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise InputError(
            f"{path} is a GGUF file for {arch!r}, not a control vector",
            hint='control vectors have general.architecture = "controlvector" (llama.cpp, repeng)',
        )
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if match is None:
            raise InputError(f"{path}: unexpected tensor {tensor.name!r} in a control vector (only direction.N)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InputError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, not F32")
        data = np.array(tensor.data, dtype=np.float32, copy=True)  # the reader's arrays are views of a memory map
        vectors[int(match.group(1))] = as_vector(torch.from_numpy(data), f"{path}: {tensor.name}")
    raw = _field(reader, METADATA_KEY)
    details = {
        "model_hint": _field(reader, f"{ARCH}.model_hint"),
        "layer_count": _field(reader, f"{ARCH}.layer_count"),
        "gguf_version": _field(reader, "GGUF.version"),
    }
    if raw:
        try:
            details["personactl"] = json.loads(raw)
        except json.JSONDecodeError:
            details["personactl"] = raw
    if not vectors:
        raise InputError(f"{path} is a control vector file without direction tensors")
    return ForeignVector("gguf", vectors, "block", model_hint=details["model_hint"], details=details)
