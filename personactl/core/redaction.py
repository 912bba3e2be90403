"""Masks credentials in text that personactl did not write itself (server error bodies, command lines).

A server may echo request headers or keys in its error body; quoting that body verbatim would
print `Bearer sk-…` to a terminal or a log. Everything quoted from outside goes through `redact`."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

_PATTERNS = [
    # "Authorization: Bearer X", "Bearer X", "Basic X"
    re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"),
    # key=value / "key": "value" for names that carry secrets
    re.compile(
        r"(?i)((?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password|authorization|x-api-key|token)"
        r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',}&]{4,})"
    ),
    # well-known key shapes: OpenAI, Anthropic, Hugging Face, GitHub, AWS, Google
    re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{8,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{20,}"),
]


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with known secret values and anything shaped like a credential replaced by ***."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    text = _PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _PATTERNS[1].sub(lambda m: f"{m.group(1)}{MASK}", text)
    for pattern in _PATTERNS[2:]:
        text = pattern.sub(MASK, text)
    return text
