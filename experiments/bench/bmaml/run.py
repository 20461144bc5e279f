"""Benchmark: what BMAML's training step costs, against MAML's (issue #14: "about M times MAML").

    .venv/bin/python experiments/bench/bmaml/run.py [--repeats 5]

The sine/line row of experiments/bench/methods (meta-batch 25, 5-shot, 10 queries, 5 inner steps, MLP
40-40), timed the same way (a scanned chunk of 200 SVI steps, tasks sampled on device, minimum over
repeats) for MAML and for BMAML at M = 1, 2, 3, 5 particles, with no leader step (s = 0), first
order, and with rematerialised SVGD steps: per-task cost as a multiple of MAML's, and XLA's temporary
memory. Writes RESULTS.md and results.json beside this file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bayesmeta.bench import load_script, write_results

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from bayesmeta.tables import markdown_table

    bench = load_script(HERE.parent / "methods" / "run.py", "bench_methods")  # AMB and `measure`
    bmaml = (*bench.AMB, "model.method='bmaml'")
    cases = {
        "MAML": (*bench.AMB, "model.method='maml'"),
        "MAML, first order": (*bench.AMB, "model.method='maml'", "model.first_order=true"),
        **{f"BMAML, M={m}": (*bmaml, f"model.params.particles={m}") for m in (1, 2, 3, 5)},
        "BMAML, M=1, no leader step (s=0)": (
            *bmaml,
            "model.params.particles=1",
            "model.params.leader_steps=0",
        ),
        "BMAML, M=5, first order": (*bmaml, "model.params.particles=5", "model.first_order=true"),
        "BMAML, M=5, remat nothing_saveable": (
            *bmaml,
            "model.params.particles=5",
            "model.remat='nothing_saveable'",
        ),
    }
    started = time.perf_counter()
    rows = {}
    for label, overrides in cases.items():
        rows[label] = bench.measure(overrides, args.repeats)
        print(label, rows[label], flush=True)
    maml = rows["MAML"]["ms_per_step"]
    table = [
        [label, f"{r['ms_per_step']:.3f}", f"{r['ms_per_step'] / maml:.1f}x", f"{r['temp_mib']:.1f}"]
        for label, r in rows.items()
    ]
    head = ["configuration", "ms per step", "of MAML's", "XLA temp MiB"]
    command = f".venv/bin/python experiments/bench/bmaml/run.py --repeats {args.repeats}"
    minutes = (time.perf_counter() - started) / 60
    intro = (
        "Sine/line, meta-batch 25, 5-shot with 10 queries, 5 inner steps, MLP 40-40; a scanned chunk of "
        f"200 SVI steps, minimum over {args.repeats} repeats. BMAML: M particles, 5 SVGD steps on the "
        "support (second order unless stated), s = 1 leader step on support + query."
    )
    title = "Benchmark: BMAML's training step against MAML's"
    write_results(HERE, title, intro, markdown_table(head, table), command, minutes, {"rows": rows})


if __name__ == "__main__":
    main()
