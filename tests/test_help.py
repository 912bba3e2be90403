"""Every command's help page renders, reads the same way, and documents every option."""

from __future__ import annotations

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from personactl.cli.app import app

runner = CliRunner()


def command_paths(command=None, path=()):
    command = command or typer.main.get_command(app)
    yield path, command
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            yield from command_paths(sub, (*path, name))


PATHS = [path for path, _ in command_paths()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "personactl")
def test_every_help_page_renders_plainly(path):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and result.exception is None
    for typer_noise in ("<bool>", "<str>", "range>", "[x>=", "[default:"):
        assert typer_noise not in result.output, (typer_noise, result.output)
    assert runner.invoke(app, [*path, "-h"], env={"COLUMNS": "200"}).output == result.output


def test_help_text_with_brackets_is_printed_literally():
    result = runner.invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "@position[/aggregator]" in result.output


def test_every_option_says_what_it_does():
    for path, command in command_paths():
        for param in command.params:
            text = (getattr(param, "help", None) or "").strip()
            assert text and not text.startswith("(default"), (path, param.opts)


def test_ranges_and_defaults_shown_once_in_the_metavar_and_help():
    out = runner.invoke(app, ["score", "--help"], env={"COLUMNS": "200"}).output
    assert "FLOAT 0–100" in out and "INT ≥1" in out
    out = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert out.count("(default: 0.5,1,2,4)") == 1 and "--alpha-cap" in out and "--max-alpha" not in out


def test_choice_options_offer_the_library_lists():
    """A choice option's values are the library's own list (core/choices.py, which the library checks
    against), in its order; the settings' Literal types spell the same lists."""
    from typing import get_args

    from personactl.cli import options as o
    from personactl.core import choices
    from personactl.settings import Settings

    def values(choice):
        return tuple(member.value for member in choice)

    def setting(name):
        return get_args(Settings.model_fields[name].annotation)

    assert values(o.NormMode) == choices.NORM_MODES and values(o.SteerMode) == choices.POSITION_MODES
    assert values(o.PositionChoice) == choices.POSITIONS and values(o.AggregatorChoice) == choices.AGGREGATORS
    assert values(o.JudgeModeChoice) == choices.JUDGE_MODES == setting("judge_mode")
    assert values(o.DtypeChoice) == choices.DTYPES == setting("dtype")
    assert values(o.BackendChoice) == choices.BACKENDS == setting("backend")
    assert values(o.IndexKindChoice) == choices.INDEX_KINDS
    executor, _none = setting("distributed_executor_backend")
    assert values(o.ExecutorChoice) == choices.EXECUTORS == get_args(executor)


def test_a_bad_choice_is_a_usage_error_naming_the_choices():
    args = ["steer", "--vector", "x", "--prompt", "hi", "--steer-positions", "middle"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "'middle' is not one of 'all', 'prompt', 'response'" in result.output
