"""Help pages that cannot crash and read the same everywhere.

Typer renders help text as rich markup, so a literal `[/aggregator]` in a help string raised a
MarkupError instead of printing help. Every command gets `TidyHelpCommand`, which escapes help text,
shows no value for flags, plain metavars (`INT ≥1`, not `<int range> [x>=1]`), one default form
(`… (default: X).`) and arguments in the usage line as `VECTOR`, not `{vector}`.
"""

from __future__ import annotations

import typer
from typer.core import TyperCommand, TyperGroup

HELP_OPTION_NAMES = ["-h", "--help"]
_TYPE_NAMES = {"int": "INT", "float": "FLOAT", "str": "TEXT", "path": "PATH", "bool": "BOOL"}


def _metavar(param, ctx) -> str:
    """A short uppercase type name, with its range when it has one (`INT ≥1`, `FLOAT 0–100`)."""
    shown = param.display_type(ctx).strip("<>")
    if "|" in shown:
        return shown  # choices read best as they are
    kind = shown.removesuffix(" range").removeprefix("list[").removesuffix("]")
    label = _TYPE_NAMES.get(kind, kind.upper())
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None and high is not None:
        return f"{label} {low:g}–{high:g}"
    if low is not None:
        return f"{label} ≥{low:g}"
    if high is not None:
        return f"{label} ≤{high:g}"
    return label


def _default_text(param) -> str | None:
    """The default as a person reads it, or None when typer would show nothing."""
    default = param.default
    if param.show_default is False or default is None or callable(default):
        return None
    if getattr(param, "is_bool_flag", False):
        if not getattr(param, "secondary_opts", None) or default is False:
            return None if not param.secondary_opts else param.secondary_opts[0].lstrip("-")
        return param.opts[0].lstrip("-")
    if isinstance(default, (list, tuple)):
        return ",".join(str(d) for d in default) or None
    return str(getattr(default, "value", default))


def tidy_params(command, ctx) -> None:
    """Rewrite a command's help strings once, in place, before rich renders them."""
    from rich.markup import escape

    if getattr(command, "_help_tidied", False):
        return
    command._help_tidied = True
    if command.help:
        command.help = escape(command.help)
    for param in command.get_params(ctx):
        help_text = getattr(param, "help", None) or ""
        default = _default_text(param) if isinstance(param, typer.core.TyperOption) else None
        if default is not None and "default" not in help_text:  # one form: "… (default: X)." before the full stop
            stop = "." if help_text.endswith(".") else ""
            help_text = f"{help_text.removesuffix('.')} (default: {default}){stop}".strip()
        if hasattr(param, "show_default"):
            param.show_default = False
        if hasattr(param, "help"):
            param.help = escape(help_text) if help_text else None
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif isinstance(param, typer.core.TyperArgument):
            label = _metavar(param, ctx) + ("…" if param.nargs != 1 else "")
            param.display_type_rich = lambda ctx, label=label: label  # the metavar would rename it
            # the usage line: `VECTORS...` as click writes it, not typer's `{vectors}...`
            usage = (param.name or "").upper() + ("..." if param.nargs != 1 else "")
            usage = usage if param.required else f"[{usage}]"
            param._usage_display_name = lambda usage=usage: usage
        elif param.metavar is None and isinstance(param, typer.core.TyperOption):
            param.metavar = _metavar(param, ctx)
            param._get_number_range_help_str = lambda: None  # the range is in the metavar now


class TidyHelpCommand(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        tidy_params(self, ctx)
        return super().format_help(ctx, formatter)


class TidyHelpGroup(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        tidy_params(self, ctx)
        for command in self.commands.values():
            tidy_params(command, ctx)  # the group's listing shows each command's first line
        return super().format_help(ctx, formatter)


def use_tidy_help(app: typer.Typer) -> None:
    """Give every command and group of `app` (recursively) the tidy help page and `-h`."""
    app.info.cls = TidyHelpGroup
    app.info.context_settings = {"help_option_names": HELP_OPTION_NAMES}
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = TidyHelpCommand
    for group in app.registered_groups:
        group.cls = TidyHelpGroup
        use_tidy_help(group.typer_instance)
