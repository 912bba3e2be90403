"""One writer per trait directory: the lock a command holds from its skip check to its last write.

Two runs writing the same shards and artifacts interleave rows silently (each one sees the other's
shards as its own, or deletes them as stale), so a second process exits 2 naming the holder instead.
The lock is an OS file lock (`filelock`, flock on POSIX): the kernel drops it when its process
dies, so a lock left by a killed run is taken over by the next one. The holder note beside it
(pid, command, since when) only feeds the message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from personactl.errors import WorkspaceError
from personactl.store.atomic import atomic_write_text

LOCK_NAME = ".personactl.lock"
HOLDER_NAME = ".personactl.lock.holder.json"


def current_command() -> str:
    """This process's command line, credentials masked, for the holder note."""
    from personactl.core.redaction import redact

    argv = ["personactl", *sys.argv[1:]] if Path(sys.argv[0]).name in ("personactl", "__main__.py") else sys.argv
    return redact(shlex.join(argv))[:300]


def describe_holder(directory: Path) -> str:
    """Who holds the lock on `directory`, as far as its note says."""
    try:
        note = json.loads((directory / HOLDER_NAME).read_text(encoding="utf-8"))
        return f"pid {note['pid']} ({note['command']}) since {note['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another personactl process"


@contextlib.contextmanager
def hold_directory_lock(directory: Path, command: str | None = None) -> Iterator[None]:
    """Hold `directory`'s lock for the block; re-entrant within one process (`run` nests its steps).

    Raises WorkspaceError at once when another live process holds it."""
    from filelock import FileLock, Timeout

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot create {directory}: {exc.strerror or exc}") from None
    lock = FileLock(directory / LOCK_NAME, timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise WorkspaceError(
            f"{directory} is in use by {describe_holder(directory)}",
            hint="wait for that run to finish (or stop it), then rerun; a killed run's lock is taken over",
        ) from None
    except OSError as exc:
        raise WorkspaceError(f"cannot lock {directory / LOCK_NAME}: {exc.strerror or exc}") from None
    outermost = lock.lock_counter == 1
    note = directory / HOLDER_NAME
    try:
        if outermost:
            since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            holder = {"pid": os.getpid(), "command": command or current_command(), "since": since}
            atomic_write_text(note, json.dumps(holder) + "\n")
        yield
    finally:
        if outermost:
            note.unlink(missing_ok=True)
        lock.release()
