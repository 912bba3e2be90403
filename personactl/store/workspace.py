"""The workspace: where artifacts live, their manifests, and each trait directory's writer lock.

Layout (one directory per model and trait; an artifact sits next to its manifest):

    <workspace>/<model-slug>/<trait>/responses-<persona>.parquet
                                    responses-<persona>.manifest.json
                                    responses-<persona>.shards/   (only while generating)
                                    scores-<persona>.parquet
                                    vectors-<persona>.safetensors  (persona: model, user or ithou)
                                    vectors-<persona>.manifest.json
                                    pair-diffs-<persona>.safetensors
                                    steer-<time>-<pid>.parquet, eval-<key>.parquet (+ eval-<key>.<what>.*)
                                    chat-<time>-<pid>.json   (a chat transcript; <trait> = the vector's label)
                                    .personactl.lock   (workspace_lock)
    <workspace>/<model-slug>/readouts/<name>.safetensors   (readout train)
    <workspace>/judge-cache.sqlite

A method here names each of these paths. Inside one artifact's own paths, its writer names the parts:
generate the batch files in its shards directory, eval the `eval-<key>.<what>.*` files beside its table.

Every write goes to a temporary name in the same directory and is moved into place with
`os.replace` (`store/atomic.py`), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personactl import __version__
from personactl.errors import WorkspaceError
from personactl.store.atomic import atomic_path, atomic_write_text, write_error
from personactl.store.workspace_lock import hold_directory_lock

if TYPE_CHECKING:
    import polars as pl

    from personactl.store.traits import Trait

__all__ = ["MANIFEST_SUFFIX", "Workspace", "atomic_path", "atomic_write_text", "read_table", "slugify", "write_error"]

MANIFEST_SUFFIX = ".manifest.json"


def read_table(path: Path) -> pl.DataFrame:
    """A parquet artifact; a clear error naming the file when it is truncated or not parquet."""
    import polars as pl

    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise WorkspaceError(
            f"cannot read {path}: {detail}", hint="delete it and rerun the step that writes it (or rerun with --force)"
        ) from None


def slugify(text: str) -> str:
    """A file-system-safe name: `HuggingFaceTB/SmolLM2-135M` -> `HuggingFaceTB--SmolLM2-135M`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-.")
    return slug or "unnamed"


