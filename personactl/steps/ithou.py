"""The I-Thou vector: model persona ("I am X") minus user persona ("you are X").

Both vectors come from the same trait, model and spans, so their difference at the same position and
row isolates who has the trait. Saved as an ordinary vector file (`mean_diff.<position>`), so
`steer`, `compare`, `show` and `export` use it as they use any vector: α > 0 pushes towards
"I am X", α < 0 towards "you are X".
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl import __version__
from personactl.errors import VectorFileError
from personactl.steps.skeleton import RunArtifact
from personactl.store.vectors import PersonaVector

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

MODEL_KEYS = ("model", "model_kind", "model_fingerprint", "architecture", "num_layers", "hidden_size", "dtype")


def ithou_vector(model_vec: PersonaVector, user_vec: PersonaVector, model_path: Path, user_path: Path) -> PersonaVector:
    """`mean_diff.<p>` = model − user at every position and row both have (other rows NaN)."""
    if model_vec.metadata.get("persona") != "model" or user_vec.metadata.get("persona") != "user":
        raise VectorFileError("the I-Thou vector needs a model-persona and a user-persona vector")
    for key in ("model", "num_layers", "hidden_size", "trait"):
        if model_vec.metadata.get(key) != user_vec.metadata.get(key):
            raise VectorFileError(
                f"model and user vectors differ in {key}: "
                f"{model_vec.metadata.get(key)} vs {user_vec.metadata.get(key)}",
                hint="extract both personas of one trait with one model",
            )
    positions = [p for p in model_vec.positions if p in user_vec.positions]
    rows = sorted(set(model_vec.rows) & set(user_vec.rows))
    if not positions or not rows:
        raise VectorFileError("the model and user vectors share no position and layer")
    n_rows = model_vec.num_layers + 1
    keep = torch.zeros(n_rows, dtype=torch.bool)
    keep[rows] = True
    tensors: dict[str, torch.Tensor] = {}
    for position in positions:
        diff = model_vec.get(position, "mean_diff") - user_vec.get(position, "mean_diff")
        tensors[f"mean_diff.{position}"] = torch.where(keep[:, None], diff, torch.full_like(diff, float("nan")))
    if "stream_norm" in model_vec.tensors:
        tensors["stream_norm"] = model_vec.tensors["stream_norm"]

    def source(vec: PersonaVector, path: Path) -> dict[str, Any]:
        return {
            "path": str(path),
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "n_pairs": vec.metadata.get("n_pairs"),
            "judge": vec.metadata.get("judge"),
            "filter": vec.metadata.get("filter"),
        }

    metadata = {
        **{k: model_vec.metadata[k] for k in MODEL_KEYS if k in model_vec.metadata},
        "layer_convention": model_vec.metadata.get("layer_convention"),
        "rows": rows,
        "positions": positions,
        "aggregators": ["mean_diff"],
        "n_pairs": min(int(model_vec.metadata.get("n_pairs", 0)), int(user_vec.metadata.get("n_pairs", 0))),
        "trait": model_vec.metadata.get("trait"),
        "trait_sha256": model_vec.metadata.get("trait_sha256"),
        "persona": "ithou",
        "recipe": "mean_diff(model persona) - mean_diff(user persona), same position and row; "
        "positive = 'I am X', negative = 'you are X'",
        "command": f"personactl extract --trait {model_vec.metadata.get('trait')} --i-thou",
        "sources": {"model": source(model_vec, model_path), "user": source(user_vec, user_path)},
        "stream_norm": "the model-persona file's stream norms",
        **(
            {"sinks": model_vec.metadata["sinks"]}
            if "sinks" in model_vec.metadata and "sinks" in user_vec.metadata
            else {}
        ),
        "personactl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return PersonaVector(tensors, metadata)


def ithou_step(*, settings: Settings, workspace: Workspace, trait: Trait) -> tuple[PersonaVector, dict[str, Any]]:
    """`personactl extract --trait T --i-thou`: from the two extracted vector files, no model run;
    made anew on every call (a subtraction), so its manifest has no fingerprint."""
    from personactl.model.loading import resolve_model

    slug = resolve_model(settings.model).slug
    paths = {}
    for persona in ("model", "user"):
        path = workspace.vectors_path(slug, trait.name, persona)
        if not path.is_file():
            raise VectorFileError(
                f"no {persona}-persona vectors for {trait.name} in {workspace.root}",
                hint=f"run: personactl extract --trait {trait.name} --persona {persona}",
            )
        paths[persona] = path
    vector = ithou_vector(PersonaVector.load(paths["model"]), PersonaVector.load(paths["user"]), *paths.values())
    summary = {"name": trait.name, "model": settings.model}
    out = RunArtifact(workspace, workspace.vectors_path(slug, trait.name, "ithou"), "vectors", summary=summary)
    vector.save(out.path)
    out.commit(None, metadata=vector.metadata, model={"model": settings.model})
    return vector, out.done()
