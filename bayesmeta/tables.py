"""One markdown-table writer for every report, RESULTS.md and benchmark table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table: `| h1 | h2 |`, `|---|---|`, then one line per row, cells
    as str(cell) with '|' escaped; no trailing newline. Every row must have len(header) cells."""
    width = len(header)

    def line(cells: Sequence[object]) -> str:
        if len(cells) != width:
            raise ValueError(f"markdown_table: a row has {len(cells)} cells, the header {width}")
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * width, *(line(r) for r in rows)])
