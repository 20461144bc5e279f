"""Benchmark: a cost model of conv MAML on Omniglot (issue #15 item 2): time and memory as the work grows.

    .venv/bin/python experiments/bench/cost/run.py [--repeats 3]
    .venv/bin/python experiments/bench/cost/run.py --quick     # seconds; writes to a temp dir

From one base configuration (conv4 with 64 filters, stride-2 downsampling, 5-way 1-shot with 5 queries
per class, meta-batch 8, one second-order inner step of 0.4: experiments/omniglot/base.toml) one factor
is varied at a time: meta-batch, shots, queries per class, ways, filters, and inner steps (second order
with and without rematerialisation of the inner step, and first order). Per point: one SVI step's
compile time, its time (minimum over repeats of `--calls` steps dispatched back to back), tasks per
second, XLA's memory account (temporaries + arguments + outputs) and, for one inner step, XLA's FLOP
count over the time against the float32 GEMM rate measured in the same run (XLA counts a loop body
once, so more inner steps have no FLOP count). Each curve's scaling exponent b of time ~ x^b (and of
memory) is the least-squares slope on log-log axes. Writes RESULTS.md, results.json and cost.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bayesmeta import config, registry
from bayesmeta.bench import dispatched_step, flops, gemm_gflops, memory_mib
from bayesmeta.experiment import machine
from bayesmeta.io import write_json, write_text
from bayesmeta.report import save_fig
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
OMNIGLOT = HERE.parents[1] / "omniglot" / "base.toml"
BASE = {
    "train.meta_batch": 8,
    "task.shots": 1,
    "task.queries": 5,
    "task.params.ways": 5,
    "model.net.filters": 64,
    "model.inner_steps": 1,
}
# factor -> (config key, values); the inner-step curves are run in three variants (VARIANTS)
AXES = {
    "meta-batch": ("train.meta_batch", (2, 4, 8, 16, 32)),
    "shots": ("task.shots", (1, 2, 5, 10)),
    "queries per class": ("task.queries", (1, 5, 10, 15)),
    "ways": ("task.params.ways", (5, 10, 20)),
    "filters": ("model.net.filters", (16, 32, 64, 128)),
    "inner steps": ("model.inner_steps", (1, 2, 4, 8)),
}
VARIANTS = {
    "second order": ("model.first_order=false",),
    "second order, remat": ("model.first_order=false", "model.remat='nothing_saveable'"),
    "first order": ("model.first_order=true",),
}
QUICK_AXES = {"meta-batch": ("train.meta_batch", (1, 2)), "inner steps": ("model.inner_steps", (1, 2))}


def point(overrides: dict[str, int], variant: tuple[str, ...], calls: int, repeats: int) -> dict[str, float]:
    """Compile time, time per step, tasks/s, memory and (one inner step) FLOPs of one configuration."""
    cfg: config.Config = registry.load_config(
        OMNIGLOT, [*(f"{k}={v}" for k, v in overrides.items()), "eval.task.queries=1", *variant]
    )
    compile_s, t, step = dispatched_step(cfg, calls, repeats)
    fl = flops(step) if cfg.model.inner_steps == 1 else None
    return {
        "compile_s": compile_s,
        "seconds_per_step": t,
        "tasks_per_second": cfg.train.meta_batch / t,
        **memory_mib(step),
        "gflop_per_step": None if fl is None else fl / 1e9,
        "gflops": None if fl is None else fl / t / 1e9,
    }


def exponent(xs: list[float], ys: list[float]) -> float:
    """b of y ~ a x^b: the least-squares slope of log y on log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def curves(axes: dict, base: dict[str, int], calls: int, repeats: int) -> dict[str, dict]:
    """Every factor's curve(s): {factor: {variant: {"x": [...], "points": [...], exponents}}}."""
    out: dict[str, dict] = {}
    for factor, (key, values) in axes.items():
        variants = VARIANTS if key == "model.inner_steps" else {"second order": VARIANTS["second order"]}
        out[factor] = {}
        for name, variant in variants.items():
            pts = []
            for v in values:
                pts.append(point({**base, key: v}, variant, calls, repeats))
                print(f"{factor}={v} ({name}): {pts[-1]['seconds_per_step'] * 1e3:.1f} ms", flush=True)
            out[factor][name] = {
                "x": list(values),
                "points": pts,
                "time_exponent": exponent(list(values), [p["seconds_per_step"] for p in pts]),
                "memory_exponent": exponent(list(values), [p["memory_mib"] for p in pts]),
            }
    return out


