"""The shape every workspace step shares, written once.

A step resolves its inputs, fingerprints them, skips when its artifact is current, loads the model
only when there is work, does its work, then writes the artifact atomically and its manifest, and
returns a summary. `StepArtifact` holds the parts that do not depend on the step's own work:

    out = StepArtifact(workspace, path, "scores", fingerprint, {"trait": name})
    if out.current(force):
        return read_table(out.path), out.skipped()
    ...                                   # the step's own work
    out.commit(table.write_parquet, settings=settings, counts=...)
    return table, out.done(rows=table.height)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personactl.store.atomic import atomic_path

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.store.workspace import Workspace


@dataclass
class StepArtifact:
    """One step's output file, the inputs that decide it, and the summary it reports."""

    workspace: Workspace
    path: Path
    kind: str  # the manifest's "kind": responses, scores, vectors, steer, eval, ...
    fingerprint: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.summary = {"artifact": str(self.path), **self.summary}

    def current(self, force: bool = False) -> bool:
        """The artifact exists, is complete and was made from these inputs (different inputs are an
        error from the workspace, not a silent reuse); always False with `force`."""
        return not force and self.workspace.finished(self.path, self.fingerprint)

    def manifest(self) -> dict[str, Any]:
        return self.workspace.read_manifest(self.path) or {}

    def commit(
        self,
        write: Callable[[Path], object] | None,
        *,
        settings: Settings | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Write the artifact with `write(tmp_path)` (moved into place only when it returns), then the
        manifest: kind, fingerprint, the masked settings and `fields`. `write=None` when the step
        wrote its files itself (several files under one manifest)."""
        if write is not None:
            with atomic_path(self.path) as tmp:
                write(tmp)
        if settings is not None:
            from personactl.settings import masked_dump

            fields = {"settings": masked_dump(settings), **fields}
        return self.workspace.write_manifest(self.path, self.kind, **self._identity(), **fields)

    def _identity(self) -> dict[str, Any]:
        """What the manifest records to decide, next time, whether the artifact is current."""
        return {"fingerprint": self.fingerprint}

    def skipped(self, **extra: Any) -> dict[str, Any]:
        """The summary of a run that found the artifact current."""
        return {**self.summary, "skipped": True, **extra}

    def done(self, **extra: Any) -> dict[str, Any]:
        """The summary of a run that did the work."""
        return {**self.summary, "skipped": False, **extra}

    def amend(self, **fields: Any) -> dict[str, Any]:
        """Rewrite the manifest with `fields` replaced and every other field kept as it was (its
        kind, fingerprint and settings included): a summary redone from the saved artifact."""
        kept = {k: v for k, v in self.manifest().items() if k not in ("kind", "artifact", "created", "versions")}
        return self.workspace.write_manifest(self.path, self.kind, **{**kept, **fields})


@dataclass
class RunArtifact(StepArtifact):
    """An output written anew on every run (steer's timestamped tables, the I-Thou vector): never
    current, so it has no fingerprint and its manifest records none."""

    fingerprint: dict[str, Any] = field(default_factory=dict)

    def current(self, force: bool = False) -> bool:
        return False

    def _identity(self) -> dict[str, Any]:
        return {}
