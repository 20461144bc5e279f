"""Ambiguous tasks: MAML, MAML with learned output noise, LLAMA and PLATIPUS on the sine/line mixture.

    .venv/bin/python experiments/ambiguous/run.py [--seeds 0 1 2] [--steps 15000]

5-shot (the PLATIPUS figures) and a mode-rich 2-shot setting; 3 seeds; 300 test tasks; 20 posterior
predictive draws per task. Writes RESULTS.md / results.json here and the figure of sampled functions
on ambiguous support sets (figures/<method>/sample_001.png, drawn by `bayesmeta sample` on the first
seed's runs).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from bayesmeta.experiment import product, run_grid

HERE = Path(__file__).parent
METHODS = {
    "MAML": ("model.method='maml'",),
    "MAML + learned noise": ("model.method='maml'", "model.noise='learned'"),
    "LLAMA": ("model.method='llama'", "model.params.curvature='ggn'", "model.params.prior_precision=100.0"),
    # clipped: unclipped, one 2-shot run's loss went to NaN at step 8455 (the NaN guard stopped it)
    "PLATIPUS": ("model.method='platipus'", "model.params.kl_weight=0.1", "train.grad_clip=10.0"),
}
SETTINGS = {"5-shot": ("task.shots=5",), "2-shot": ("task.shots=2",)}
S = "5"
METRICS = [
    "mse@5",
    f"calibration/{S}/nll",
    f"calibration/{S}/coverage/0.9",
    f"calibration/{S}/width/0.9",
    f"calibration/{S}/mode_coverage",
    f"calibration/{S}/mode_coverage_ambiguous",
]
NOTES = """
What the table shows. The issue's target is reached for PLATIPUS: its 20 sampled functions include
both a sine-like and a line-like one on 72% of the ambiguous 5-shot tasks and 74% of the 2-shot
tasks (all 2-shot support sets count as ambiguous), where MAML's single function covers one
hypothesis by construction (0%). LLAMA's Laplace samples also reach both modes on 64% of ambiguous
5-shot tasks but only 34% at 2-shot. The price is accuracy and calibration: no method's 90% interval
is calibrated; MAML with a learned output noise is the best calibrated (87% / 81% coverage) simply by
inflating its learned noise sd to 1.7-1.8 (5-shot; 1.7-2.7 at 2-shot; the true sd is 0.3), which gives
90% intervals 5.1 wide, and PLATIPUS's samples are too narrow where
they agree (59% coverage, 90% intervals 1.9 wide at 5 shots). Tasks whose support loss rose under
test-time adaptation (the divergence rule) are counted in the table's last column and left out of the
means and the calibration: 5 of 900 5-shot and 18 of 900 2-shot PLATIPUS tasks, 9 to 19 for the other
methods; the earlier run of this table, made before the rule, had one PLATIPUS task whose exploding
samples made the row's mean 90% width 4.5e27. Unclipped, one 2-shot PLATIPUS run
hit a NaN at step 8455 and was stopped by the NaN guard; the rows here use global-norm clipping at
10, which is now part of the configuration.

Reduced protocol for a 2-core CPU: MLP 40-40 (the public port used 3 x 100), meta-batch 10, 15,000
iterations (the port used 70,000), 5 inner steps at 0.01, KL weight 0.1 for PLATIPUS, Gaussian
likelihood with sd 0.3 (learned for "MAML + learned noise"). LLAMA uses the exact Gauss-Newton
Laplace approximation of the whole network with prior precision 100 (tau = 1 gave wild samples in a
smoke run). Metrics at 5 test-time inner steps: MSE of the predictive mean; predictive NLL of the
20-sample mixture; coverage and width of the central 90% interval of y; mode coverage = fraction of
tasks whose 20 sampled functions include both a sine-like and a line-like one, over all tasks and
over the ambiguous ones (support points fitted within 2 noise sds by both a line and a sinusoid). A
deterministic MAML can only reach mode coverage 0. The PLATIPUS paper's own numbers are on CelebA
attributes, which are not available here, so there is no published value to compare with.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=15000)
    args = p.parse_args()
    labels = {m.replace(" + ", "+").replace(" ", "_"): over for m, over in METHODS.items()}
    cells = product(labels, SETTINGS, args.seeds, (f"train.steps={args.steps}",))
    run_grid(
        "Ambiguous sine/line regression: accuracy, calibration and mode coverage",
        HERE / "base.toml",
        cells,
        METRICS,
        HERE,
        notes=NOTES,
        progress=False,
        wide=True,
    )
    for cell in cells:
        if cell.seed == args.seeds[0] and cell.setting == "2-shot":
            run_dir = HERE / "runs" / cell.name
            figures = HERE / "figures" / cell.method
            shutil.rmtree(figures, ignore_errors=True)  # `sample` numbers its files: this run's is 001
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bayesmeta.cli",
                    "sample",
                    str(run_dir),
                    "--samples",
                    "20",
                    "--task-seed",
                    "7",
                    "--out",
                    str(figures),
                ],
                check=True,
            )


if __name__ == "__main__":
    main()
