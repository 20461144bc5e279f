"""Copy each experiment's results table from its RESULTS.md into README.md between markers.

    .venv/bin/python scripts/readme_tables.py          # rewrite README.md
    .venv/bin/python scripts/readme_tables.py --check  # exit 1 if README.md is out of date

A block `<!-- results: experiments/NAME -->` ... `<!-- /results -->` in README.md receives the first
Markdown table of experiments/NAME/RESULTS.md, so the README never carries a hand-copied number.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results: (?P<src>[\w/.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def first_table(markdown: str) -> str:
    lines, table = markdown.splitlines(), []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table) + "\n"


def render(readme: str) -> str:
    def fill(m: re.Match) -> str:
        results = ROOT / m["src"] / "RESULTS.md"
        body = first_table(results.read_text()) if results.is_file() else "(not yet run)\n"
        return m.group(1) + body + m.group(4)

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
