"""`personactl config`: the effective settings and where each value came from."""

from __future__ import annotations

from personactl.cli import options as o
from personactl.cli.common import config_file, emit_json, guarded, stdout_console


@guarded
def config(
    workspace: o.Workspace = None, config: o.ConfigFile = None, model: o.Model = None, json: o.Json = False
) -> None:
    """Show the effective settings (CLI > env PERSONACTL_* > personactl.toml > defaults), secrets masked."""
    from rich.markup import escape
    from rich.table import Table

    from personactl.settings import load_settings, masked_dump

    settings, sources = load_settings({"workspace": workspace, "model": model}, config_file(config))
    values = masked_dump(settings)
    if json:
        emit_json({name: {"value": values[name], "source": sources[name]} for name in values})
        return
    table = Table("setting", "value", "source", title="personactl settings")
    for name, value in values.items():
        table.add_row(name, escape("" if value is None else str(value)), escape(sources[name]))
    stdout_console().print(table)
