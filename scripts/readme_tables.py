"""Copy each experiment's results table from its RESULTS.md into README.md between markers.

    .venv/bin/python scripts/readme_tables.py          # rewrite README.md
    .venv/bin/python scripts/readme_tables.py --check  # exit 1 if README.md is out of date

A block `<!-- results: experiments/NAME -->` ... `<!-- /results -->` in README.md receives the first
Markdown table of experiments/NAME/RESULTS.md (`experiments/NAME#K`: its K-th table), so the README
never carries a hand-copied number.
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


def main() -> int:
    path = ROOT / "README.md"
    current = path.read_text()
    wanted = render(current)
    if "--check" in sys.argv:
        if wanted != current:
            print(
                "README.md results tables differ from experiments/*/RESULTS.md; run scripts/readme_tables.py",
                file=sys.stderr,
            )
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
