"""Benchmark: memory and time of second-order MAML against the number of inner steps, with and
without rematerialisation of the inner step (model.remat).

    .venv/bin/python experiments/bench/remat/run.py [--repeats 5]      # MLP, then the conv net
    .venv/bin/python experiments/bench/remat/run.py --conv-only [--conv-repeats 3]
    .venv/bin/python experiments/bench/remat/run.py --quick           # seconds; writes to a temp dir

MLP 1-40-40-1 on the sinusoid, meta-batch 25, 10-shot, second-order; and the conv4 net (64 filters,
stride-2 downsampling) on Omniglot 5-way 1-shot with 1 query per class, meta-batch 4, inner step 0.4
(experiments/omniglot/base.toml). Memory is XLA's own account of the compiled SVI step (temporary
buffers plus arguments and outputs), which is what grows with the steps; time is the minimum over
repeats of dispatched steps (200 for the MLP, --conv-calls for the conv net). --conv-only measures the
conv net and keeps the MLP results of results.json. Writes RESULTS.md / results.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bayesmeta import config, registry
from bayesmeta.bench import dispatched_step, memory_mib
from bayesmeta.experiment import machine
from bayesmeta.io import write_json, write_text
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
OMNIGLOT = HERE.parents[1] / "omniglot" / "base.toml"
STEPS = (1, 5, 10, 25, 50)
POLICIES = ("none", "nothing_saveable", "dots_saveable", "sqrt")
CONV_POLICIES = ("none", "nothing_saveable", "sqrt")


def mlp_config(inner_steps: int, policy: str) -> config.Config:
    return registry.load_config(
        None,
        [
            "train.meta_batch=25",
            "task.shots=10",
            f"model.inner_steps={inner_steps}",
            f"model.remat='{policy}'",
            "model.inner_lr=0.001",
        ],
    )


def conv_config(inner_steps: int, policy: str, meta_batch: int, filters: int) -> config.Config:
    return registry.load_config(
        OMNIGLOT,
        [
            "task.queries=1",
            f"train.meta_batch={meta_batch}",
            f"model.net.filters={filters}",
            "model.first_order=false",
            f"model.inner_steps={inner_steps}",
            f"model.remat='{policy}'",
        ],
    )


def measure(cfg: config.Config, calls: int, repeats: int) -> dict[str, float]:
    compile_s, best, step = dispatched_step(cfg, calls, repeats)
    return {**memory_mib(step), "ms_per_step": best * 1e3, "compile_s": compile_s}


def table(results: dict, steps: tuple[int, ...], policies: tuple[str, ...]) -> str:
    rows = [
        [s, *(f"{results[p][s]['memory_mib']:.2f} / {results[p][s]['ms_per_step']:.2f}" for p in policies)]
        for s in map(str, steps)
    ]
    return markdown_table(["inner steps", *(f"{p}: MiB / ms per step" for p in policies)], rows)


def ratios(results: dict, hi: int, lo: int) -> dict[str, float]:
    return {p: r[str(hi)]["memory_mib"] / r[str(lo)]["memory_mib"] for p, r in results.items()}


def summary(r: dict[str, float], hi: int, lo: int) -> str:
    return f"memory at {hi} steps / at {lo} steps: " + ", ".join(f"{p} {v:.2f}x" for p, v in r.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="MLP: repeats of 200 steps")
    p.add_argument("--conv-repeats", type=int, default=3)
    p.add_argument("--conv-calls", type=int, default=5, help="conv: dispatched steps per repeat")
    p.add_argument("--conv-meta-batch", type=int, default=4)
    p.add_argument("--conv-only", action="store_true", help="measure the conv net; keep results.json's MLP")
    p.add_argument("--quick", action="store_true", help="tiny check (steps 1 and 5, 8 filters), temp dir")
    args = p.parse_args()
    steps, policies, conv_policies, calls, filters, mb = (
        STEPS,
        POLICIES,
        CONV_POLICIES,
        200,
        64,
        args.conv_meta_batch,
    )
    repeats, conv_repeats, conv_calls, out_dir = args.repeats, args.conv_repeats, args.conv_calls, HERE
    if args.quick:
        steps, policies, conv_policies, calls, filters, mb = (
            (1, 5),
            ("none", "sqrt"),
            ("none", "sqrt"),
            5,
            8,
            2,
        )
        repeats, conv_repeats, conv_calls = 1, 1, 2
        out_dir = Path(tempfile.mkdtemp(prefix="bench_remat_"))
    hi, lo = steps[-1], 5 if steps[-1] > 5 else steps[0]  # the ratio: 50 over 5 steps
    base = ".venv/bin/python experiments/bench/remat/run.py"

    mlp_steps, mlp_policies, mlp_hi, mlp_lo = steps, policies, hi, lo
    if args.conv_only:  # the MLP results of the last full run, as they are
        previous = json.loads((HERE / "results.json").read_text())
        mlp = {k: previous[k] for k in ("command", "machine", "ratio_50_over_5", "results")}
        mlp_steps, mlp_policies, mlp_hi, mlp_lo = STEPS, POLICIES, 50, 5
    else:
        res = {pol: {str(s): measure(mlp_config(s, pol), calls, repeats) for s in steps} for pol in policies}
        mlp = {
            "command": f"{base} --quick" if args.quick else f"{base} --repeats {repeats}",
            "machine": machine(),
            "ratio_50_over_5": ratios(res, hi, lo),
            "results": res,
        }
        print(table(res, steps, policies), summary(mlp["ratio_50_over_5"], hi, lo), sep="\n")

    res = {
        pol: {str(s): measure(conv_config(s, pol, mb, filters), conv_calls, conv_repeats) for s in steps}
        for pol in conv_policies
    }
    conv_cmd = f"{base} --quick" if args.quick else f"{base} --conv-only --conv-repeats {conv_repeats}"
    if not args.quick and not args.conv_only:
        conv_cmd = f"{mlp['command']} --conv-repeats {conv_repeats}"
    if not args.quick and (conv_calls, mb) != (5, 4):
        conv_cmd += f" --conv-calls {conv_calls} --conv-meta-batch {mb}"
    conv = {
        "command": conv_cmd,
        "machine": machine(),
        "meta_batch": mb,
        "filters": filters,
        "ratio_50_over_5": ratios(res, hi, lo),
        "results": res,
    }
    conv_table = table(res, steps, conv_policies)
    print(conv_table, summary(conv["ratio_50_over_5"], hi, lo), sep="\n")

    write_text(
        out_dir / "RESULTS.md",
        (
            "# Benchmark: rematerialised inner loops (second-order MAML)\n\n"
            f"{'QUICK CHECK, NOT RESULTS.\n\n' if args.quick else ''}"
            "Memory: XLA's memory analysis of the compiled SVI step (temporaries + arguments + outputs); "
            "time: minimum over repeats of dispatched steps on one batch. Issue #7's target with "
            "rematerialisation: memory at 50 inner steps at most 3x that at 5 steps.\n\n"
            "## MLP 1-40-40-1 on the sinusoid\n\n"
            "Meta-batch 25, 10-shot, inner step 0.001; 200 steps per repeat.\n\n"
            f"{table(mlp['results'], mlp_steps, mlp_policies)}\n\n"
            f"{summary(mlp['ratio_50_over_5'], mlp_hi, mlp_lo)}. The "
            "MLP's per-step carry (the adapted parameters of 25 tasks) is what remains per step under "
            f"rematerialisation.\n\n- command: `{mlp['command']}`\n- machine: {mlp['machine']}\n\n"
            "## Conv4 on Omniglot 5-way 1-shot\n\n"
            f"{filters} filters, stride-2 downsampling, 1 query per class, meta-batch {mb}, inner step 0.4 "
            f"(experiments/omniglot/base.toml); {conv_calls} steps per repeat, {conv_repeats} repeats.\n\n"
            f"{conv_table}\n\n{summary(conv['ratio_50_over_5'], hi, lo)}.\n\n"
            f"- command: `{conv_cmd}`\n- machine: {conv['machine']}\n"
        ),
    )
    write_json(out_dir / "results.json", {**mlp, "conv": conv})
    print("wrote", out_dir / "RESULTS.md")


if __name__ == "__main__":
    main()
