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
from personactl.steps.skeleton import StepArtifact
from personactl.store.interop.foreign import INDEX_MEANING, ForeignVector, IndexKind
from personactl.store.vectors import HOOK_SITE, LAYER_CONVENTION, PersonaVector

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel
    from personactl.settings import Settings
    from personactl.store.workspace import Workspace

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
CAP_THRESHOLDS = "cap_thresholds"  # metadata key: τ per row for `cap`, as a capping config gave them


def default_name(source: Path) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "-", source.stem.lower()).strip("-_")
    return name or "imported"


def exported_details(foreign: ForeignVector) -> dict[str, Any]:
    """What `personactl export` wrote into the file about the vector it came from (empty otherwise)."""
    exported = foreign.details.get("personactl")
    return exported if isinstance(exported, dict) else {}


def choose_names(
    source: Path, name: str | None, position: str | None, aggregator: str | None, exported: dict[str, Any]
) -> tuple[str, str, str]:
    """The vector's name, position and aggregator: as given, else as exported, else the defaults;
    refused when not a valid name or not a known position or aggregator."""
    from personactl.core.choices import AGGREGATORS, POSITIONS

    name = name or default_name(source)
    if not NAME_PATTERN.match(name):
        raise InputError(f"bad vector name {name!r}", hint="use lowercase letters, digits, - and _ (--name)")
    position = position or exported.get("position") or "response_avg"
    aggregator = aggregator or exported.get("aggregator") or "mean_diff"
    for value, allowed, flag in ((position, POSITIONS, "--position"), (aggregator, AGGREGATORS, "--aggregator")):
        if value not in allowed:
            raise InputError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    return name, position, aggregator


def placed_rows(rows: dict[int, torch.Tensor], num_layers: int, hidden_size: int) -> torch.Tensor:
    """`[L+1, H]` with the file's vectors on their rows and NaN on every other row."""
    table = torch.full((num_layers + 1, hidden_size), float("nan"))
    for row, vector in rows.items():
        table[row] = vector
    return table


def imported_metadata(
    info: dict[str, Any],
    foreign: ForeignVector,
    rows: dict[int, torch.Tensor],
    *,
    name: str,
    position: str,
    aggregator: str,
    source: Path,
    source_sha256: str,
    model: str,
) -> dict[str, Any]:
    """The vector file's metadata, as `extract` writes it, plus where the file was imported from and
    where (and, for a capping config, how) its rows act."""
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
            "sha256": source_sha256,
            "format": foreign.format,
            "layer_index": INDEX_MEANING[foreign.index],
            "file_indices": {foreign.row_of(k, info["num_layers"], model): k for k in foreign.vectors},
            "model_hint": foreign.model_hint,
            "details": foreign.details,
        },
        "hook_site": HOOK_SITE,
        "operation": "cap" if foreign.caps else "add",
        "personactl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if foreign.caps:
        metadata[CAP_THRESHOLDS] = cap_thresholds(foreign, info["num_layers"], model, f"{aggregator}.{position}")
    return metadata


def cap_thresholds(foreign: ForeignVector, num_layers: int, model: str, slot: str) -> dict[str, Any]:
    """The `cap_thresholds` metadata entry: τ per row (JSON keys are strings) and what τ means."""
    from personactl.store.interop.assistant_axis import CAP_UNIT_MEANING

    return {
        "rows": {str(row): tau for row, tau in foreign.cap_rows(num_layers, model).items()},
        "unit": "projection",
        "meaning": CAP_UNIT_MEANING,
        "positions": "all",
        "slot": slot,
        "source": foreign.format,
        "experiment": foreign.details.get("experiment"),
    }


def import_step(
    *,
    settings: Settings,
    workspace: Workspace,
    load: Callable[[], LoadedModel],
    source: Path,
    name: str | None,
    position: str | None,
    aggregator: str | None,
    layer: int | None,
    layer_index: IndexKind | None,
    force: bool,
    experiment: str | None = None,
) -> tuple[PersonaVector, dict[str, Any]]:
    """`personactl import`: read the foreign file (before loading a model), place its layers on the
    model's rows, save it as a vector file with its manifest."""
    from personactl.model.loading import resolve_model
    from personactl.store.interop.detect import read_foreign

    # fail on the file before loading a model
    foreign = read_foreign(source, layer=layer, layer_index=layer_index, experiment=experiment)
    exported = exported_details(foreign)
    name, position, aggregator = choose_names(source, name, position, aggregator, exported)
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
        **({"experiment": experiment} if experiment is not None else {}),
    }
    summary = {"name": name, "model": settings.model, "format": foreign.format}
    out = StepArtifact(workspace, output, "vectors", fingerprint, summary)
    if out.current(force):
        return PersonaVector.load(output), out.skipped(warnings=[])

    info = load().describe()
    rows = foreign.to_rows(info["num_layers"], info["hidden_size"], settings.model)
    warnings = []
    if exported.get("model") and exported["model"] != settings.model:
        warnings.append(f"the file was exported from a vector for {exported['model']}, imported for {settings.model}")
    metadata = imported_metadata(
        info,
        foreign,
        rows,
        name=name,
        position=position,
        aggregator=aggregator,
        source=source,
        source_sha256=fingerprint["source_sha256"],
        model=settings.model,
    )
    table = placed_rows(rows, info["num_layers"], info["hidden_size"])
    vector = PersonaVector({f"{aggregator}.{position}": table}, metadata)
    vector.save(output)
    out.commit(None, settings=settings, model=info, counts={"rows": len(rows)}, metadata=metadata)
    caps = metadata.get(CAP_THRESHOLDS)
    extra = {"cap_thresholds": caps["rows"], "experiment": caps["experiment"]} if caps else {}
    return vector, out.done(rows=sorted(rows), warnings=warnings, **extra)
