"""Tables that never cut a value: key columns stay on one line, long text wraps or folds, and a
table with more value columns than the terminal holds is printed as several tables, each
repeating the key columns (rich would otherwise shrink every column and end values with "…")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NUMBER = {"justify": "right", "no_wrap": True}  # a value column: numbers are never folded


@dataclass(frozen=True)
class Col:
    header: str
    key: bool = False  # repeated in every part, kept on one line
    options: dict[str, Any] = field(default_factory=dict)  # passed to Table.add_column


def _table(title: str | None, columns: Sequence[Col], rows: Sequence[Sequence[str]], indices: Sequence[int]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for i in indices:
        col = columns[i]
        options = {"no_wrap": True} if col.key else {"overflow": "fold"}
        table.add_column(col.header, **{**options, **col.options})
    for row in rows:
        table.add_row(*(row[i] for i in indices))
    return table


def _needed(columns: Sequence[Col], rows: Sequence[Sequence[str]], indices: Sequence[int]) -> int:
    """The width a table of these columns needs without cutting a one-line cell: each no-wrap
    column's longest line (header or cell), 8 for a folding one, plus padding and borders."""
    from rich.cells import cell_len
    from rich.text import Text

    total = len(indices) + 1  # borders
    for i in indices:
        col = columns[i]
        if col.key or col.options.get("no_wrap"):
            lines = [*Text.from_markup(col.header).plain.split("\n"), *(row[i] for row in rows)]
            total += max((cell_len(Text.from_markup(line).plain) for line in lines), default=0) + 2
        else:
            total += 8 + 2
    return total


def needed_width(columns: Sequence[Col]) -> int:
    """The width the headers alone need (numbers are narrower than any header here)."""
    return _needed(columns, [], range(len(columns)))


def fitted_tables(console: Any, title: str | None, columns: Sequence[Col], rows: Sequence[Sequence[str]]) -> list[Any]:
    """One table when it fits the console's width without cutting a value; else the value columns
    split over as few tables as fit, in order, each with the key columns first."""
    everything = list(range(len(columns)))
    if _needed(columns, rows, everything) <= console.width:
        return [_table(title, columns, rows, everything)]
    keys = [i for i, c in enumerate(columns) if c.key]
    values = [i for i, c in enumerate(columns) if not c.key]
    parts: list[list[int]] = []
    current: list[int] = []
    for i in values:
        if current and _needed(columns, rows, keys + current + [i]) > console.width:
            parts.append(current)
            current = [i]
        else:
            current.append(i)
    if current:
        parts.append(current)
    n = len(parts)
    return [
        _table(f"{title} ({k}/{n})" if title and n > 1 else title, columns, rows, keys + part)
        for k, part in enumerate(parts, 1)
    ]


def print_fitted(console: Any, title: str | None, columns: Sequence[Col], rows: Sequence[Sequence[str]]) -> None:
    for table in fitted_tables(console, title, columns, rows):
        console.print(table)
