"""Gold standard: how close do meta-learners come to the exact posterior predictive?

    .venv/bin/python experiments/gold_standard/run.py [--seeds 0 1 2] [--steps 15000]

MAML, first-order MAML, LLAMA, PLATIPUS and MR-MAML(W) on Bayesian basis-function regression, whose
exact posterior predictive given a support set is known in closed form (checked against NUTS in
tests/test_gold_standard.py). 3 seeds, 300 test tasks, 20 predictive draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesmeta.experiment import product, run_grid

HERE = Path(__file__).parent
METHODS = {
    "MAML": ("model.method='maml'",),
    "FOMAML": ("model.method='fomaml'",),
    "LLAMA": ("model.method='llama'", "model.params.prior_precision=100.0"),
    # clipped: unclipped, one 2-shot run's loss went to NaN at step 8455 (the NaN guard stopped it)
    "PLATIPUS": ("model.method='platipus'", "model.params.kl_weight=0.1", "train.grad_clip=10.0"),
    "MR-MAML(W)": ("model.method='mr_maml_w'", "model.params.beta=5e-5", "model.params.rho_init=-5.0"),
}
S = "5"
METRICS = [
    "mse@5",
    f"calibration/{S}/nll",
    f"calibration/{S}/coverage/0.9",
    f"calibration/{S}/width/0.9",
    f"calibration/{S}/exact/nll",
    f"calibration/{S}/exact/coverage/0.9",
    f"calibration/{S}/exact/width/0.9",
]
NOTES = """
What the table shows. None of the five methods comes within 5 points of 90% coverage: LLAMA is
closest (74%, the widest intervals among the learners and the best NLL, 1.82 against the exact 0.77),
then PLATIPUS (61%), MR-MAML(W) (52%) and MAML / FOMAML (47%, whose predictive has only the
observation noise). The exact predictive on the same tasks covers 91% with intervals of width 1.91.
Every learner's mean prediction is also far from the Bayes posterior mean: MSE 0.65 to 0.99 against
0.09 for the noise alone, after 15,000 iterations of a 40-40 MLP on a family that a 4-parameter
linear model fits exactly, so the gap mixes under-fitting with miscalibration.
Tasks whose support loss rose under test-time adaptation (the divergence rule; 0 to 27 of 900 per
row) are counted in the table and left out of the means and the calibration, and the exact columns
are computed on the same remaining tasks.

Target (issue): every method's 90% interval covers within 5 points of 90%, or the table says which
does not. The exact/... rows are the closed-form posterior predictive on the same test tasks (the same
for every method; it is the best any learner of this prior could do). MAML and FOMAML are point
estimates: their predictive is N(f, 0.3^2) with the true noise sd, so their intervals only carry
observation noise. MR-MAML(W) uses rho_init = -5 (not the NME reference's -50) so that its weight
posterior is not pinned at its floor; beta 5e-5. Same reduced protocol as experiments/ambiguous.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=15000)
    args = p.parse_args()
    cells = product(METHODS, {"5-shot": ()}, args.seeds, (f"train.steps={args.steps}",))
    run_grid(
        "Gold standard: meta-learners against the exact posterior predictive",
        HERE / "base.toml",
        cells,
        METRICS,
        HERE,
        notes=NOTES,
        progress=False,
        wide=True,
    )


if __name__ == "__main__":
    main()
