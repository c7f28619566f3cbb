"""The one markdown table renderer: report.md, the dataset card and the Prefect UI's tables.

Why one place: a cell's text can break its table. GFM splits a row at every pipe that no backslash
escapes (report.md's "|z| <= 73.32" became two cells and shifted the rest), a line break ends the row,
and the Prefect UI renders each string cell of a table artifact as a markdown document of its own, where
a leading ">" is a blockquote (and "- ", "# ", "1. " a list or a heading). The UI also draws table cells
on one line and hides the scrollbar, so a sentence in a cell pushes the last columns out of view: keep
cells short and write prose beneath the table.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

#: what starts a block when a line is read as a markdown document: blockquote, heading, list item,
#: ordered list item, thematic break, code fence
_BLOCK_START = re.compile(r"^(?:>|#{1,6}(?:\s|$)|[-+*](?:\s|$)|\d{1,9}[.)](?:\s|$)|(?:[-*_]\s*){3,}$|```|~~~)")
_ORDERED = re.compile(r"^(\d{1,9})([.)])")
_PIPE = re.compile(r"(\\*)\|")


def _one_line(value: Any) -> str:
    return " ".join(("" if value is None else str(value)).splitlines()).strip()


def inline_text(value: Any) -> str:
    """``value`` as one line of markdown that reads as itself when rendered as a document of its own (a
    Prefect table artifact's string cell): line breaks become spaces, and a leading block marker is escaped."""
    text = _one_line(value)
    if not _BLOCK_START.match(text):
        return text
    return _ORDERED.sub(r"\1\\\2", text, count=1) if _ORDERED.match(text) else "\\" + text


def table_cell(value: Any) -> str:
    """``value`` as the text of one GFM table cell: one line, every pipe escaped (backslashes already before a
    pipe are doubled, so the pipe stays escaped), inside a code span too, as GFM asks. A cell is inline
    content, so a leading '>' needs nothing there."""
    return _PIPE.sub(lambda m: m.group(1) * 2 + "\\|", _one_line(value))


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GFM table; every row must have as many cells as ``header`` (a ValueError otherwise)."""
    lines = [_row(header), "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells under {len(header)} headers: {list(row)}")
        lines.append(_row(row))
    return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(table_cell(c) for c in cells) + " |"


def ui_table_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: each string cell made safe to render as markdown on its own."""
    return [{k: inline_text(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
