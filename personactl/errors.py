"""Project exceptions: each carries a one-line message, a hint and an exit code.

The CLI maps them to output in one place (`cli/app.py`); everything else just raises.
"""

from __future__ import annotations


class PersonactlError(Exception):
    """An expected failure the user can fix; printed as one line plus a hint."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(PersonactlError):
    """Bad settings or config file."""


class TraitError(PersonactlError):
    """A trait file that is missing or does not match the schema."""


class ModelError(PersonactlError):
    """A model that cannot be found, loaded or used."""


class WorkspaceError(PersonactlError):
    """A workspace that cannot be written, or an artifact that is missing or stale."""


class InputError(PersonactlError):
    """Bad user input: layer ranges, data files, empty tables."""


class VectorFileError(PersonactlError):
    """A vector file that is missing, corrupt or incompatible."""
