"""Where a run's evaluation spends its time: train one recorded cell, then time each phase of
run.finish (evaluate, grid predictions, every diagnostic section, the posterior draws, writing) with
the number of XLA compilations and their backend-compile seconds (jax.monitoring events).

    .venv/bin/python experiments/bench/evaluation/profile.py CONFIG [--cache DIR]

CONFIG is a cell's config.toml, e.g. "experiments/nme_sinusoid/cells/MR-MAML(W)-seed0/config.toml".
With --cache, XLA's persistent compilation cache lives in DIR: run twice to see a warm cache. Prints
to stdout; writes the run into a temporary folder.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import jax
from jax import monitoring

from bayesmeta import config, run, sections

COMPILE = "/jax/core/compile/backend_compile_duration"
PHASES = (
    "evaluate",
    "grid_predictions",
    "posterior_draws",
    "log_likelihood",
    "save_datatree",
    "write_report",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--cache", type=Path, help="XLA's persistent compilation cache folder")
    args = p.parse_args()
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", str(args.cache))
    count: collections.Counter = collections.Counter()
    secs: collections.Counter = collections.Counter()

    def listen(name: str, seconds: float, **_: object) -> None:
        count[name] += 1
        secs[name] += seconds

    monitoring.register_event_duration_secs_listener(listen)

    def timed(label: str, f):
        def g(*a, **k):
            c, s, t = count[COMPILE], secs[COMPILE], time.perf_counter()
            out = f(*a, **k)
            print(
                f"{label}: {time.perf_counter() - t:.1f} s, {count[COMPILE] - c} compiles "
                f"({secs[COMPILE] - s:.1f} s backend)",
                flush=True,
            )
            return out

        return g

    for name in PHASES:
        setattr(run, name, timed(name, getattr(run, name)))
    for section in sections.SECTIONS:
        cls = type(section)
        cls.compute = timed(f"section {cls.__name__}", cls.compute)
    cfg = config.load(args.config)
    t = time.perf_counter()
    _, metrics = run.train(cfg, Path(tempfile.mkdtemp()) / "run", progress=False)
    print(
        f"total {time.perf_counter() - t:.1f} s, train {metrics['train_seconds']:.1f} s, "
        f"eval {metrics['eval_seconds']:.1f} s; {count[COMPILE]} compiles, {secs[COMPILE]:.1f} s backend"
    )


if __name__ == "__main__":
    main()
