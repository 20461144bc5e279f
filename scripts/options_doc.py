"""Write docs/options.md: every config key, and every option of every registered family and method,
generated from their dataclasses (types, defaults, bounds, docs), so the reference cannot drift.

    .venv/bin/python scripts/options_doc.py          # rewrite docs/options.md
    .venv/bin/python scripts/options_doc.py --check  # exit 1 if docs/options.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from bayesmeta.options import options_markdown

OUT = Path(__file__).resolve().parents[1] / "docs" / "options.md"

if __name__ == "__main__":
    text = options_markdown()
    if "--check" in sys.argv[1:]:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run .venv/bin/python scripts/options_doc.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(text)
        print(OUT)
