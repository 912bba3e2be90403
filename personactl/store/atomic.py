"""Nothing half-written: every artifact goes to a temporary name in the same directory and is
moved into place with `os.replace`; a failed write becomes one WorkspaceError naming the file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from personactl.errors import WorkspaceError, os_failure

WRITE_HINT = "free space or make the directory writable, then rerun the same command: finished work is kept"


PROBE_BYTES = 1 << 16


def write_error(path: Path, exc: BaseException, tmp: Path | None = None) -> WorkspaceError | None:
    """A one-line project error for a failed write of `path` (disk full, read-only, no permission),
    or None when the failure is not the file system's.

    Some writers hide the OS error (polars reports a short write as "Invalid thrift: transport
    error"), so when `exc` names none, one more write of 64 KiB to `tmp` asks the file system."""
    reason = os_failure(exc)
    if reason is None and tmp is not None:
        try:
            with open(tmp, "ab") as probe:
                probe.write(b"\0" * PROBE_BYTES)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as probe_exc:
            reason = os_failure(probe_exc)
    return None if reason is None else WorkspaceError(f"cannot write {path}: {reason}", hint=WRITE_HINT)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success move it into place, on failure delete it.

    Every artifact is written through here, so this is where a failed write (ENOSPC, EROFS, EACCES)
    becomes a WorkspaceError naming the file; the old file, if any, is untouched."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get normal permissions
        os.replace(tmp_path, path)
    except Exception as exc:
        error = write_error(path, exc, tmp_path)
        if error is None:
            raise
        raise error from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
