"""Park the unfinished runs of experiment grids, to continue them on another machine or checkout.

    .venv/bin/python scripts/park.py experiments/omniglot_fixes/compare [DIR ...]

A grid stopped by Ctrl-C or SIGTERM parks its runs itself; this is for one stopped otherwise (a
killed process keeps the checkpoint of its last train.checkpoint_every steps). For each folder below DIR
holding an experiment's runs/, every run with a checkpoint and no results gets its config.toml and
checkpoint copied into the experiment's cells/<run>/parked/; commit them with the records. Started
again where runs/ is gone, the grid resumes such a run from there (bayesmeta.experiment.park).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bayesmeta.experiment import park


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="experiment folders (searched for runs/)")
    args = p.parse_args()
    for d in args.dirs:
        if not d.is_dir():
            print(f"park: {d} is not a folder", file=sys.stderr)
            return 2
        for runs in sorted({d / "runs", *d.rglob("runs")}):
            if runs.is_dir():
                for name in park(runs.parent):
                    print(f"parked {runs.parent / 'cells' / name / 'parked'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
