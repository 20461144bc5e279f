"""Ambiguous tasks: the probabilistic meta-learners of issue #14 on the sine/line mixture.

    .venv/bin/python experiments/ambiguous/run.py [--seeds 0 1 2 3 4] [--steps 15000] [--only LABEL ...]
        [--settings 5-shot 2-shot] [--out DIR] [--extra OVERRIDE ...]

Every method of experiments/probabilistic_methods.toml, and plain MAML (one function: mode coverage 0 by
construction), 5-shot (the PLATIPUS figures) and a mode-rich 2-shot setting; 5 seeds; 300 test tasks; 20
posterior predictive draws per task; beside them the family's exact posterior predictive on the same
tasks, by importance sampling from the true task prior. Writes RESULTS.md / results.json and the held-out
curves (curves.png) here, and figures of `bayesmeta sample` of each method's first-seed 5-shot run on two
hand-written supports that a line and a sinusoid both fit (supports/two_points.csv: (-1, -1.68), (1,
1.68), fitted by y = 1.68 x and y = 2 sin x; supports/three_points.csv: (-2, -1.819), (0, 0), (2, 1.819),
fitted by y = 0.91 x and y = 2 sin x) in figures/<method>/<support>/sample_001.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from bayesmeta.experiment import (
    Condition,
    ablation_note,
    curve_table,
    exact_reference,
    joint_target_table,
    plot_curves,
    product,
    reference_rows,
    reference_table,
    run_grid,
    script,
)

HERE = Path(__file__).parent
TABLE = tomllib.loads((HERE.parent / "probabilistic_methods.toml").read_text())
PLAIN = {"MAML": ("model.method='maml'", "model.inner_clip=100.0")}  # clipped as the table's inner loops
METHODS = PLAIN | {label: tuple(over) for label, over in TABLE.items()}
SETTINGS = {"5-shot": ("task.shots=5",), "2-shot": ("task.shots=2",)}
SUPPORTS = ("two_points", "three_points")
S = "5"
METRICS = [
    "mse@5",
    f"calibration/{S}/nll",
    f"calibration/{S}/coverage/0.5",
    f"calibration/{S}/coverage/0.9",
    f"calibration/{S}/coverage/0.95",
    f"calibration/{S}/width/0.9",
    f"calibration/{S}/pit_ks",
    f"calibration/{S}/mode_coverage",
    f"calibration/{S}/mode_coverage_ambiguous",
]
# issue #14's target: one method covering both modes of the ambiguous tasks and calibrated at once
TARGETS = (
    Condition(
        f"calibration/{S}/mode_coverage_ambiguous",
        "mode coverage on ambiguous tasks >= 0.9",
        lambda v: v >= 0.9,
    ),
    Condition(
        f"calibration/{S}/coverage/0.9", "90% coverage within 3 points of 0.9", lambda v: abs(v - 0.9) <= 0.03
    ),
)
DRAWS = 2**18  # prior draws per task for the exact reference (2**16 gives the same numbers to 0.005)
EXACT = "Exact Bayes (importance sampling)"  # the family's own posterior predictive, on the same tasks
REFERENCE = ("Neural_prior_(NUTS)", EXACT)  # exact inference under a learned prior, and under the true one
NOTES = """
Protocol (issue #14): metrics at 5 test-time inner steps (methods without an inner loop ignore the
count): MSE of the predictive mean; predictive NLL of the 20-draw mixture (the sampled functions with
their Gaussian noise); coverage of that mixture's central intervals, read from the PIT F(y) of each
query target, and the 90% width; PIT KS, the Kolmogorov-Smirnov distance of the PIT values from
uniform; mode coverage, the fraction of tasks whose 20 sampled functions include
both a sine-like and a line-like one, over all tasks and over the ambiguous ones (support points
fitted within 2 noise sds by both a line and a sinusoid; every 2-shot task is ambiguous). Tasks whose
support loss rose under test-time adaptation (the divergence rule) are counted in the last column and
left out of the means and the calibration. Reduced protocol for a 2-core CPU: MLP 40-40 (the public
PLATIPUS port used 3 x 100), meta-batch 10, 15,000 iterations (the port used 70,000), 5 inner steps at
0.01, inner gradients clipped per task at global norm 100 (model.inner_clip) in every method with an
inner loop, Gaussian likelihood with sd 0.3 (learned where the method's row says model.noise='learned').
The PLATIPUS paper's own numbers are on CelebA attributes, which are not available here, so there is
no published value to compare with.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=15000)
    p.add_argument("--only", nargs="+", choices=list(METHODS), help="run only these methods")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--out", type=Path, default=HERE, help="where runs/, RESULTS.md and figures go")
    p.add_argument("--extra", nargs="*", default=[], help="config overrides for every run (ablations)")
    args = p.parse_args()
    out = args.out
    methods = {k: v for k, v in METHODS.items() if not args.only or k in args.only}
    labels = {m.replace(" + ", "+").replace(" ", "_"): over for m, over in methods.items()}
    settings = {k: SETTINGS[k] for k in args.settings}
    cells = product(labels, settings, args.seeds, (f"train.steps={args.steps}", *args.extra))
    res = run_grid(
        "Ambiguous sine/line regression: accuracy, calibration and mode coverage",
        HERE / "base.toml",
        cells,
        METRICS,
        out,
        notes=NOTES + ablation_note(args.extra),
        progress=False,
        wide=True,
    )
    plot_curves(res.outcomes, "mse@5", out / "curves.png")
    cache = out / "exact_reference.json"  # computed once per config (about 5 minutes), then read back
    exact = {s: exact_reference(HERE / "base.toml", over, DRAWS, cache) for s, over in settings.items()}
    res.notes += (
        f"\n### {EXACT}: the family's exact posterior predictive\n\n"
        "On the same test tasks: the true task prior (half sinusoids, half lines, the ranges of base.toml) "
        f"sampled {DRAWS:,} times per task and weighted by the support likelihood "
        "(bayesmeta.diagnostics.reference; the NLL, MSE and PIT from all draws, widths and mode coverage "
        "from a systematic resample). Its mode coverage is the probability that 20 posterior draws "
        "include both kinds, computed from the posterior's mass on each kind: what a learner with the "
        "exact posterior would score.\n\n" + reference_table(exact) + "\n"
    )
    exact_rows = [
        row
        for setting, ref in exact.items()
        for row in reference_rows(
            EXACT,
            setting,
            {
                f"calibration/{S}/mode_coverage_ambiguous": ref.mode_coverage_ambiguous,
                f"calibration/{S}/coverage/0.9": ref.coverage[0.9],
            },
        )
    ]
    res.notes += "\n### Target (issue #14), computed from the table above\n\n" + joint_target_table(
        res.rows + exact_rows, TARGETS, REFERENCE
    )
    beyond = [
        f"{c.label} ({', '.join(f'{r["mean"]:.3f} at {r["setting"]}' for r in rows)})"
        for c in TARGETS
        if (rows := [r for r in exact_rows if r["metric"] == c.metric])
        and not all(c.met(r["mean"]) for r in rows)
    ]
    if beyond:
        res.notes += (
            f"\nThe exact posterior itself misses: {'; '.join(beyond)}. There the target asks for more "
            "than exact inference under the true task prior gives, so a learner that met it would be "
            "spreading its draws wider than the posterior does, not calibrating better; read the learners "
            "against the exact row instead.\n"
        )
    res.notes += "\n### Held-out curves (curves.png)\n\n" + curve_table(res.outcomes, "mse@5") + "\n"
    res.write()
    for cell in cells:
        if cell.seed != args.seeds[0] or cell.setting != args.settings[0]:
            continue
        if not cell.has_run(out):  # a cell reused from its record: keep its figures
            print(f"{cell.name}: no run folder here, so no figures (committed ones kept)", file=sys.stderr)
            continue
        for support in SUPPORTS:
            figures = out / "figures" / cell.method / support
            shutil.rmtree(figures, ignore_errors=True)  # `sample` numbers its files: this run's is 001
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bayesmeta.cli",
                    "sample",
                    str(cell.run_dir(out)),
                    "--support",
                    os.path.relpath(HERE / "supports" / f"{support}.csv"),  # the figure's title shows it
                    "--samples",
                    "20",
                    "--out",
                    str(figures),
                ],
                check=True,
            )


if __name__ == "__main__":
    script(main)