def environment_versions() -> dict[str, str]:
    """Versions that decide numerics, recorded in every manifest (only already-imported packages)."""
    versions = {"personactl": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "polars", "safetensors"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


@dataclass(frozen=True)
class Workspace:
    root: Path

    def ensure_writable(self) -> None:
        """Fail early, with one line, when the workspace cannot hold artifacts."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise WorkspaceError(
                f"workspace {self.root} is not writable: {exc.strerror or exc}",
                hint="pass --workspace DIR with a directory you can write to",
            ) from None

    def trait_dir(self, model_slug: str, trait: str) -> Path:
        return self.root / slugify(model_slug) / slugify(trait)

    def lock(self, model_slug: str, trait: str) -> contextlib.AbstractContextManager[None]:
        """The trait directory's writer lock, held by a command for its whole run (see workspace_lock)."""
        return hold_directory_lock(self.trait_dir(model_slug, trait))

    def responses_path(self, model_slug: str, trait: str, persona: str) -> Path:
        return self.trait_dir(model_slug, trait) / f"responses-{persona}.parquet"

    def shards_dir(self, model_slug: str, trait: str, persona: str) -> Path:
        return self.trait_dir(model_slug, trait) / f"responses-{persona}.shards"

    def require_responses(
        self, model_slug: str, model: str, trait: Trait, persona: str = "model"
    ) -> tuple[Path, dict[str, Any]]:
        """The finished responses table of `trait` for a model, and its manifest; a clear error when
        it is missing or was generated from another version of the trait."""
        path = self.responses_path(model_slug, trait.name, persona)
        manifest = self.read_manifest(path)
        if manifest is None or not path.is_file():
            raise WorkspaceError(
                f"no responses for trait {trait.name} and model {model} in {self.root}",
                hint=f"run: personactl generate --trait {trait.name} --model {model}"
                + (" --persona user" if persona == "user" else ""),
            )
        if manifest["trait"]["sha256"] != trait.sha256:
            raise WorkspaceError(
                f"{path} was generated from a different version of trait {trait.name}",
                hint="regenerate: personactl generate --force",
            )
        return path, manifest

    def scores_path(self, model_slug: str, trait: str, persona: str) -> Path:
        return self.trait_dir(model_slug, trait) / f"scores-{persona}.parquet"

    @property
    def judge_cache_path(self) -> Path:
        return self.root / "judge-cache.sqlite"

    def vectors_path(self, model_slug: str, trait: str, persona: str) -> Path:
        return self.trait_dir(model_slug, trait) / f"vectors-{persona}.safetensors"

    @staticmethod
    def pair_diffs_path(vectors_path: Path) -> Path:
        """The per-pair differences (`extract --keep-pairs`) that belong to a vector file."""
        return vectors_path.with_name(vectors_path.name.replace("vectors-", "pair-diffs-", 1))

    def find_vector(self, spec: str, model_slug: str, persona: str = "model") -> Path:
        """A vector file path, or a trait name looked up for this model in the workspace."""
        from personactl.errors import VectorFileError

        path = Path(spec)
        if path.suffix == ".safetensors" or path.is_file():
            if not path.is_file():
                raise VectorFileError(f"vector file not found: {path}")
            return path
        found = self.vectors_path(model_slug, spec, persona)
        if not found.is_file():
            raise VectorFileError(
                f"no vectors for {spec!r} and model {model_slug} in {self.root}",
                hint=self._where_else(spec, model_slug, persona)
                or f"run: personactl extract --trait {spec} (or pass a .safetensors path)",
            )
        return found

    def _where_else(self, spec: str, model_slug: str, persona: str) -> str | None:
        """A hint naming where this trait's vectors do exist: another workspace in the current
        directory (e.g. the one `make demo` wrote), or another model in this workspace."""
        name = f"vectors-{persona}.safetensors"
        trait = slugify(spec)
        here = self.root.resolve()
        for path in sorted(Path.cwd().glob(f"*/{slugify(model_slug)}/{trait}/{name}")):
            other = path.parents[2]
            if other.resolve() != here:
                shown = os.path.relpath(other)
                return f"{spec} is extracted in {shown}: add --workspace {shown} (or set PERSONACTL_WORKSPACE={shown})"
        models = sorted(p.parents[1].name for p in self.root.glob(f"*/{trait}/{name}"))
        if models:
            return f"{spec} is extracted in this workspace for another model ({models[0]}): pass it with --model"
        return None

    def readout_path(self, model_slug: str, name: str) -> Path:
        """Where `readout train` writes a readout named `name` by default."""
        return self.trait_dir(model_slug, "readouts") / f"{name}.safetensors"

    def readout_files(self) -> list[Path]:
        """The readout files in their default place, for every model (sorted)."""
        return sorted(self.root.glob("*/readouts/*.safetensors")) if self.root.is_dir() else []

    def chat_transcript_path(self, model_slug: str, label: str) -> Path:
        """A new chat transcript, beside the artifacts of the vector labelled `label`."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.trait_dir(model_slug, label) / f"chat-{stamp}-{os.getpid()}.json"

    def steer_run_path(self, model_slug: str, label: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.trait_dir(model_slug, label) / f"steer-{stamp}-{os.getpid()}.parquet"

    def condition_fit_path(self, model_slug: str, label: str) -> Path:
        """`condition-<time>-<pid>.json`: one `condition fit` run (a new file every run)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.trait_dir(model_slug, label) / f"condition-{stamp}-{os.getpid()}.json"

    def eval_path(self, model_slug: str, trait: str, key: str) -> Path:
        """`eval-<key>.parquet`, key = a hash of the inputs: the same eval finds its own results
        (its cells table and plots sit beside it as `eval-<key>.<what>.*`, one manifest for all)."""
        return self.trait_dir(model_slug, trait) / f"eval-{key}.parquet"

    @staticmethod
    def manifest_path(artifact: Path) -> Path:
        return artifact.with_name(artifact.name.split(".")[0] + MANIFEST_SUFFIX)

    def write_manifest(self, artifact: Path, kind: str, **fields: Any) -> dict[str, Any]:
        manifest = {
            "kind": kind,
            "artifact": artifact.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": environment_versions(),
            **fields,
        }
        atomic_write_text(self.manifest_path(artifact), json.dumps(manifest, indent=2, default=str) + "\n")
        return manifest

    def read_manifest(self, artifact: Path) -> dict[str, Any] | None:
        path = self.manifest_path(artifact)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise WorkspaceError(f"corrupt manifest {path}: {exc}", hint="delete it or rerun with --force") from None

    def complete_manifest(self, artifact: Path, rerun: str) -> dict[str, Any] | None:
        """The manifest of an artifact another step reads, or an error when it is marked incomplete."""
        manifest = self.read_manifest(artifact)
        if manifest is not None and manifest.get("complete") is False:
            raise WorkspaceError(f"{artifact} is incomplete (its step failed part way)", hint=f"rerun: {rerun}")
        return manifest

    def finished(self, artifact: Path, fingerprint: dict[str, Any]) -> bool:
        """True when `artifact` is complete and was made from the same inputs (a manifest that says
        `complete: false`, e.g. scores with failed judgements, is work still to do).

        A complete artifact made from *different* inputs is an error, not a silent reuse."""
        manifest = self.read_manifest(artifact)
        if manifest is None or not artifact.is_file() or manifest.get("complete") is False:
            return False
        old = manifest.get("fingerprint")
        if old != json.loads(json.dumps(fingerprint, default=str)):
            changed = sorted(k for k in set(old or {}) | set(fingerprint) if (old or {}).get(k) != fingerprint.get(k))
            raise WorkspaceError(
                f"{artifact} exists but was made with different inputs ({', '.join(map(str, changed))})",
                hint="rerun with --force to recompute it, or use another --workspace",
            )
        return True

    def artifacts(self) -> list[dict[str, Any]]:
        """Every manifest in the workspace, with its artifact path."""
        rows = []
        if not self.root.is_dir():
            return rows
        for path in sorted(self.root.rglob(f"*{MANIFEST_SUFFIX}")):
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                manifest = {"kind": "corrupt manifest"}
            artifact = path.parent / manifest.get("artifact", "?")
            rows.append({**manifest, "path": str(artifact), "exists": artifact.is_file()})
        return rows
