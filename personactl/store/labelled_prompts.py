"""Labelled prompts for fitting a steering condition: a JSON-lines file of `{"text", "label"}`.

`label` 1 marks a prompt steering should act on, 0 one it should leave alone. Blank lines are
skipped; any other bad line is one error naming its line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from personactl.errors import InputError
from personactl.store.text_input import read_user_text

_HINT = 'one JSON object per line: {"text": "a user message", "label": 1} (label 1 = steer, 0 = do not)'


def read_labelled_prompts(path: Path) -> list[tuple[str, int]]:
    """(text, label) per non-blank line of `path`, in order."""
    out: list[tuple[str, int]] = []
    for number, line in enumerate(read_user_text(path, "labels file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not JSON ({exc.msg})", hint=_HINT) from None
        text = record.get("text") if isinstance(record, dict) else None
        label = record.get("label") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{number}: no text", hint=_HINT)
        if isinstance(label, bool) or label not in (0, 1):
            raise InputError(f"{path}:{number}: label {label!r} is not 0 or 1", hint=_HINT)
        out.append((text, int(label)))
    if not out:
        raise InputError(f"{path}: no labelled prompts", hint=_HINT)
    return out
