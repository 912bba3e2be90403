"""`personactl import`: a foreign vector file into the workspace as a personactl vector file.

The model is loaded once, to place the file's layers on its rows, check the hidden size and record
its fingerprint, exactly as `extract` records them. Rows the file does not hold are NaN and left out
of `rows`, as in an extracted file; there is no `stream_norm` (it needs activations)."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl import __version__
from personactl.errors import InputError
from personactl.store.interop.foreign import INDEX_MEANING, IndexKind
from personactl.store.vectors import LAYER_CONVENTION, PersonaVector

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.store.workspace import Workspace

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def default_name(source: Path) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "-", source.stem.lower()).strip("-_")
    return name or "imported"


def import_step(
    *,
    settings: Settings,
    workspace: Workspace,
    load: Callable[[], Any],
    source: Path,
    name: str | None,
    position: str | None,
    aggregator: str | None,
    layer: int | None,
    layer_index: IndexKind | None,
    force: bool,
) -> tuple[PersonaVector, dict[str, Any]]:
    from personactl.model.activations import AGGREGATORS, POSITIONS
    from personactl.model.loading import resolve_model
    from personactl.settings import masked_dump
    from personactl.store.interop.detect import read_foreign

    foreign = read_foreign(source, layer=layer, layer_index=layer_index)  # fail on the file before loading a model
    name = name or default_name(source)
    if not NAME_PATTERN.match(name):
        raise InputError(f"bad vector name {name!r}", hint="use lowercase letters, digits, - and _ (--name)")
    exported = foreign.details.get("personactl") if isinstance(foreign.details.get("personactl"), dict) else {}
    position = position or exported.get("position") or "response_avg"
    aggregator = aggregator or exported.get("aggregator") or "mean_diff"
    for value, allowed, flag in ((position, POSITIONS, "--position"), (aggregator, AGGREGATORS, "--aggregator")):
        if value not in allowed:
            raise InputError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    output = workspace.vectors_path(resolve_model(settings.model).slug, name, "model")
    fingerprint = {
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "format": foreign.format,
        "model": settings.model,
        "revision": settings.revision,
        "position": position,
        "aggregator": aggregator,
        "layer": layer,
        "layer_index": foreign.index,
    }
    summary: dict[str, Any] = {"artifact": str(output), "name": name, "model": settings.model, "format": foreign.format}
    if not force and workspace.finished(output, fingerprint):
        return PersonaVector.load(output), {**summary, "skipped": True, "warnings": []}

    lm = load()
    info = lm.describe()
    rows = foreign.to_rows(info["num_layers"], info["hidden_size"], settings.model)
    table = torch.full((info["num_layers"] + 1, info["hidden_size"]), float("nan"))
    for row, vector in rows.items():
        table[row] = vector
    warnings = []
    if exported.get("model") and exported["model"] != settings.model:
        warnings.append(f"the file was exported from a vector for {exported['model']}, imported for {settings.model}")
    metadata = {
        **info,
        "layer_convention": LAYER_CONVENTION,
        "rows": sorted(rows),
        "positions": [position],
        "aggregators": [aggregator],
        "n_pairs": None,
        "n_tokens": None,
        "trait": name,
        "trait_sha256": None,
        "persona": "model",
        "source": "import",
        "judge": None,
        "imported_from": {
            "path": str(source),
            "sha256": fingerprint["source_sha256"],
            "format": foreign.format,
            "layer_index": INDEX_MEANING[foreign.index],
            "file_indices": {foreign.row_of(k, info["num_layers"], settings.model): k for k in foreign.vectors},
            "model_hint": foreign.model_hint,
            "details": foreign.details,
        },
        "personactl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    vector = PersonaVector({f"{aggregator}.{position}": table}, metadata)
    vector.save(output)
    workspace.write_manifest(
        output,
        "vectors",
        fingerprint=fingerprint,
        model=info,
        settings=masked_dump(settings),
        counts={"rows": len(rows)},
        metadata=metadata,
    )
    return vector, {**summary, "skipped": False, "rows": sorted(rows), "warnings": warnings}
