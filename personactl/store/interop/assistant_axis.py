"""assistant-axis files (safety-research/assistant-axis): persona axes and activation-capping configs.

Its layer index is a 0-based decoder block: every activation it reads comes from a forward hook on
`layers[k]` (the residual stream after block k, HF `hidden_states[k+1]`), and its steering and
capping hook the same modules. So its index k is personactl row k + 1; there is no embeddings row.

Two `torch.save`d dicts are recognised:
- an axis: key `axis`, a `[blocks, hidden]` tensor with one row per block of the model (optional
  `metadata`, and from its pipeline `default_mean`, `role_mean`, `n_default`, `n_roles`);
- a capping config: `vectors` maps a name to `{"layer": k, "vector": [hidden]}` and `experiments`
  is a list of `{"id", "interventions": [{"vector": name, "cap": τ}, ...]}`. τ bounds the stream's
  projection on the unit direction v/|v| at block k's output (every token), in raw stream units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from personactl.errors import InputError
from personactl.store.interop.foreign import ForeignVector, as_vector

AXIS = "assistant-axis"
CAPS = "assistant-axis-caps"
CAP_UNIT_MEANING = (
    "τ at row l bounds h·v/|v|: the residual stream after decoder block l projected on the unit "
    "direction, in the stream's raw units (not scaled by --norm), at every token"
)
MAX_IDS_SHOWN = 8


def is_axis(obj: Any) -> bool:
    return isinstance(obj, dict) and "axis" in obj


def is_capping_config(obj: Any) -> bool:
    return isinstance(obj, dict) and "vectors" in obj and "experiments" in obj


def read_axis(obj: dict[str, Any], path: Path) -> ForeignVector:
    """An axis file: row k of `axis` is block k (checked against the model's block count at import)."""
    axis = obj["axis"]
    if not isinstance(axis, torch.Tensor) or axis.dim() != 2:
        shape = list(axis.shape) if isinstance(axis, torch.Tensor) else type(axis).__name__
        raise InputError(
            f"{path}: its axis is {shape}, expected a [blocks, hidden] tensor",
            hint="an assistant-axis axis file holds one row per decoder block",
        )
    vectors = {k: as_vector(axis[k], f"{path}: axis[{k}]") for k in range(axis.shape[0])}
    details: dict[str, Any] = {
        key: obj[key] for key in ("n_default", "n_roles") if isinstance(obj.get(key), (int, float, str))
    }
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        details["metadata"] = {str(k): v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
    return ForeignVector(AXIS, vectors, "block", details=details, full_rows=axis.shape[0])


def experiment_ids(config: dict[str, Any]) -> list[str]:
    return [str(e.get("id")) for e in config["experiments"] if isinstance(e, dict)]


def choose_experiment(config: dict[str, Any], path: Path, wanted: str | None) -> dict[str, Any]:
    """The experiment named `wanted`, or the only one; a clear error otherwise."""
    experiments = config["experiments"]
    if not isinstance(experiments, list) or not experiments:
        raise InputError(f"{path}: the capping config lists no experiments")
    ids = experiment_ids(config)
    shown = ", ".join(ids[:MAX_IDS_SHOWN]) + (f", … ({len(ids)} in all)" if len(ids) > MAX_IDS_SHOWN else "")
    if wanted is None:
        if len(experiments) == 1:
            return experiments[0]
        raise InputError(
            f"{path} holds {len(experiments)} capping experiments: choose one with --experiment ID",
            hint=f"experiments: {shown}",
        )
    for experiment in experiments:
        if isinstance(experiment, dict) and str(experiment.get("id")) == wanted:
            return experiment
    raise InputError(f"{path} has no capping experiment {wanted!r}", hint=f"experiments: {shown}")


def read_capping_config(obj: dict[str, Any], path: Path, experiment_id: str | None) -> ForeignVector:
    """The capped vectors of one experiment, keyed by block, with their thresholds τ."""
    experiment = choose_experiment(obj, path, experiment_id)
    table = obj["vectors"]
    vectors: dict[int, torch.Tensor] = {}
    caps: dict[int, float] = {}
    names: dict[int, str] = {}
    for intervention in experiment.get("interventions") or []:
        if not isinstance(intervention, dict) or "cap" not in intervention:
            continue  # capping reads only interventions that carry a cap
        name = intervention.get("vector")
        entry = table.get(name) if isinstance(table, dict) else None
        if not isinstance(entry, dict) or "layer" not in entry or "vector" not in entry:
            raise InputError(f"{path}: capping intervention names vector {name!r}, which the config does not hold")
        block = entry["layer"]
        if not isinstance(block, int) or isinstance(block, bool):
            raise InputError(f"{path}: vector {name!r} has layer {block!r}, not an integer")
        if block in vectors:
            raise InputError(
                f"{path}: experiment {experiment.get('id')!r} caps two vectors at block {block} "
                f"({names[block]!r}, {name!r})",
                hint="a personactl vector file holds one direction per layer",
            )
        tau = _threshold(intervention["cap"], f"{path}: cap of {name!r}")
        vectors[block] = as_vector(entry["vector"], f"{path}: vector {name!r}")
        caps[block], names[block] = tau, str(name)
    if not vectors:
        raise InputError(f"{path}: experiment {experiment.get('id')!r} caps no vector")
    details = {"experiment": str(experiment.get("id")), "vector_names": {str(k): v for k, v in names.items()}}
    return ForeignVector(CAPS, vectors, "block", details=details, caps=caps)


def _threshold(value: Any, what: str) -> float:
    import math

    try:
        tau = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} is {value!r}, not a number") from None
    if not math.isfinite(tau):
        raise InputError(f"{what} is not finite")
    return tau