def plot(res: dict[str, dict], path: Path) -> Path:
    """One panel per factor: ms per step (solid) and XLA memory (dashed, right axis) on log-log axes,
    the fitted exponents in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    n = len(res)
    cols = min(n, 3)
    fig, axs = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.4 * ((n + cols - 1) // cols))
    )
    for ax, (factor, variants) in zip(np.ravel(axs), res.items(), strict=False):
        mem_ax = ax.twinx()
        for i, (name, c) in enumerate(variants.items()):
            color = f"C{i}"
            ms = [p["seconds_per_step"] * 1e3 for p in c["points"]]
            mib = [p["memory_mib"] for p in c["points"]]
            ax.plot(c["x"], ms, "o-", color=color, label=f"{name}: time ~ x^{c['time_exponent']:.2f}")
            mem_ax.plot(
                c["x"],
                mib,
                "s--",
                color=color,
                alpha=0.6,
                label=f"{name}: memory ~ x^{c['memory_exponent']:.2f}",
            )
        for a in (ax, mem_ax):
            a.set_xscale("log")
            a.set_yscale("log")
            for axis in (a.xaxis, a.yaxis):
                axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(c["x"])
        ax.set(xlabel=factor, ylabel="ms per SVI step (solid)", title=factor)
        mem_ax.set_ylabel("XLA memory MiB (dashed)")
        lines = ax.get_legend_handles_labels()
        mem = mem_ax.get_legend_handles_labels()
        ax.legend(lines[0] + mem[0], lines[1] + mem[1], fontsize=6)
    for ax in np.ravel(axs)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return save_fig(fig, path)


def table(res: dict[str, dict], peak: float) -> str:
    rows = []
    for factor, variants in res.items():
        for name, c in variants.items():
            for x, p in zip(c["x"], c["points"], strict=True):
                rate = p["gflops"]
                rows.append(
                    [
                        factor,
                        name,
                        x,
                        f"{p['compile_s']:.1f}",
                        f"{p['seconds_per_step'] * 1e3:.1f}",
                        f"{p['tasks_per_second']:.1f}",
                        f"{p['memory_mib']:.0f}",
                        "-" if rate is None else f"{rate:.1f} ({rate / peak:.0%})",
                    ]
                )
    header = [
        "factor",
        "variant",
        "value",
        "compile s",
        "ms per step",
        "tasks/s",
        "XLA memory MiB",
        "GFLOP/s (of GEMM)",
    ]
    return markdown_table(header, rows)


def exponents(res: dict[str, dict]) -> str:
    rows = [
        [
            factor,
            name,
            f"{c['time_exponent']:.2f}",
            f"{c['memory_exponent']:.2f}",
            f"{c['x'][0]}-{c['x'][-1]}",
        ]
        for factor, variants in res.items()
        for name, c in variants.items()
    ]
    return markdown_table(["factor", "variant", "time exponent", "memory exponent", "range"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=3, help="steps dispatched back to back per timed repeat")
    p.add_argument(
        "--quick", action="store_true", help="tiny check (8 filters, two points per axis), temp dir"
    )
    args = p.parse_args()
    started = time.perf_counter()
    axes, base, calls, repeats, out_dir = AXES, BASE, args.calls, args.repeats, HERE
    cmd = f".venv/bin/python experiments/bench/cost/run.py --repeats {repeats} --calls {calls}"
    if args.quick:
        axes, calls, repeats = QUICK_AXES, 1, 1
        base = {**BASE, "model.net.filters": 8, "train.meta_batch": 2}
        out_dir = Path(tempfile.mkdtemp(prefix="bench_cost_"))
        cmd = ".venv/bin/python experiments/bench/cost/run.py --quick"
    gemm = gemm_gflops((64, 128) if args.quick else (512, 1024, 2048), repeats)
    peak = max(gemm.values())
    res = curves(axes, base, calls, repeats)
    plot(res, out_dir / "cost.png")
    gemm_s = ", ".join(f"{k}: {v:.1f}" for k, v in gemm.items())
    minutes = (time.perf_counter() - started) / 60
    write_text(
        out_dir / "RESULTS.md",
        (
            "# Benchmark: the cost of conv MAML on Omniglot as the work grows\n\n"
            f"{'QUICK CHECK, NOT RESULTS. ' if args.quick else ''}Base: conv4 with "
            f"{base['model.net.filters']} filters, {base['task.params.ways']}-way {base['task.shots']}-shot "
            f"with {base['task.queries']} queries per class, meta-batch {base['train.meta_batch']}, one "
            "second-order inner step (experiments/omniglot/base.toml); one factor varied at a time. Time: "
            f"minimum over {repeats} repeats of {calls} SVI steps dispatched back to back. Memory: XLA's "
            "account of one compiled step (temporaries + arguments + outputs). GFLOP/s: XLA's FLOP count "
            "of one step over its time (one inner step only: XLA counts a loop body once), against the "
            f"best float32 GEMM of this run, {peak:.1f} GFLOP/s (square sizes {gemm_s}). Exponents: the "
            "least-squares slope of log time (memory) on log factor. The plot is cost.png.\n\n"
            f"## Scaling exponents\n\n{exponents(res)}\n\n## Every point\n\n{table(res, peak)}\n\n"
            f"- command: `{cmd}`\n- machine: {machine()}\n- time: the benchmark took {minutes:.1f} min, "
            "compiles included\n"
        ),
    )
    write_json(
        out_dir / "results.json",
        {
            "command": cmd,
            "machine": machine(),
            "quick": args.quick,
            "gemm_gflops": gemm,
            "base": base,
            "curves": res,
        },
    )
    print("wrote", out_dir / "RESULTS.md")


if __name__ == "__main__":
    main()
