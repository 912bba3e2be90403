"""Files written with `torch.save`, read with `torch.load(weights_only=True)`: never unpickled code.

Recognised contents: an `[L+1, H]` tensor (persona_vectors' layout, row = `hidden_states` index;
`[L, H]` with one row per block when the user says `block`);
a 1-D tensor (its layer given by the user); a steering-vectors `SteeringVector`, pickled whole or as
`{"layer_activations": {block: [H]}, "layer_type": "decoder_block"}` (block k = personactl row
k+1: it hooks the output of the k-th decoder block); a dict `{"vector", "layer", "model", ...}`;
assistant-axis axes and capping configs (`assistant_axis`)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from personactl.errors import InputError
from personactl.store.interop.foreign import ForeignVector, IndexKind, as_vector

STEERING_VECTOR_GLOBAL = "steering_vectors.steering_vector.SteeringVector"
DECODER_BLOCK = "decoder_block"


class SteeringVectorFields:
    """Stands in for steering-vectors' `SteeringVector` while unpickling, allow-listed under that
    class's name: the weights-only unpickler then only sets its fields, and the package (which pins
    transformers < 5) need not be installed."""


def load_weights_only(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([(SteeringVectorFields, STEERING_VECTOR_GLOBAL)]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it pickles {found.group(1)}" if found else "it holds more than tensors and plain containers"
        raise InputError(
            f"{path} is not a weights-only file: {what}",
            hint="personactl loads .pt files only with torch.load(weights_only=True); "
            "re-save the vectors as plain tensors or dicts of tensors",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path} is not a readable torch file: {first}") from None


def steering_vector_payload(rows: dict[int, torch.Tensor]) -> dict[str, Any]:
    """`SteeringVector(**torch.load(path, weights_only=True))` rebuilds it: rows become blocks."""
    return {
        "layer_activations": {row - 1: v.detach().to("cpu", torch.float32).clone() for row, v in sorted(rows.items())},
        "layer_type": DECODER_BLOCK,
    }


def _from_steering_vector(fields: dict[str, Any], path: Path) -> ForeignVector:
    layer_type = fields.get("layer_type", DECODER_BLOCK)
    if layer_type != DECODER_BLOCK:
        raise InputError(
            f"{path} is a steering vector for {layer_type!r} outputs, not for the residual stream",
            hint='only layer_type "decoder_block" adds to the stream a personactl vector describes',
        )
    activations = fields.get("layer_activations")
    if not isinstance(activations, dict) or not all(isinstance(k, int) for k in activations):
        raise InputError(f"{path}: layer_activations is not a dict of layer number -> tensor")
    vectors = {k: as_vector(v, f"{path}: layer_activations[{k}]") for k, v in activations.items()}
    return ForeignVector("steering-vectors", vectors, "block", details={"layer_type": layer_type})


def single_vector(
    record: dict[str, Any], source: str, layer_index: IndexKind | None, vector: Any = None
) -> ForeignVector:
    """One vector at one layer, described by `layer` (a row) or `layer_idx` (a 0-based block), as
    persona-toolkit style files do; `layer_index` overrides how the number is read."""
    if "layer" in record:
        number, kind = record["layer"], "row"
    elif "layer_idx" in record:
        number, kind = record["layer_idx"], "block"
    else:
        raise InputError(f"{source} does not say which layer its vector is for", hint='add "layer": N (a row)')
    kind = record.get("layer_index", kind) if layer_index is None else layer_index
    if kind not in ("row", "block"):
        raise InputError(f"{source}: layer_index {kind!r} is not row or block")
    if not isinstance(number, int) or isinstance(number, bool):
        raise InputError(f"{source}: the layer {number!r} is not an integer")
    values = as_vector(record["vector"] if vector is None else vector, f"{source}: vector")
    hidden = record.get("hidden_size", record.get("hidden_dim"))
    if hidden is not None and hidden != values.numel():
        raise InputError(f"{source} says hidden size {hidden} but its vector has {values.numel()} values")
    details = {k: v for k, v in record.items() if k != "vector" and isinstance(v, (str, int, float, bool, type(None)))}
    return ForeignVector("json", {number: values}, kind, model_hint=record.get("model"), details=details)


def read_torch_file(
    path: Path, *, layer: int | None, layer_index: IndexKind | None, experiment: str | None = None
) -> ForeignVector:
    from personactl.store.interop import assistant_axis

    obj = load_weights_only(path)
    if assistant_axis.is_capping_config(obj):
        return assistant_axis.read_capping_config(obj, path, experiment)
    if experiment is not None:
        raise InputError("--experiment applies only to an assistant-axis capping config")
    if assistant_axis.is_axis(obj):
        return assistant_axis.read_axis(obj, path)
    if isinstance(obj, SteeringVectorFields):
        return _from_steering_vector(vars(obj), path)
    if isinstance(obj, dict) and "layer_activations" in obj:
        return _from_steering_vector(obj, path)
    if isinstance(obj, dict) and "vector" in obj:
        foreign = single_vector(obj, str(path), layer_index)
        foreign.format = "pt"
        return foreign
    if isinstance(obj, torch.Tensor) and obj.dim() == 2:
        table = obj.detach().to("cpu", torch.float32)
        absent = torch.isnan(table).all(dim=-1)  # rows a tool left out are NaN throughout
        vectors = {r: as_vector(table[r], f"{path}: row {r}") for r in range(table.shape[0]) if not absent[r]}
        if not vectors:
            raise InputError(f"{path}: every row is NaN")
        return ForeignVector("pt", vectors, layer_index or "row", full_rows=table.shape[0])
    if isinstance(obj, torch.Tensor) and obj.dim() == 1:
        if layer is None:
            raise InputError(
                f"{path} holds one vector without a layer", hint="pass --layer N (a row: N = output of block N)"
            )
        return ForeignVector(
            "pt", {layer: as_vector(obj, str(path))}, layer_index or "row", details={"layer_from_cli": True}
        )
    shape = list(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
    raise InputError(
        f"{path} holds {shape}, which is not a vector file personactl knows",
        hint="expected an [L+1, hidden] tensor, a 1-D tensor with --layer, a steering-vectors SteeringVector "
        'or its {"layer_activations", "layer_type"} dict, a {"vector", "layer", "model"} dict, '
        "or an assistant-axis axis or capping config",
    )
