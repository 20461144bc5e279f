"""Copy each experiment's results table from its RESULTS.md into the docs between markers.

    .venv/bin/python scripts/readme_tables.py          # rewrite README.md and docs/*.md
    .venv/bin/python scripts/readme_tables.py --check  # exit 1 if one of them is out of date

A block `<!-- results: experiments/NAME -->` ... `<!-- /results -->` in README.md or a page of docs/
(docs/results.md, docs/benchmarks.md) receives the first Markdown table of experiments/NAME/RESULTS.md
(`experiments/NAME#K`: its K-th table), so the docs never carry a hand-copied number.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(<!-- results: (?P<src>[\w/.-]+)(?:#(?P<k>\d+))? -->\n)(?P<body>.*?)(<!-- /results -->)", re.S
)


def nth_table(markdown: str, k: int = 1) -> str:
    """The k-th (1-based) run of consecutive lines starting with "|"; empty when there are fewer."""
    tables: list[list[str]] = []
    previous = False
    for line in markdown.splitlines():
        row = line.startswith("|")
        if row and not previous:
            tables.append([])
        if row:
            tables[-1].append(line)
        previous = row
    return "\n".join(tables[k - 1]) + "\n" if len(tables) >= k else ""


def render(readme: str) -> str:
    def fill(m: re.Match) -> str:
        results = ROOT / m["src"] / "RESULTS.md"
        table = nth_table(results.read_text(), int(m["k"] or 1)) if results.is_file() else ""
        return m.group(1) + (table or "(not yet run)\n") + m.group(5)

    return BLOCK.sub(fill, readme)


def pages() -> list[Path]:
    """The Markdown files that may hold results blocks: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> int:
    stale = []
    for path in pages():
        current = path.read_text()
        wanted = render(current)
        if wanted == current:
            continue
        stale.append(path.relative_to(ROOT).as_posix())
        if "--check" not in sys.argv:
            path.write_text(wanted)
    if "--check" in sys.argv and stale:
        print(
            f"results tables in {', '.join(stale)} differ from experiments/*/RESULTS.md; "
            "run scripts/readme_tables.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
