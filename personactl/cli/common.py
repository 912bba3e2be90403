"""Output and error plumbing shared by commands: the one place errors become exit codes."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import typer


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    stderr_console().print(message, markup=False)


def report(exc: Exception) -> int:
    """Print an error as one line plus a hint to stderr; return the exit code."""
    from rich.markup import escape

    from personactl.errors import PersonactlError, as_project_error

    console = stderr_console()
    exc = as_project_error(exc) or exc
    if isinstance(exc, PersonactlError):
        console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
        if exc.hint:
            console.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        console.print("interrupted; finished work is kept, rerun the same command to resume")
        return 130
    console.print(f"[bold red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')}", soft_wrap=True)
    console.print("[dim]hint:[/] rerun with PERSONACTL_DEBUG=1 for a traceback, and please report it")
    return 1


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so expected failures exit with one line and a hint, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if os.environ.get("PERSONACTL_DEBUG") == "1":
                raise
            raise typer.Exit(report(exc)) from None

    return wrapper


_global_config: list = [None]


def set_global_config(path) -> None:
    """Remember `personactl --config FILE` (given before the command) for every settings load."""
    _global_config[0] = path


def config_file(config=None):
    """The command's own --config, else the global one, else None (the workspace's toml)."""
    return config if config is not None else _global_config[0]


def settings_from(config=None, **cli: Any):
    """Effective settings (CLI > env > toml > defaults) from a command's flags (a choice as its value)."""
    from personactl.settings import load_settings

    flags = {key: value.value if isinstance(value, Enum) else value for key, value in cli.items()}
    settings, _ = load_settings(flags, config_file(config))
    return settings


def placement(backend=None, device=None, device_map=None, max_memory=None, parallel=(None, None, None)):
    """The flags that say how and where the model runs (engine, devices, accelerate map, and vLLM's
    tensor and pipeline parallel sizes and executor), as `settings_from` keywords."""
    tensor, pipeline, executor = parallel
    return {
        "backend": backend,
        "device": device,
        "device_map": device_map,
        "max_memory": max_memory,
        "tensor_parallel_size": tensor,
        "pipeline_parallel_size": pipeline,
        "distributed_executor_backend": executor,
    }


def open_workspace(settings):
    from personactl.store.workspace import Workspace

    workspace = Workspace(settings.workspace)
    workspace.ensure_writable()
    return workspace


def trait_lock(workspace, settings, name: str):
    """The writer lock of the model's directory for trait (or artifact) `name`: one process at a time."""
    from personactl.model.loading import resolve_model

    return workspace.lock(resolve_model(settings.model).slug, name)


def comma_list(text: str) -> list[str]:
    """`a, b,,c` → ["a", "b", "c"]: the items of a comma-list flag, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def check_choices(*checks: tuple[str, Sequence[str], str]) -> None:
    """A clear error for the first flag whose value is not one of its choices: (value, allowed, flag).
    For comma-list flags; a flag that takes one choice is a str Enum (cli/options.py) and typer checks it."""
    from personactl.errors import InputError

    for value, allowed, flag in checks:
        if value not in allowed:
            raise InputError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


def load_engine(settings, *, steering: bool, positions: str = "all"):
    """The model handle the `backend` setting names (`personactl.backends.open_model`): a Hugging
    Face `LoadedModel` or a started vLLM engine."""
    from personactl.backends import open_model

    return open_model(settings, steering=steering, positions=positions, log=log, status=stderr_console().status)


def load_model_from(settings):
    """The Hugging Face model `settings` names (a local judge, the neutral-KL measure: they need
    transformers' own model)."""
    return load_engine(settings.model_copy(update={"backend": "hf"}), steering=False)


def load_reader_from(settings):
    """The model of the steps that read activations (extract, monitor, readout, condition, import):
    the chosen engine's when it reads them in this process (hf, mlx), else the Hugging Face model
    (vLLM's stream lives in its worker processes)."""
    from personactl.backends import engine_class

    if not engine_class(settings.backend).reads_activations:
        settings = settings.model_copy(update={"backend": "hf"})
    return load_engine(settings, steering=False)


class LazyProgress:
    """A rich progress bar on stderr that appears only once work starts (not for skipped steps)."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self.task = None
        self.tokens = 0

    def __enter__(self) -> "LazyProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, total: int | None, completed: int = 0) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
        )
        self.bar.start()
        self.task = self.bar.add_task(self.description, total=total, completed=completed, rate="")

    def note(self, text: str, advance: int = 1) -> None:
        """Advance with a free-form status (e.g. requests/s, cache hits, failures)."""
        self.bar.update(self.task, advance=advance, rate=text)

    def advance(self, n: int, tokens: int = 0) -> None:
        self.tokens += tokens
        rate = ""
        if self.tokens:
            rate = f"{self.tokens / max(self.bar.tasks[self.task].elapsed or 0, 1e-9):.0f} tok/s"
        self.bar.update(self.task, advance=n, rate=rate)
