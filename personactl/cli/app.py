"""The `personactl` entry point. Commands live one per module; only typer is imported here."""

from __future__ import annotations

import typer

from personactl.cli import (
    chat,
    compare,
    condition,
    config_cmd,
    eval,
    export_cmd,
    extract,
    generate,
    import_cmd,
    ls,
    monitor,
    readout,
    run,
    score,
    serve,
    show,
    steer,
    traits,
)
from personactl.cli.common import set_global_config
from personactl.cli.help_format import use_tidy_help
from personactl.cli.options import ConfigFile

app = typer.Typer(
    name="personactl",
    help="Persona vectors for open LLMs: generate contrastive responses, extract vectors, steer and compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

app.command("generate")(generate.generate)
app.command("score")(score.score)
app.command("extract")(extract.extract)
app.command("steer")(steer.steer)
app.command("eval")(eval.eval_cmd)
app.command("run")(run.run)
app.command("compare")(compare.compare)
app.command("show")(show.show)
app.command("export")(export_cmd.export)
app.command("import")(import_cmd.import_vector)
app.command("chat")(chat.chat)
app.command("serve")(serve.serve)
app.add_typer(traits.app, name="traits")
app.command("config")(config_cmd.config)
app.command("ls")(ls.ls)
app.command("monitor")(monitor.monitor)
app.add_typer(readout.app, name="readout")
app.add_typer(condition.app, name="condition")
use_tidy_help(app)


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
    config: ConfigFile = None,
) -> None:
    set_global_config(config)  # every invocation sets it, so nothing carries over between calls
    if version:
        from personactl import __version__

        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    app()
