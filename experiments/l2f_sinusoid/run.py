"""L2F's sinusoid regression table (Baik, Hong & Lee 2020, METHODS 5): MAML against L2F, 5/10/20-shot,
MSE after 1, 2 and 5 test-time inner steps, 5 seeds, beside the published numbers.

    .venv/bin/python experiments/l2f_sinusoid/run.py [--steps N] [--seeds 0 1 2 3 4] [--learned-rates]
    .venv/bin/python experiments/l2f_sinusoid/run.py --smoke     # 300 steps, 1 seed: checks the pipeline

Writes RESULTS.md and results.json beside this file (runs under experiments/l2f_sinusoid/runs/);
finished runs are reused and interrupted ones resumed. `--smoke` writes into runs/smoke/ instead (git
ignores it), so a smoke table is never mistaken for results. `--learned-rates` adds MAML and L2F with
learned per-layer, per-step inner rates (MAML++, on which the paper builds L2F).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesmeta.experiment import Contrast, contrast_table, contrasts, product, run_grid, script
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
METRICS = ["mse@1", "mse@2", "mse@5"]
SHOTS = (5, 10, 20)
METHODS = {"MAML": ("model.method='maml'",), "L2F": ("model.method='l2f'",)}
# global-norm clipping of the meta-gradient: the fix for the training-loss spikes at 5 shots
CLIPPED = {
    "MAML, clipped": ("model.method='maml'", "train.grad_clip=10.0"),
    "L2F, clipped": ("model.method='l2f'", "train.grad_clip=10.0"),
}
CLIPPED_SHOTS = (5,)
LEARNED_RATES = {
    "MAML, learned rates": ("model.method='maml'", "model.params.learned_lr='per_layer_step'"),
    "L2F, learned rates": ("model.method='l2f'", "model.params.learned_lr='per_layer_step'"),
}
# METHODS 5: MSE after 1 / 2 / 5 inner steps, as published.
_PUBLISHED = {
    ("MAML", 5): (1.2247, 1.0268, 0.8995),
    ("L2F", 5): (1.0537, 0.8426, 0.7096),
    ("MAML", 10): (0.9884, 0.6192, 0.4072),
    ("L2F", 10): (0.8069, 0.5317, 0.3696),
    ("MAML", 20): (0.6144, 0.3346, 0.1817),
    ("L2F", 20): (0.5475, 0.2805, 0.1629),
}
PUBLISHED = {
    (method, f"{shots}-shot", metric): value
    for (method, shots), values in _PUBLISHED.items()
    for metric, value in zip(METRICS, values, strict=True)
}
SMOKE = (
    "train.steps=300",
    "train.log_every=100",
    "train.eval_every=300",
    "train.checkpoint_every=300",
    "train.eval_tasks=20",
    "eval.tasks=100",
    "eval.memorization_tasks=0",
)
NOTES = """
Protocol (METHODS 5): the MAML sinusoid (amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5], no noise),
K support and 10 query points per task, MLP 1-40-40-1 ReLU, 5 second-order inner steps at alpha = 0.01
in training, Adam 1e-3, meta-batch 25; MSE on 600 test tasks after 1, 2 and 5 test-time steps at
the same alpha. L2F: gamma_i = sigmoid(g(e_i)) with e_i the means of the 6 parameter tensors of
grad L(theta, D_i) and g = Linear(6, 6) -> ReLU -> Linear(6, 6) (models/l2f.py); gamma starts at 0.9.
The paper builds L2F on MAML++ (learned per-layer, per-step rates among other changes) and does not
state the iterations or meta-batch of this table; the "published" column is the paper's number, not a
setting we claim to match. Rows "..., learned rates" (with --learned-rates) add MAML++'s learned rates.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=70000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--learned-rates", action="store_true", help="add MAML and L2F with learned inner rates")
    p.add_argument("--clipped", action="store_true", help="add MAML and L2F with meta-gradient clipping")
    p.add_argument("--only", nargs="+", help="run only these method labels (the table lists what exists)")
    p.add_argument("--smoke", action="store_true", help="300 steps, seed 0, into runs/smoke/ (not results)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    methods = {**METHODS, **(LEARNED_RATES if args.learned_rates else {})}
    settings = {f"{shots}-shot": (f"task.shots={shots}",) for shots in SHOTS}
    if args.smoke:
        extra, seeds, out_dir = SMOKE, [0], HERE / "runs" / "smoke"
        title = "L2F sinusoid, SMOKE TEST (300 steps, 1 seed): not results"
    else:
        extra, seeds, out_dir = (f"train.steps={args.steps}",), args.seeds, HERE
        title = f"L2F sinusoid regression (Baik et al. 2020), {args.steps} iterations, 600 test tasks"
    cells = product(methods, settings, seeds, extra)
    if args.clipped:
        clipped = {f"{k}-shot": settings[f"{k}-shot"] for k in CLIPPED_SHOTS}
        cells += product(CLIPPED, clipped, seeds, extra)
    cells = [c for c in cells if not args.only or c.method in args.only]
    res = run_grid(
        title,
        HERE / "config.toml",
        cells,
        METRICS,
        out_dir,
        published=PUBLISHED,
        notes=NOTES,
        progress=not args.no_progress,
    )
    pairs = [("L2F", "MAML"), ("MAML, clipped", "MAML"), ("L2F, clipped", "MAML, clipped")]
    wanted = [
        Contrast(f"{k}-shot", base, method, "mse@5", _published_contrast(method, base, k))
        for k in SHOTS
        for method, base in pairs
    ]
    res.notes = (
        NOTES
        + "\n### Paired by seed (mse@5)\n\n"
        + contrast_table(contrasts(res.outcomes, wanted))
        + "\n### Training-loss spikes and the held-out MSE during training\n\n"
        + spike_table(res.outcomes)
        + SPIKE_NOTES
    )
    res.write()


def _published_contrast(method: str, base: str, shots: int) -> float | None:
    """The paper's L2F minus MAML at 5 test-time steps (None for our own rows)."""
    if (method, base) != ("L2F", "MAML"):
        return None
    return round(_PUBLISHED[("L2F", shots)][2] - _PUBLISHED[("MAML", shots)][2], 4)


def spike_table(outcomes: list) -> str:
    """Per run: the largest training loss (one meta-batch's SVI loss) with its step (metrics.json
    `largest_loss`, so cell records serve too), and the held-out mse@5 on the monitor tasks at each
    evaluation during training (metrics.json `history`)."""
    rows = []
    for o in outcomes:
        if o.metrics is None:
            continue
        big = o.metrics.get("largest_loss")
        history = o.metrics.get("history", {}).get("mse@5", {})
        trend = ", ".join(f"{int(k) // 1000}k: {v:.2f}" for k, v in history.items())
        spike = "not recorded" if big is None else f"{big['value']:.3g} ({big['step']})"
        rows.append([o.cell.name, spike, trend])
    header = ["run", "largest training loss (step)", "held-out mse@5 during training"]
    return markdown_table(header, rows) + "\n"


SPIKE_NOTES = """
Why 5-shot MAML and L2F were unstable (issue #12): in 5-shot training some meta-batches produce SVI
losses from about 1e2 up to 1e20 (L2F), where the typical loss is 1-2: the 5 inner steps at alpha
0.01 on 5 support points of a large-amplitude task blow up, and the meta-gradient through them is
enormous. Adam takes that step; after the larger spikes the held-out MSE jumps and in some seeds
never recovers (MAML seed 1: 0.74 at 5k iterations, 1.67 at 20k). The spread over seeds of the
unclipped 5-shot rows comes from these spikes, not from test-time divergence. With global-norm
clipping of the meta-gradient at 10 (`train.grad_clip=10`, rows "..., clipped") the spikes still
happen but no longer wreck the parameters: the held-out MSE falls in every clipped run and MAML's
5-shot test mse@5 is 0.306 (sd 0.005 over 5 seeds) against 1.33 (0.56) unclipped; clipped minus
unclipped MAML, paired by seed, is -1.02 (95% interval over seeds [-1.71, -0.33]). One clipped L2F run
(seed 2) stops on a NaN at step 2421 (a non-finite loss gives a non-finite gradient, which clipping
cannot scale), so that row has 4 seeds. Unclipped, L2F is not better than MAML at any shot count
(contrasts above); clipped, at 5 shots, it is better by 0.05 (interval [-0.08, -0.02] over the 4
paired seeds), a quarter of the paper's 0.19 gap, so the paper's gains are reproduced only in sign and
only with the clip.
"""


if __name__ == "__main__":
    script(main)
