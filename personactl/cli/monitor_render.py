"""`personactl monitor` for a person: a per-layer table per input, headed by the input itself, and
with `--tokens` a per-token table whose cells are coloured by sign and size."""

from __future__ import annotations

from typing import Any

from personactl.steps.monitor import MONITOR_POSITIONS

MAX_TOKEN_COLUMNS = 6  # label × layer columns in a token table before it shows only the middle layer
TITLE_CHARS = 60


def shorten(text: str, limit: int = TITLE_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def item_title(item: dict[str, Any]) -> str:
    """What was read: the message (and the reply), or the conversation's length."""
    if "text" in item:
        title = f"“{shorten(item['text'])}”"
        return title + (f" → reply “{shorten(item['reply'])}”" if "reply" in item else " (no reply)")
    return f"conversation of {item['conversation']} messages"


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def layers_table(doc: dict[str, Any], item: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    labels = doc["labels"]
    table = Table(
        "layer",
        *[escape(f"{label} @ {pos}") for pos in MONITOR_POSITIONS for label in labels],
        title=escape(item_title(item)),
    )
    for r, layer in enumerate(doc["layers"]):
        table.add_row(str(layer), *[fmt(item[pos][r][k]) for pos in MONITOR_POSITIONS for k in range(len(labels))])
    return table


def token_layers(layers: list[int], n_labels: int) -> list[int]:
    """Every layer when label × layer columns fit, else the middle one (narrow with --layers)."""
    return layers if n_labels * len(layers) <= MAX_TOKEN_COLUMNS else [layers[len(layers) // 2]]


def shaded(value: float | None, scale: float) -> str:
    """A cell coloured by sign (green +, red −), bold where it is at least half the column's largest."""
    if value is None:
        return "[dim]sink[/dim]"
    colour = "green" if value >= 0 else "red"
    style = f"bold {colour}" if scale and abs(value) >= scale / 2 else colour
    return f"[{style}]{value:+.3f}[/{style}]"


def visible(token: str) -> str:
    """A token as text a person can see: newlines as ⏎, a token of spaces as ␣."""
    token = token.replace("\n", "⏎")
    return token.replace(" ", "␣") if not token.strip() else token


def token_table(doc: dict[str, Any], item: dict[str, Any], layers: list[int]) -> Any:
    """One row per token: its text, prompt or reply, and its projection per label at `layers`."""
    from rich.markup import escape
    from rich.table import Table

    labels, rows = doc["labels"], [doc["layers"].index(layer) for layer in layers]
    columns = [(r, k) for r in rows for k in range(len(labels))]
    table = Table(
        "#",
        "token",
        "part",
        *[escape(f"{labels[k]} L{doc['layers'][r]}") for r, k in columns],
        title=escape(f"per token: {item_title(item)}"),
    )
    scales = {
        (r, k): max((abs(v) for t in item["tokens"] if (v := t["projection"][r][k]) is not None), default=0.0)
        for r, k in columns
    }
    for i, token in enumerate(item["tokens"]):
        text = escape(visible(token["token"]))
        table.add_row(
            str(i),
            text,
            "reply" if token["response"] else "prompt",
            *[shaded(token["projection"][r][k], scales[r, k]) for r, k in columns],
        )
    return table


def effect_table(doc: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table("layer", "position", "label", "mean pos", "mean neg", "Cohen's d", title="pos vs neg projections")
    for r in doc["effect"]:
        table.add_row(
            str(r["layer"]),
            r["position"],
            escape(r["label"]),
            fmt(r["mean_pos"]),
            fmt(r["mean_neg"]),
            fmt(r["cohens_d"]),
        )
    return table
