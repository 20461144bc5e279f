"""Benchmark: conv meta-learning steps with kernels copied per task (model.net.kernel_copies, the
default) against kernels shared by the vmapped tasks (vmap's own rule).

    .venv/bin/python experiments/bench/layout/run.py [--repeats 3]
    .venv/bin/python experiments/bench/layout/run.py --quick      # seconds; writes to a temp dir

Under vmap over tasks, a matmul of shared 3x3 kernels with each task's patches (9 c, positions) has
its task axis folded into the patches' columns, and XLA transposes every task's patches (and, in the
gradient, the cotangents) in memory first; with one copy of the kernels per task it is one batched
matmul (nets.broadcast_kernels). Every method whose tasks share conv kernels in a step is affected:
the metric, memory and graph learners (shared embedding) and MAML's first inner step (shared
initialization). Per configuration (Omniglot, conv4 with 64 filters, experiments/omniglot/base.toml):
compile time and the best time per step of `--steps` SVI steps in one scanned chunk with tasks sampled
on device (as `bayesmeta fit` trains), minimum over `--repeats`, both layouts measured back to back.
Writes RESULTS.md / results.json beside this file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bayesmeta import registry
from bayesmeta.bench import scanned_step, write_results
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
BASE = HERE.parents[1] / "omniglot" / "base.toml"
MAXPOOL = ("model.net.downsample='maxpool'", "task.queries=5")
CONFIGS = {
    "MAML 20-way 1-shot, 1 query, meta-batch 16 (NME table)": (
        "model.method='maml'",
        "task.params.ways=20",
        "task.queries=1",
        "train.meta_batch=16",
    ),
    "MAML 5-way 1-shot, 1 query, meta-batch 32": (
        "model.method='maml'",
        "task.queries=1",
        "train.meta_batch=32",
    ),
    "MAML 5-way 1-shot, 15 queries, meta-batch 32": (
        "model.method='maml'",
        "task.queries=15",
        "train.meta_batch=32",
    ),
    "fine-tuning (head) 20-way 1-shot, meta-batch 4": (
        "model.method='finetune'",
        "model.adapt='head'",
        "model.inner_lr=0.5",
        "task.params.ways=20",
        "task.queries=5",
        "train.meta_batch=4",
    ),
    "ProtoNet 5-way 1-shot, meta-batch 25": ("model.method='protonet'", *MAXPOOL, "train.meta_batch=25"),
    "ProtoNet 20-way 1-shot, meta-batch 1 (the table's)": (
        "model.method='protonet'",
        *MAXPOOL,
        "task.params.ways=20",
        "train.meta_batch=1",
    ),
    "matching networks 5-way 1-shot, meta-batch 25": (
        "model.method='matching'",
        *MAXPOOL,
        "train.meta_batch=25",
    ),
    "MANN 5-way 1-shot, meta-batch 16": ("model.method='mann'", *MAXPOOL, "train.meta_batch=16"),
    "SNAIL 5-way 1-shot, meta-batch 8": (
        "model.method='snail'",
        *MAXPOOL,
        "model.params.length=26",
        "train.meta_batch=8",
    ),
    "GNN 5-way 1-shot, meta-batch 8": ("model.method='gnn'", *MAXPOOL, "train.meta_batch=8"),
}
QUICK = ("model.net.filters=4", "train.meta_batch=2")
QUICK_CONFIGS = (
    "MAML 20-way 1-shot, 1 query, meta-batch 16 (NME table)",
    "ProtoNet 5-way 1-shot, meta-batch 25",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="SVI steps per timed chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="two configurations, 4 filters, meta-batch 2")
    args = p.parse_args()
    started = time.perf_counter()
    out_dir, configs, extra = HERE, CONFIGS, ()
    if args.quick:
        out_dir = Path(tempfile.mkdtemp(prefix="bench_layout_"))
        configs, extra = {k: CONFIGS[k] for k in QUICK_CONFIGS}, QUICK

    rows, data = [], {}
    for name, over in configs.items():
        result = {}
        for copies in (True, False):
            cfg = registry.load_config(
                BASE, [*over, f"model.net.kernel_copies={str(copies).lower()}", *extra]
            )
            compile_s, step_s, _ = scanned_step(cfg, args.steps, args.repeats)
            result["copies" if copies else "shared"] = {"compile_s": compile_s, "ms_per_step": 1e3 * step_s}
            print(
                name,
                "copies" if copies else "shared",
                f"{compile_s:.1f} s, {1e3 * step_s:.1f} ms",
                flush=True,
            )
        data[name] = result
        c, s = result["copies"], result["shared"]
        rows.append(
            [
                name,
                f"{c['compile_s']:.1f} / {s['compile_s']:.1f}",
                f"{c['ms_per_step']:.0f}",
                f"{s['ms_per_step']:.0f}",
                f"{s['ms_per_step'] / c['ms_per_step']:.2f}x",
            ]
        )
    table = markdown_table(
        [
            "configuration",
            "compile s (copies / shared)",
            "ms per step, copies",
            "ms per step, shared",
            "speed-up",
        ],
        rows,
    )
    command = ".venv/bin/python experiments/bench/layout/run.py" + (" --quick" if args.quick else "")
    if args.steps != 2 or args.repeats != 3:
        command += f" --steps {args.steps} --repeats {args.repeats}"
    intro = (
        f"Omniglot, conv4 with {'4 filters, meta-batch 2' if args.quick else '64 filters'}; "
        "one scanned chunk of SVI steps with tasks sampled on device, "
        f"{args.steps} steps per chunk, best of {args.repeats}; *copies*: model.net.kernel_copies = true "
        "(the default: shared 3x3 kernels copied per vmapped task, one batched matmul); *shared*: false "
        "(vmap's rule, which transposes the patches). Speed-up: shared time over copies time."
    )
    write_results(
        out_dir,
        "Benchmark: conv kernels per task or shared",
        intro,
        table,
        command,
        (time.perf_counter() - started) / 60,
        {"configs": data},
    )
    print(out_dir / "RESULTS.md")


if __name__ == "__main__":
    main()
