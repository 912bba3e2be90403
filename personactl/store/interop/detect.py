"""Which family a vector file belongs to, by content first and extension second."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from personactl.errors import InputError
from personactl.store.interop.foreign import ForeignVector, IndexKind

FIXED_INDEX = {
    "gguf",
    "steering-vectors",
    "assistant-axis",
    "assistant-axis-caps",
}  # formats whose layer numbering is part of the format


def sniff(path: Path) -> str:
    """`gguf`, `torch`, `json` or `safetensors`; a clear error for anything else."""
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch's zip container, or a legacy pickle
        return "torch"
    if path.suffix.lower() == ".json" or head.lstrip()[:1] == b"{":
        return "json"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len < path.stat().st_size:
            return "safetensors"
    raise InputError(
        f"{path}: unknown vector file format",
        hint="personactl imports llama.cpp/repeng .gguf control vectors, torch .pt files "
        "(steering-vectors, [L+1, hidden] tensors, assistant-axis axes and capping configs) and JSON + tensor pairs",
    )


def read_foreign(
    path: Path, *, layer: int | None = None, layer_index: IndexKind | None = None, experiment: str | None = None
) -> ForeignVector:
    """Read any supported foreign vector file (nothing here knows the target model yet)."""
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                fmt = json.loads((f.metadata() or {}).get("format", "null"))
        except Exception:  # safetensors raises its own error types; a bad header is simply not ours
            fmt = None
        if isinstance(fmt, str) and fmt.startswith("personactl.plan"):
            raise InputError(
                f"{path} is a personactl steering plan (export --steer), not one vector",
                hint="import takes a vector file; a plan's terms are listed in its metadata",
            )
        if fmt:
            raise InputError(
                f"{path} is already a personactl vector file ({fmt})",
                hint="use it as it is: personactl steer --vector FILE, personactl show FILE",
            )
        raise InputError(
            f"{path} is a safetensors file without personactl metadata", hint="describe it with a JSON pair"
        )
    if experiment is not None and kind != "torch":
        raise InputError("--experiment applies only to an assistant-axis capping config (a .pt file)")
    if kind == "gguf":
        from personactl.store.interop.gguf_cv import read_control_vector

        foreign = read_control_vector(path)
    elif kind == "json":
        from personactl.store.interop.json_pair import read_json_pair

        foreign = read_json_pair(path, layer_index=layer_index)
    else:
        from personactl.store.interop.torch_files import read_torch_file

        foreign = read_torch_file(path, layer=layer, layer_index=layer_index, experiment=experiment)
    if foreign.format in FIXED_INDEX and layer_index is not None:
        raise InputError(f"--layer-index does not apply to {foreign.format} files: their numbering is fixed")
    if layer is not None and not foreign.details.get("layer_from_cli"):
        raise InputError("--layer applies only to a file holding one bare 1-D vector")
    return foreign
