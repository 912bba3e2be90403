"""`personactl ls`: the artifacts in a workspace."""

from __future__ import annotations

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, settings_from, stdout_console


@guarded
def ls(workspace: o.Workspace = None, config: o.ConfigFile = None, json: o.Json = False) -> None:
    """List the artifacts in the workspace with their kind, model, trait and counts."""
    from rich.markup import escape
    from rich.table import Table

    from personactl.store.workspace import Workspace

    settings = settings_from(config, workspace=workspace)
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
        for a in Workspace(settings.workspace).artifacts()
    ]
    if json:
        emit_json({"workspace": str(settings.workspace), "artifacts": rows})
        return
    table = Table(
        "kind", "model", "trait", "counts", "created", "path", title=escape(f"artifacts in {settings.workspace}")
    )
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items())
        cells = [
            r["kind"] or "?",
            r["model"] or "",
            r["trait"] or "",
            counts,
            r["created"] or "",
            r["path"] + ("" if r["exists"] else " (missing)"),
        ]
        table.add_row(*map(escape, cells))
    stdout_console().print(table if rows else escape(f"no artifacts in {settings.workspace}"))
