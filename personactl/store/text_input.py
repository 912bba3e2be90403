"""Reading the user's own text files (traits, pairs, prompts, conversations, import records).

They come from editors and other tools, so a wrong encoding is an expected failure: one line naming
the file and where the first bad byte is, not a UnicodeDecodeError from deep inside a step."""

from __future__ import annotations

from pathlib import Path

from personactl.errors import InputError, PersonactlError


def read_user_text(path: Path, what: str, error: type[PersonactlError] = InputError) -> str:
    """`path` as UTF-8 text; `what` names the kind of file in the message ("pairs file")."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
            hint="save it as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT",
        ) from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
