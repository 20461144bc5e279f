"""Benchmark: the forward-only predictive of the conv4 metric learners with each convolution.

    .venv/bin/python experiments/bench/evaluation/conv.py [--repeats 5] [--tasks 10]

A method without an inner loop evaluates by its forward pass alone, so bayesmeta.run.forward_only
predicts with XLA's convolution (`model.net.conv = "xla"`) although it trains with the patches (whose
gradients are plain matmuls; XLA's convolution trains about 10x slower here, experiments/bench/omniglot
notes). This times one jitted predictive (compile seconds, then the minimum over repeats) of each
method with each convolution at initial parameters, on held-out Omniglot 20-way 5-shot tasks with 5
queries per class (the extended table's largest setting, 200 images per task), and XLA's FLOP count;
and a training step of each on the table's training episode (20-way 1-shot, 5 queries per class,
meta-batch 1) inside a scanned chunk of steps, as `bayesmeta fit` runs them, which is why training
keeps the patches.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from bayesmeta import registry
from bayesmeta.bench import best_gemm_gflops, compile_timed, flops, scanned_step, seconds, write_results
from bayesmeta.fit import make_svi
from bayesmeta.predict import predictive
from bayesmeta.run import Setup
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
TASK = (
    "task.family='omniglot'",
    "model.likelihood='categorical'",
    "task.params.ways=20",
    "task.params.split='test'",
    "task.shots=5",
    "task.queries=5",
    "model.net.kind='conv4'",
    "model.net.downsample='maxpool'",
)
TRAIN = ("task.params.split='train'", "task.shots=1", "train.meta_batch=1")
TRAIN_STEPS = 5
METHODS = {"ProtoNet": "protonet", "matching networks": "matching", "TADAM": "tadam"}
CONVS = ("patches", "xla")


def measure(method: str, conv: str, tasks: int, repeats: int) -> dict[str, float]:
    cfg = registry.load_config(None, [*TASK, f"model.method='{method}'", f"model.net.conv='{conv}'"])
    setup = Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(1), tasks)
    svi = make_svi(setup.method, cfg.train)
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), batch))
    key = jax.random.PRNGKey(2)
    run = predictive(setup.method, 1, 1, ("f",))
    compile_s, compiled = compile_timed(run, params, batch, key)
    best = min(seconds(lambda: compiled(params, batch, key), repeats))
    return {
        "compile_s": compile_s,
        "seconds": best,
        "gflop": flops(compiled) / 1e9,
        "train_step_s": train_step(method, conv),
    }


def train_step(method: str, conv: str) -> float:
    """Seconds per training step as `bayesmeta fit` runs them (bench.scanned_step: TRAIN_STEPS SVI
    steps in one scanned chunk, tasks sampled on device), one timed call after a warm-up."""
    cfg = registry.load_config(None, [*TASK, *TRAIN, f"model.method='{method}'", f"model.net.conv='{conv}'"])
    return scanned_step(cfg, TRAIN_STEPS, 1)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tasks", type=int, default=10)
    args = p.parse_args()
    began = time.perf_counter()
    res = {name: {c: measure(m, c, args.tasks, args.repeats) for c in CONVS} for name, m in METHODS.items()}
    rows = [
        [
            name,
            conv,
            f"{r[conv]['compile_s']:.1f}",
            f"{r[conv]['seconds'] / args.tasks * 1e3:.0f}",
            f"{r[conv]['gflop'] / r[conv]['seconds']:.1f}",
            f"{r['patches']['seconds'] / r[conv]['seconds']:.2f}",
            f"{r[conv]['train_step_s'] * 1e3:.0f}",
        ]
        for name, r in res.items()
        for conv in CONVS
    ]
    table = markdown_table(
        [
            "method",
            "conv",
            "compile s",
            "predict: ms per task",
            "GFLOP/s (XLA's count)",
            "speed-up over patches",
            "training step ms",
        ],
        rows,
    )
    gemm = best_gemm_gflops()
    print(table)
    write_results(
        HERE,
        "Benchmark: forward-only evaluation of the conv4 metric learners, patches against XLA's convolution",
        f"One jitted predictive of {args.tasks} held-out Omniglot 20-way 5-shot tasks (5 queries per class: "
        f"200 images a task) at initial parameters, minimum over {args.repeats} repeats; and one training "
        f"step as `bayesmeta fit` runs it (20-way 1-shot, 5 queries per class, one episode a step; "
        f"{TRAIN_STEPS} steps in one scanned chunk, one timed call). Best float32 GEMM "
        f"in the same run: {gemm:.1f} GFLOP/s.",
        table,
        f".venv/bin/python experiments/bench/evaluation/conv.py --repeats {args.repeats} "
        f"--tasks {args.tasks}",
        (time.perf_counter() - began) / 60,
        {"gemm_gflops": gemm, "results": res},
    )


if __name__ == "__main__":
    main()
