"""`export --steer`: a steering plan resolved from vector files, without a model, for a file.

Each term's vector is found as `export` finds one (a file, or a trait name in the workspace; `NAME:user`
for another persona) and its direction `t` at each of its layers is `PersonaVector.direction` under
`--norm`. Units are those of `steer`: `add` adds α·t; `ablate` (c) and `cap` (τ) set or bound the
projection on the unit direction t/|t|, in raw stream units with `--norm raw` or `unit` and in units of
the layer's mean stream norm with `--norm stream`; `mean-ablate` sets it to VALUE × the projection of
the trait-free mean (`neg_mean`); `cap` at `pNN` or `saved` reads the file's `quantiles.*` tables or
`cap_thresholds` (one rule for steering and export: `store.plan_values`).

The plan file (`personactl.plan/1`) is a tagged safetensors file: a tensor `term{i}.direction`
`[L+1, H]` per term (t on the term's rows, NaN elsewhere) and metadata naming every term (op, layers,
value, unit, and for projection terms the resolved bound per row). Other formats take only `add`
terms, summed per row: what a llama.cpp control vector (or steering-vectors, or a table) applies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl.core.ranges import check_steering_layers
from personactl.core.steer_plan import PlanTerm, parse_term, split_persona
from personactl.errors import InputError, VectorFileError
from personactl.store.plan_values import projection_value
from personactl.store.vectors import HOOK_SITE, LAYER_CONVENTION, PersonaVector

if TYPE_CHECKING:
    from personactl.store.workspace import Workspace

PLAN_FORMAT = "personactl.plan/1"
ORDER = "terms at one layer apply in the order listed, each to the stream the previous one left"
APPLY = {
    "add": "h += value · t[l]",
    "ablate": "h += (bound[l] − h·u)·u with u = t[l]/|t[l]|: the projection on u becomes bound[l]",
    "mean-ablate": "h += (bound[l] − h·u)·u with u = t[l]/|t[l]|: the projection on u becomes bound[l]",
    "cap": "h += (min(h·u, bound[l]) − h·u)·u with u = t[l]/|t[l]|: no projection on u above bound[l]",
}


@dataclass(frozen=True)
class PlanEntry:
    """One term of a plan with its vector found and its direction at each of its layers."""

    term: PlanTerm
    source: Path
    vector: PersonaVector
    position: str
    aggregator: str
    directions: dict[int, torch.Tensor]  # row → t, the direction scaled by --norm
    bounds: dict[int, float]  # row → the projection an ablate/cap/mean-ablate term sets or bounds

    def describe(self, index: int) -> dict[str, Any]:
        meta = self.vector.metadata
        return {
            "index": index,
            "spec": self.term.spec(),
            "vector": str(self.source),
            "trait": meta.get("trait"),
            "op": self.term.op,
            "layers": list(self.term.layers),
            "value": self.term.value,
            "position": self.position,
            "aggregator": self.aggregator,
            "tensor": f"term{index}.direction",
            "apply": APPLY[self.term.op],
            **({"bound": {str(r): b for r, b in self.bounds.items()}} if self.term.op != "add" else {}),
        }


def resolve_terms(
    specs: Sequence[str], *, workspace: Workspace, model_slug: str, position: str, aggregator: str, norm: str
) -> list[PlanEntry]:
    """Every `--steer` term, in order, with its vector loaded (once per file) and its rows checked."""
    loaded: dict[Path, PersonaVector] = {}
    entries = []
    for spec in specs:
        term = parse_term(spec)
        name, persona = split_persona(term.vector)
        path = workspace.find_vector(name, model_slug, persona)
        vector = loaded.setdefault(path.resolve(), PersonaVector.load(path))
        entries.append(_entry(term, path, vector, term.position or position, term.aggregator or aggregator, norm))
    _same_model(entries)
    return entries


def _entry(term: PlanTerm, path: Path, vector: PersonaVector, position: str, aggregator: str, norm: str) -> PlanEntry:
    rows = check_steering_layers(list(term.layers), vector.num_layers)
    directions, bounds = {}, {}
    for row in rows:
        t = vector.direction(row, position, aggregator, norm)
        if term.op != "add" and not float(t.norm()) > 0:
            raise InputError(
                f"--steer {term.spec()}: the vector at layer {row} is zero, so it has no direction to {term.op}"
            )
        directions[row] = t
        if term.op != "add":
            bounds[row] = projection_value(term, vector, path.name, row, (position, aggregator), norm, t)
    return PlanEntry(term, path, vector, position, aggregator, directions, bounds)


def _same_model(entries: list[PlanEntry]) -> None:
    first = entries[0].vector.metadata
    for entry in entries[1:]:
        meta = entry.vector.metadata
        same = (meta.get("model_fingerprint") or meta.get("model")) == (
            first.get("model_fingerprint") or first.get("model")
        )
        if not same or (meta.get("hidden_size"), meta.get("num_layers")) != (
            first.get("hidden_size"),
            first.get("num_layers"),
        ):
            raise VectorFileError(
                f"--steer {entry.term.spec()} is a vector for {meta.get('model')}, but "
                f"{entries[0].term.spec()} is for {first.get('model')}",
                hint="a plan steers one model: use vectors extracted or imported for it",
            )


def summed_adds(entries: list[PlanEntry], fmt: str) -> dict[int, torch.Tensor]:
    """`{row: Σ α·t}` over the plan's add terms; a plan with any other operation is refused, because
    the format can only add (a control vector is added to the stream, whatever the stream holds)."""
    for entry in entries:
        if entry.term.op != "add":
            why = "llama.cpp control vectors only add" if fmt == "gguf" else f"a {fmt} file only adds"
            raise InputError(
                f"cannot export --steer {entry.term.spec()} as {fmt}: {why}, and this term does {entry.term.op}",
                hint="export the plan with --format plan (a .safetensors plan file), or leave that term out",
            )
    rows: dict[int, torch.Tensor] = {}
    for entry in entries:
        alpha = float(entry.term.value or 0.0)
        for row, t in entry.directions.items():
            rows[row] = rows[row] + alpha * t if row in rows else alpha * t
    return dict(sorted(rows.items()))


def write_plan(output: Path, entries: list[PlanEntry], norm: str) -> dict[str, Any]:
    """Write the plan file (atomically) and return what it says about every term."""
    from personactl import __version__
    from personactl.store.tagged_file import write_tagged

    first = entries[0].vector
    tensors = {}
    for index, entry in enumerate(entries):
        table = torch.full((first.num_layers + 1, first.hidden_size), float("nan"))
        for row, t in entry.directions.items():
            table[row] = t
        tensors[f"term{index}.direction"] = table
    terms = [entry.describe(index) for index, entry in enumerate(entries)]
    metadata = {
        "model": first.metadata.get("model"),
        "model_fingerprint": first.metadata.get("model_fingerprint"),
        "num_layers": first.num_layers,
        "hidden_size": first.hidden_size,
        "layer_convention": LAYER_CONVENTION,
        "hook_site": HOOK_SITE,
        "norm": norm,
        "order": ORDER,
        "terms": terms,
        "personactl_version": __version__,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_tagged(output, tensors, PLAN_FORMAT, metadata)
    return {"output": str(output), "format": "plan", "norm": norm, "terms": terms, "hook_site": HOOK_SITE}


def read_plan(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A plan file's tensors and metadata (refused with a clear error when it is not one)."""
    from personactl.store.tagged_file import read_tagged

    if not Path(path).is_file():
        raise InputError(f"plan file not found: {path}")
    file = read_tagged(path, PLAN_FORMAT, "write it again: personactl export --steer ...", what="personactl plan file")
    return file.tensors, file.metadata
