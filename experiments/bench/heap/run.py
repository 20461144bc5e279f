"""Benchmark: the Omniglot training steps with and without bayesmeta.heap's retained heap.

    .venv/bin/python experiments/bench/heap/run.py [--repeats 5] [--steps 2] [--warmup 10]

Each row times one Omniglot training step configuration in a fresh process, with
BAYESMETA_RETAIN_MEMORY=0 (glibc's defaults: XLA's buffers above 32 MiB are mmapped at every execution
and unmapped after it; bayesmeta's default) and =1 (one arena, no mmap, no trimming). The step is the
engine's: a lax.scan of `--steps` SVI updates with tasks sampled on device, as `bayesmeta fit` trains;
mean over `--repeats` calls after `--warmup` untimed ones. Per step: wall ms, minor page faults, user and
system CPU seconds; per process: peak RSS and the seconds to lower and compile the scan.
"One thread" sets XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (XLA's own thread pool still runs
parallel loops on both cores); "one thread on one core" also pins the process to core 0
(sched_setaffinity), as the experiment grids run one run per core; "two threads" is XLA's default.
Writes RESULTS.md and results.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CONFIGS = {  # label -> (bench omniglot method, meta-batch, overrides)
    "conv MAML, standard protocol: 5-way 1-shot, 15 queries, meta-batch 32, second order": (
        "MAML",
        32,
        ("task.queries=15", "task.shots=1", "task.params.ways=5"),
    ),
    "MAML as the NME table trains: 20-way 1-shot, 1 query, meta-batch 16": (
        "MAML",
        16,
        ("task.queries=1", "task.shots=1", "task.params.ways=20"),
    ),
    "ProtoNet as the Omniglot table trains: 20-way 1-shot, 5 queries, one episode": (
        "ProtoNet",
        1,
        ("task.queries=5", "task.shots=1", "task.params.ways=20"),
    ),
}
THREADS = {  # label -> (XLA_FLAGS, the cores the process may run on; None: all)
    "one thread": ("--xla_cpu_multi_thread_eigen=false", None),
    "one thread on one core": ("--xla_cpu_multi_thread_eigen=false", (0,)),
    "two threads": ("", None),
}


def child(label: str, steps: int, repeats: int, warmup: int) -> None:
    """Time one configuration's sampled training scan in this process; print one JSON line."""
    import jax

    from bayesmeta.bench import compile_timed, load_script

    bench = load_script(HERE.parent / "omniglot" / "run.py", "bench_omniglot")
    method, mb, over = CONFIGS[label]
    cfg = bench.load(method, mb, 64, *over)
    setup, svi, state, data_key, _ = bench.engine(cfg, mb)
    start = jax.numpy.int32(0)
    compile_s, exe = compile_timed(bench.scanned(svi.update, steps, setup.family, mb, data_key), state, start)
    for w in range(warmup):  # the retained heap grows to its working size in the first few calls
        jax.block_until_ready(exe(state, start + steps * (repeats + 1 + w)))
    rows = []
    for r in range(repeats):
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(exe(state, start + steps * (r + 1)))
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        rows.append(
            {
                "ms_per_step": 1e3 * wall / steps,
                "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                "user_s_per_step": (after.ru_utime - before.ru_utime) / steps,
                "sys_s_per_step": (after.ru_stime - before.ru_stime) / steps,
            }
        )
    mean = {k: sum(r[k] for r in rows) / repeats for k in rows[0]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(mean | {"compile_s": compile_s, "max_rss_mib": peak, "calls": rows}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="SVI steps per timed call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cores", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cores:  # before JAX starts its threads: they inherit the affinity
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    if args.child:
        child(args.child, args.steps, args.repeats, args.warmup)
        return
    from bayesmeta.bench import write_results
    from bayesmeta.tables import markdown_table

    started = time.perf_counter()
    rows, table = [], []
    for label in CONFIGS:
        for threads, (flags, cores) in THREADS.items():
            per = {}
            for retain in ("0", "1"):
                env = os.environ | {"XLA_FLAGS": flags, "BAYESMETA_RETAIN_MEMORY": retain}
                cmd = [sys.executable, __file__, f"--child={label}", f"--steps={args.steps}"]
                cmd += [f"--cores={','.join(map(str, cores))}"] if cores else []
                cmd += [f"--repeats={args.repeats}", f"--warmup={args.warmup}"]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                lines = done.stdout.strip().splitlines()
                if done.returncode or not lines:
                    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    sys.exit(f"{label}, {threads}, retain {retain}: {error}")
                per[retain] = json.loads(lines[-1])
                rows.append({"config": label, "threads": threads, "retain": retain == "1"} | per[retain])
                print(rows[-1], flush=True)
            off, on = per["0"], per["1"]
            table.append(
                [
                    label,
                    threads,
                    f"{off['ms_per_step']:.0f} / {on['ms_per_step']:.0f}",
                    f"{on['ms_per_step'] / off['ms_per_step']:.2f}",
                    f"{off['faults_per_step']:,.0f} / {on['faults_per_step']:,.0f}",
                    f"{off['user_s_per_step']:.2f} / {on['user_s_per_step']:.2f}",
                    f"{off['sys_s_per_step']:.2f} / {on['sys_s_per_step']:.2f}",
                    f"{off['max_rss_mib']:,.0f} / {on['max_rss_mib']:,.0f}",
                    f"{off['compile_s']:.1f} / {on['compile_s']:.1f}",
                ]
            )
    head = [
        "training step",
        "XLA threads",
        "ms per step, off / on",
        "on / off",
        "minor faults per step, off / on",
        "user CPU s per step, off / on",
        "system CPU s per step, off / on",
        "peak RSS MiB, off / on",
        "compile s, off / on",
    ]
    intro = (
        "Each training step in a fresh process, without (*off*: BAYESMETA_RETAIN_MEMORY=0, glibc's "
        "defaults, bayesmeta's default) and with (*on*: =1) the retained heap of `bayesmeta.heap`: one "
        f"arena, no mmap, no trimming. A `lax.scan` of {args.steps} SVI steps with tasks sampled on "
        f"device, mean over {args.repeats} calls after {args.warmup} untimed ones (the retained heap grows "
        "to its working size in the first few); CPU seconds and faults from "
        "getrusage over the timed call; compile: seconds to lower and compile the scan in that process. "
        "*One thread*: XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (XLA's thread pool still runs "
        "parallel loops on both cores); *on one core*: that process pinned to core 0, as "
        "the experiment grids run one run per core; *two threads*: XLA's default."
    )
    minutes = (time.perf_counter() - started) / 60
    command = ".venv/bin/python experiments/bench/heap/run.py"
    command += f" --steps {args.steps} --repeats {args.repeats} --warmup {args.warmup}"
    title = "Benchmark: the retained heap (bayesmeta.heap) on the Omniglot training steps"
    write_results(HERE, title, intro, markdown_table(head, table), command, minutes, {"rows": rows})


if __name__ == "__main__":
    main()
