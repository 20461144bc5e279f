"""MAML's optimization fixes and the landscape diagnostics on Omniglot (METHODS 5-7; issue #6, 7b-c).

    .venv/bin/python experiments/omniglot_fixes/run.py compare   [--ways 5 20] [--seeds 0 1 2] [--only ...]
    .venv/bin/python experiments/omniglot_fixes/run.py landscape [--seeds 0 1] [--only ...]

`compare` meta-trains plain MAML and each fix as a configuration of the same engine (learned inner
rates, L2F, Hessian regularization, Meta-PCGrad, the trajectory regularizer) on 5-way and 20-way
1-shot tasks from the minimal background sets, 3 seeds each, and tests every run on 600 tasks of the
held-out alphabets; the notes compare each fix with MAML seed by seed (the same seed gives the same
test tasks), with a 95% t-interval over seeds. `landscape` trains MAML, first-order MAML, the
fine-tuning baseline and L2F (for its degree of conflict per layer) on 5-way 1-shot with the
landscape diagnostics on 16 held-out tasks every 250 iterations, and reports each metric's
correlation with held-out accuracy over training.
Writes compare/ and landscape/ (RESULTS.md, results.json) beside this file; finished runs are reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import stats

from bayesmeta.experiment import Cell, Outcome, run_grid, script
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
BASE = HERE / "base.toml"

# Per setting: the training tasks' ways, meta-batch and iterations (reduced for 2 CPU cores, see NOTES)
SETTINGS = {
    5: ("task.params.ways=5", "train.meta_batch=16", "train.steps=1000"),
    20: ("task.params.ways=20", "train.meta_batch=8", "train.steps=800"),
}
FIXES = {
    "MAML": (),
    "learned rates": ("model.params.learned_lr='per_layer_step'", "model.params.lr_init=0.4"),
    "learned rates (init 0.04)": ("model.params.learned_lr='per_layer_step'", "model.params.lr_init=0.04"),
    "L2F": ("model.method='l2f'",),
    "Hessian reg": ("model.params.hessian_reg=0.001",),
    "Hessian reg (lambda 1e-4)": ("model.params.hessian_reg=0.0001",),
    "Meta-PCGrad": ("train.task_gradients='pcgrad'",),
    "trajectory reg": ("model.params.trajectory_reg=0.5",),
}
WAYS_OF = {"learned rates (init 0.04)": (5,), "Hessian reg (lambda 1e-4)": (20,)}  # default: both
METRICS = ["accuracy@1", "accuracy@5", "history/accuracy@5/250", "history/accuracy@5/500"]
PUBLISHED = {  # METHODS 2 and 6 (full Omniglot, 60,000 iterations; the landscape paper: 5 inner steps)
    ("MAML", "5-way 1-shot"): 0.987,
    ("MAML", "20-way 1-shot"): 0.9405,
    ("trajectory reg", "20-way 1-shot"): 0.9538,
}


def setting(ways: int) -> str:
    return f"{ways}-way 1-shot"


def compare_cells(ways: list[int], seeds: list[int], only: list[str] | None) -> list[Cell]:
    """Seed-major, so that an interrupted invocation leaves whole seeds behind."""
    return [
        Cell(fix, setting(w), seed, (*SETTINGS[w], *over))
        for seed in seeds
        for w in ways
        for fix, over in FIXES.items()
        if (not only or fix in only) and w in WAYS_OF.get(fix, SETTINGS)
    ]


def paired(outcomes: list[Outcome], metric: str = "accuracy@5") -> str:
    """Markdown: each fix minus MAML per seed (same seed, same test tasks), mean and 95% t-interval."""
    acc = {
        (o.cell.method, o.cell.setting, o.cell.seed): o.metrics["metrics"][metric]["mean"]
        for o in outcomes
        if o.metrics is not None
    }
    rows = []
    for s in dict.fromkeys(o.cell.setting for o in outcomes):
        for fix in FIXES:
            seeds = sorted(k[2] for k in acc if k[:2] == (fix, s) and ("MAML", s, k[2]) in acc)
            if fix == "MAML" or not seeds:
                continue
            d = np.array([acc[(fix, s, k)] - acc[("MAML", s, k)] for k in seeds])
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.nan
            lo, hi = d.mean() - half, d.mean() + half
            verdict = "better" if lo > 0 else "worse" if hi < 0 else "no significant difference"
            per = ", ".join(f"{100 * v:+.1f}" for v in d)
            ci = f"[{100 * lo:+.2f}, {100 * hi:+.2f}] pt"
            rows.append([s, fix, f"{per} pt", f"{100 * d.mean():+.2f} pt", ci, verdict])
    header = ["setting", "fix", f"{metric} minus MAML, per seed", "mean", "95% CI over seeds", "verdict"]
    return markdown_table(header, rows) + "\n"


def compare(ways: list[int], seeds: list[int], only: list[str] | None) -> None:
    res = run_grid(
        "MAML's fixes on Omniglot 1-shot (minimal background sets): against plain MAML",
        BASE,
        compare_cells(ways, seeds, only),
        METRICS,
        HERE / "compare",
        published={(m, s, metric): v for (m, s), v in PUBLISHED.items() for metric in METRICS[:2]},
        notes=COMPARE_NOTES,
        progress=False,
        wide=True,
    )
    res.notes = COMPARE_NOTES + "\n### Each fix against MAML, paired by seed\n\n" + paired(res.outcomes)
    res.write()


LANDSCAPE_METHODS = {
    "MAML": ("model.method='maml'",),
    "first-order MAML": ("model.method='fomaml'",),
    "L2F": ("model.method='l2f'",),  # for METHODS 5's degree of conflict per layer, against MAML's
    # pre-training on the episodes' global labels (720 classes), as in experiments/omniglot
    "fine-tuning": (
        "model.method='finetune'",
        "model.adapt='head'",
        "model.inner_lr=0.5",
        "task.params.ways=20",
        "task.queries=5",
        "train.meta_batch=4",
        "eval.task.params.ways=5",
        "eval.inner_steps=[1, 50]",
    ),
}
DIAGNOSTICS = ("gradient_coherence", "trajectory_coherence", "representation_coherence", "flatness")
LANDSCAPE = (
    "train.steps=3000",
    "train.diagnostics_every=250",
    "train.diagnostics_tasks=16",
    "train.diagnostics_power_iterations=10",
)


def landscape(seeds: list[int], only: list[str] | None) -> None:
    cells = [
        Cell(m, "5-way 1-shot", seed, (*LANDSCAPE, *over))
        for seed in seeds
        for m, over in LANDSCAPE_METHODS.items()
        if not only or m in only
    ]
    metrics = ["accuracy@max", *(f"landscape/final/{d}" for d in DIAGNOSTICS)]
    metrics += [f"landscape/correlation/{d}" for d in DIAGNOSTICS]
    res = run_grid(
        "Landscape diagnostics over training on Omniglot 5-way 1-shot: MAML, first-order MAML, L2F, "
        "fine-tuning",
        BASE,
        cells,
        metrics,
        HERE / "landscape",
        notes=LANDSCAPE_NOTES,
        progress=False,
        wide=True,
    )
    res.notes = (
        LANDSCAPE_NOTES
        + "\n### Degree of conflict per layer at the end of training (radians)\n\n"
        + conflicts(res.outcomes)
        + "\n### Series (held-out tasks, every 250 iterations)\n\n"
        + series(res.outcomes)
    )
    res.write()


def conflicts(outcomes: list[Outcome]) -> str:
    """Markdown: per run, L2F's degree of conflict E_i |arccos(u_hat_i . v)| of each layer, final value."""
    done = [o for o in outcomes if o.metrics is not None and "landscape" in o.metrics]
    if not done:
        return "(no runs)\n"
    layers = sorted({k for o in done for k in o.metrics["landscape"]["final"] if k.startswith("conflict_")})
    rows = []
    for o in done:
        final = o.metrics["landscape"]["final"]
        rows.append([o.cell.name, *("n/a" if final.get(k) is None else f"{final[k]:.3f}" for k in layers)])
    return markdown_table(["run", *(k[len("conflict_") :] for k in layers)], rows) + "\n"


