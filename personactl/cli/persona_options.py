"""The `--persona` option of generate, score and extract, written once."""

from __future__ import annotations

from typing import Annotated

import typer

PERSONAS = ("model", "user")

Persona = Annotated[
    str,
    typer.Option(
        "--persona",
        help="model: the assistant has the trait (I am X); user: the user's turn has it (you are X).",
    ),
]


def check_persona(persona: str) -> str:
    from personactl.errors import InputError

    if persona not in PERSONAS:
        raise InputError(f"unknown persona {persona!r}", hint="use --persona model or --persona user")
    return persona
