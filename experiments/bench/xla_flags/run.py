"""Benchmark: XLA's CPU library paths on the conv MAML step at the standard protocol (issue #15).

    .venv/bin/python experiments/bench/xla_flags/run.py [--repeats 3] [--steps 2]

The second-order conv MAML step of experiments/bench/omniglot (5-way 1-shot, 15 queries per class,
meta-batch 32, conv4 with 64 filters, the engine's patches convolution) timed in a fresh process per
XLA_FLAGS setting: the default, oneDNN thunks for matmuls and convolutions, oneDNN and XNNPACK fusion
types, XNNPACK graph fusion, and XNNPACK off. Each child measures the best float32 GEMM rate in the
same process, so each row's fraction of it is its own. Writes RESULTS.md and results.json beside
this file. Needs an otherwise idle machine: the rows are compared with one another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bayesmeta.bench import best_gemm_gflops, load_script, write_results

HERE = Path(__file__).parent
FLAGS = {
    "default": "",
    "oneDNN thunks (matmul and convolution)": "--xla_cpu_use_onednn=true",
    "oneDNN fusions dot, eltwise, reduce": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "XNNPACK fusions dot, eltwise, reduce": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "XNNPACK graph fusion, greedy": (
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"
    ),
    "XNNPACK off": "--xla_cpu_use_xnnpack=false",
}


def child(steps: int, repeats: int) -> None:
    """Time the step under this process's XLA_FLAGS; print one JSON line."""
    bench = load_script(HERE.parent / "omniglot" / "run.py", "bench_omniglot")  # its `standard` timing
    gemm = best_gemm_gflops(repeats)
    row = bench.standard(5, 1, False, 64, steps, repeats)
    print(json.dumps(row | {"gemm_gflops": gemm}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="SVI steps per timed call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.steps, args.repeats)
        return
    from bayesmeta.tables import markdown_table

    started = time.perf_counter()
    rows = {}
    for label, flags in FLAGS.items():
        env = os.environ | {"XLA_FLAGS": flags}
        cmd = [sys.executable, __file__, "--child", f"--steps={args.steps}", f"--repeats={args.repeats}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            rows[label] = {"flags": flags, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            rows[label] = {"flags": flags} | json.loads(lines[-1])
        print(label, rows[label], flush=True)
    table = []
    for label, r in rows.items():
        flags = f"`{r['flags']}`" if r["flags"] else "(none)"
        if "error" in r:
            table.append([label, flags, "failed: " + r["error"][:120], "", "", "", ""])
            continue
        table.append(
            [
                label,
                flags,
                f"{r['compile_s']:.1f}",
                f"{r['seconds_per_step_min'] * 1e3:.0f}",
                f"{r['gflops_achieved']:.1f}",
                f"{r['gemm_gflops']:.1f}",
                f"{r['gflops_achieved'] / r['gemm_gflops']:.1%}",
            ]
        )
    head = ["setting", "XLA_FLAGS", "compile s", "ms per step", "GFLOP/s", "GEMM GFLOP/s", "of GEMM"]
    minutes = (time.perf_counter() - started) / 60
    command = ".venv/bin/python experiments/bench/xla_flags/run.py"
    command += f" --steps {args.steps} --repeats {args.repeats}"
    intro = (
        "Second-order conv MAML, 5-way 1-shot, 15 queries per class, meta-batch 32, conv4 with 64 filters "
        "(patches convolution), one inner step; a fresh process per XLA_FLAGS setting; minimum over "
        f"{args.repeats} repeats of {args.steps} steps; GEMM: the best jitted float32 square matmul "
        "(1024, 2048) measured in the same process. Issue #15's target is 50% of the GEMM rate."
    )
    title = "Benchmark: XLA's CPU library paths on the conv MAML step"
    write_results(HERE, title, intro, markdown_table(head, table), command, minutes, {"rows": rows})


if __name__ == "__main__":
    main()
