"""`personactl ls`: the artifacts in a workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console


@guarded
def ls(workspace: o.Workspace = None, config: o.ConfigFile = None, json: o.Json = False) -> None:
    """List the artifacts in the workspace with their kind, model, trait and counts."""
    from rich.markup import escape
    from rich.table import Table

    from personactl.store.workspace import Workspace

    settings = settings_from(config, workspace=workspace)
    ws = Workspace(settings.workspace)
    rows = [
        {
            "kind": a.get("kind"),
            "model": (a.get("model") or {}).get("model"),
            "trait": (a.get("trait") or {}).get("name") or (a.get("metadata") or {}).get("trait"),
            "counts": a.get("counts", {}),
            "created": a.get("created"),
            "path": a["path"],
            "exists": a["exists"],
        }
        for a in ws.artifacts()
    ]
    rows += _unlisted_readouts(ws, {r["path"] for r in rows})
    if json:
        emit_json({"workspace": str(settings.workspace), "artifacts": rows})
        return
    if not rows:
        stdout_console().print(escape(f"no artifacts in {settings.workspace}"))
        return
    table = Table(title=escape(f"artifacts in {settings.workspace} (paths below it)"))
    table.add_column("kind", no_wrap=True)
    table.add_column("model", overflow="fold", min_width=12)  # a hub id or a local path can be long
    table.add_column("trait", overflow="fold", min_width=6)
    table.add_column("counts", overflow="fold", min_width=8)
    table.add_column("created", no_wrap=True)
    table.add_column("path", overflow="fold", min_width=16, ratio=1)
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items())
        cells = [
            r["kind"] or "?",
            r["model"] or "",
            r["trait"] or "",
            counts,
            _when(r["created"]),
            _below(r["path"], ws.root) + ("" if r["exists"] else " (missing)"),
        ]
        table.add_row(*map(escape, cells))
    stdout_console().print(table)


def _when(created: str | None) -> str:
    """`2026-12-02T01:38:43+0000` as `2026-12-02 01:38` (the JSON keeps the whole stamp)."""
    return (created or "")[:16].replace("T", " ")


def _below(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _unlisted_readouts(ws: Any, listed: set[str]) -> list[dict[str, Any]]:
    """Readout files without a manifest (trained before `readout train` wrote one), from their metadata."""
    from personactl.errors import VectorFileError
    from personactl.store.readout_file import readout_metadata

    rows = []
    for path in ws.readout_files():
        if str(path) in listed:
            continue
        try:
            meta = readout_metadata(path)
        except VectorFileError:  # a corrupt file (or not a readout) is still listed, as such
            meta = {}
        concepts, layers = meta.get("concepts") or [], meta.get("rows") or []
        rows.append(
            {
                "kind": "readout" if meta else "readout (unreadable)",
                "model": meta.get("model"),
                "trait": None,
                "counts": {"concepts": len(concepts), "layers": len(layers)} if meta else {},
                "created": meta.get("created"),
                "path": str(path),
                "exists": True,
            }
        )
    return rows
