"""Project exceptions: each carries a one-line message, a hint and an exit code (2).

Code raises them; the CLI prints them as one line plus a hint in one place (`cli/common.py`: `report`,
through the `guarded` wrapper of every command), and chat's line mode reports them per line.
`as_project_error` turns I/O and encoding failures that no step translated into project errors.
Imports nothing of personactl, so every layer may import it.
"""

from __future__ import annotations

import os
import re


class PersonactlError(Exception):
    """An expected failure the user can fix; printed as one line plus a hint."""

    exit_code = 2
    default_hint = "see `personactl --help`"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint


class ConfigError(PersonactlError):
    """Bad settings or config file."""

    default_hint = "see `personactl config` for every setting and where it comes from"


class TraitError(PersonactlError):
    """A trait file that is missing or does not match the schema."""

    default_hint = "see `personactl traits show evil` for a complete example"


class ModelError(PersonactlError):
    """A model that cannot be found, loaded or used."""

    default_hint = "pass a built-in name (smollm2-135m), a hub id, a local HF directory or a .gguf file"


class WorkspaceError(PersonactlError):
    """A workspace that cannot be written, or an artifact that is missing or stale."""

    default_hint = "rerun with --force, or use another --workspace"


class InputError(PersonactlError):
    """Bad user input: layer ranges, data files, empty tables."""

    default_hint = "see the command's --help"


class VectorFileError(PersonactlError):
    """A vector file that is missing, corrupt or incompatible."""

    default_hint = "re-extract it: personactl extract ... --force"


class JudgeError(PersonactlError):
    """A judge that cannot be reached, refuses the key, or answers with something that is not a completion."""

    default_hint = (
        "check --judge-base-url, the API key and --judge; answers already received are cached, "
        "so rerunning the same command sends only what is missing"
    )


def os_failure(exc: BaseException) -> str | None:
    """The operating-system failure behind `exc`, if any: an OSError, or a Rust library's error that
    wraps one (polars and safetensors say "... (os error 28)" in their own exception types)."""
    if isinstance(exc, OSError):
        return exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    match = re.search(r"os error (\d+)", str(exc))
    return os.strerror(int(match.group(1))) if match else None


def as_project_error(exc: BaseException) -> PersonactlError | None:
    """The last net under the CLI: failures of the machine or of a file (I/O, encoding) that no
    step translated itself, as one-line project errors. None for anything else (a real bug)."""
    if isinstance(exc, UnicodeError):
        return InputError(f"a file is not UTF-8 text: {exc}", hint="save the file as UTF-8 and rerun")
    reason = os_failure(exc)
    if reason is None:
        return None
    where = getattr(exc, "filename", None)
    return WorkspaceError(
        f"{where}: {reason}" if where else f"input/output failed: {reason}",
        hint="free space or fix the file's permissions, then rerun the same command: finished work is kept",
    )