def series(outcomes: list[Outcome]) -> str:
    """Markdown: per run, the held-out accuracy and each diagnostic at every diagnostics step."""
    out = []
    for o in outcomes:
        if o.metrics is None or "landscape" not in o.metrics:
            continue
        land = o.metrics["landscape"]
        names = [f"test_{land['test_metric']}", *DIAGNOSTICS]
        rows = [
            [step, *("n/a" if land["values"][n][i] is None else f"{land['values'][n][i]:.4g}" for n in names)]
            for i, step in enumerate(land["step"])
        ]
        out += [f"{o.cell.name}:\n\n" + markdown_table(["step", *names], rows), ""]
    return "\n".join(out) + "\n"


COMPARE_NOTES = """
Every row is plain MAML's configuration plus one setting (the rows' overrides are in run.py's FIXES):
conv4 (64 filters, stride-2 convolutions, transductive batch norm), second-order MAML with 1 inner
step at alpha 0.4 (Finn et al.'s Omniglot setting), 1 query per class in training, Adam 1e-3; 5-way at
meta-batch 16 for 1,000 iterations, 20-way at meta-batch 8 for 800 iterations (the papers: 60,000
iterations on full Omniglot). Test: 600 tasks of the held-out alphabets Early_Aramaic and Korean with 5
queries per class (eval seed 1234: every run of a setting sees the same tasks), after 1 and 5 inner
steps. history/accuracy@5/N is the held-out accuracy after 5 steps on 100 monitor tasks at iteration
N: how fast a run converges (the learned rates' claim).

The fixes: "learned rates" learns one inner rate per parameter tensor and inner step (with 1 inner
step: per tensor), initialised at MAML's alpha 0.4; "init 0.04" starts them at the poster's Omniglot
value (5-way only); L2F attenuates every tensor of the initialisation by a task-conditioned gamma in
(0, 1), starting at 0.9; Hessian reg adds 0.001 * mean_i ||Hessian of the support loss at phi_i||_F^2
(1 Hutchinson probe per task; the poster found 0.01 too strong: on these runs ||H||_F^2 is about 900
at initialisation and 30 after training on 5-way tasks, so 0.01 would dominate the loss at first).
At 20-way, 0.001 stalled training on every seed (held-out accuracy about 16 % after 800 iterations,
chance 5 %), so the row "lambda 1e-4" (20-way only) was added after seeing that; we did not tune
lambda further. Meta-PCGrad projects each task's meta-gradient off the conflicting others before the
update; the trajectory regularizer corrects the adapted parameters with gamma 0.5 (their Algorithm
1; the paper: 5 inner steps at alpha 0.1). Published (full Omniglot, 60,000 iterations): MAML 98.7 %
5-way and 94.05 % 20-way 1-shot, the trajectory regularizer 95.38 % 20-way (the landscape paper, 5
inner steps); no row comes near them at this budget, so the absolute numbers are not reproductions.
What this table measures is the paired difference from MAML under one budget, below.
"""

LANDSCAPE_NOTES = """
METHODS 6's Omniglot finding: gradient, trajectory and representation coherence rise and fall with
meta-test accuracy, flatness does not track it, and fine-tuning shows near-zero coherence. Each run
records the four metrics on 16 held-out 5-way 1-shot tasks every 250 iterations (with the held-out
accuracy after the method's longest test-time adaptation on 100 tasks at the same step), in its
sample_stats (`diag_*`) and metrics.json; landscape/correlation/<metric> is the Pearson r over those
steps between the metric and that accuracy, landscape/final/<metric> its value at the end. MAML and
first-order MAML: 1 inner step at alpha 0.4, meta-batch 16, 3,000 iterations (gradient coherence is
the one-step quantity the paper defines). Fine-tuning: pre-trained on 20-way episodes' global labels
(meta-batch 4); its probe starts from the pre-trained body with a zero 5-way head and adapts the head
by 1 step at rate 0.5, so its trajectories and gradients live in the head only. L2F (METHODS 5) is
trained like MAML; its probe adapts from the task-attenuated initialisation, and the degree of
conflict per layer (u_i = -grad_theta of the query loss through the adaptation) is what its paper
reports lower than MAML's.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["compare", "landscape"])
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--ways", type=int, nargs="+", default=[5, 20], choices=sorted(SETTINGS))
    p.add_argument("--only", nargs="+", help="row labels to run (default: all)")
    args = p.parse_args()
    if args.what == "compare":
        compare(args.ways, args.seeds or [0, 1, 2], args.only)
    else:
        landscape(args.seeds or [0, 1], args.only)


if __name__ == "__main__":
    script(main)
