"""MAML-RL against MAML+L2F on 2D point navigation (issue #19 part B; Finn et al. 2017 section 5.3,
Baik et al. 2020 section 4.3), with the baselines of MAML's paper: a policy pretrained on all goals
then fine-tuned, and a randomly initialised policy fine-tuned. Returns after 0, 1, 2, 3 policy-gradient
adaptation steps on held-out goals, 5 seeds, 95% t-intervals over seeds, trajectory figure.

    .venv/bin/python experiments/meta_rl/navigation/run.py [--steps 500] [--seeds 0 1 2 3 4]
    .venv/bin/python experiments/meta_rl/navigation/run.py --smoke   # ~1 minute: checks the pipeline

Writes RESULTS.md, results.json and figures/ beside this file; finished cells are kept in cells/ and
reused. `--smoke` writes into runs/smoke/ instead (git ignores runs/), so it is never mistaken for results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from bayesmeta import registry
from bayesmeta.experiment import machine
from bayesmeta.fit import NonFiniteError, fit, initial_state, make_svi
from bayesmeta.io import write_json, write_text
from bayesmeta.rl.navigation import adaptation_returns
from bayesmeta.run import Setup
from bayesmeta.stats import t_half_width
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
STEPS = 3  # test-time adaptation steps
EVAL_GOALS = 40  # held-out goals per seed (the reference's test script samples 40)
METHODS = {  # label: (overrides, trained)
    "MAML": (("model.method='maml_rl'",), True),
    "MAML+L2F": (("model.method='l2f_rl'",), True),
    "pretrained": (("model.method='maml_rl'", "model.inner_steps=0"), True),
    "random": (("model.method='maml_rl'",), False),
}
SMOKE = (
    "model.net.hidden=[32, 32]",
    "task.params.horizon=30",
    "eval.task.params.horizon=30",
    "train.steps=5",
    "train.meta_batch=4",
    "train.log_every=5",
    "model.params.trajectories=8",
)


def evaluate(setup: Setup, params: dict, eval_seed: int, goals: int) -> dict:
    """Mean return per held-out goal after 0..STEPS steps (goals x (STEPS + 1)), and positions of goal 0."""
    batch = setup.eval_family.sample(jax.random.fold_in(jax.random.PRNGKey(eval_seed), 10**6), goals)
    out = jax.jit(lambda p, k: adaptation_returns(setup.method, p, batch, k, STEPS))(
        params, jax.random.PRNGKey(eval_seed + 1)
    )
    return {
        "returns": np.asarray(out["returns"]).tolist(),
        "goal": np.asarray(batch.info["goal"][0]).tolist(),
        "positions": np.asarray(out["positions"][0, :, :5]).tolist(),  # goal 0: 5 episodes per step
    }


def run_cell(label: str, seed: int, extra: tuple[str, ...], goals: int, out_dir: Path) -> dict:
    """Train (unless random) and evaluate one (method, seed); reuse its record in cells/ if unchanged."""
    overrides, trained = METHODS[label]
    cfg = registry.load_config(HERE / "base.toml", [*overrides, *extra, f"seed={seed}"])
    record = out_dir / "cells" / f"{label}-seed{seed}.json"
    key = {"config": str(cfg), "trained": trained, "goals": goals}
    if record.is_file() and (old := json.loads(record.read_text())).get("key") == key:
        return old
    setup = Setup.from_config(cfg)
    t0 = time.perf_counter()
    if trained:
        try:
            result = fit(
                setup.method, setup.family, cfg.train, seed=seed, progress=False, desc=f"{label}-{seed}"
            )
        except NonFiniteError as e:  # recorded: the same seed diverges again; the table says so
            cell = {"key": key, "label": label, "seed": seed, "error": str(e)}
            cell["train_seconds"], cell["eval_seconds"] = time.perf_counter() - t0, 0.0
            write_json(record, cell)
            return cell
        params = result.params
    else:  # the initial parameters of the same seed, never trained
        svi = make_svi(setup.method, cfg.train, seed)
        params = svi.get_params(initial_state(svi, setup.family, cfg.train, seed)[0])
    train_s = time.perf_counter() - t0
    ev = evaluate(setup, params, cfg.eval.seed, goals)
    cell = {"key": key, "label": label, "seed": seed, "train_seconds": train_s} | ev
    cell["eval_seconds"] = time.perf_counter() - t0 - train_s
    write_json(record, cell)
    return cell


def summary(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "half_width": t_half_width(values),
        "median": float(np.median(values)),
        "per_seed": values,
    }


def fmt(s: dict) -> str:
    hw = s["half_width"]
    return f"{s['mean']:.2f}" + ("" if hw is None else f" ± {hw:.2f}")


def claim(cells: dict, seeds: list[int]) -> tuple[str, list[dict]]:
    """'MAML+L2F adapts faster than MAML': met when the paired-by-seed difference of the mean return
    (L2F minus MAML, over the seeds where neither diverged) has its 95% t-interval above 0 after each of
    1, 2, 3 steps; not met otherwise."""
    rows, signs = [], []
    paired = [s for s in seeds if "mean" in cells["MAML+L2F", s] and "mean" in cells["MAML", s]]
    for k in range(1, STEPS + 1):
        d = [cells["MAML+L2F", s]["mean"][k] - cells["MAML", s]["mean"][k] for s in paired]
        s = summary(d)
        hw = s["half_width"]
        sign = None if hw is None else (1 if s["mean"] - hw > 0 else -1 if s["mean"] + hw < 0 else 0)
        signs.append(sign)
        rows.append({"steps": k, **s, "sign": sign})
    if any(v is None for v in signs):
        return "no verdict (one seed: no interval)", rows
    if all(v == 1 for v in signs):
        return "met", rows
    if all(v == -1 for v in signs):
        return "not met (MAML+L2F is worse than MAML at every step count)", rows
    return "not met (no step count at which MAML+L2F is significantly better at each of 1-3 steps)", rows


def figure(cells: dict, seed: int, path: Path) -> Path:
    """Trajectories of seed `seed` on held-out goal 0, before (0 steps) and after 1 and 3 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(METHODS)
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4), sharex=True, sharey=True)
    for ax, label in zip(axes, labels, strict=True):
        c = cells[label, seed]
        pos = np.asarray(c["positions"])  # (STEPS + 1, episodes, H, 2)
        for k, color in ((0, "tab:gray"), (1, "tab:blue"), (STEPS, "tab:red")):
            for i, ep in enumerate(pos[k]):
                path_xy = np.concatenate([np.zeros((1, 2)), ep])
                ax.plot(*path_xy.T, color=color, lw=0.8, alpha=0.7, label=f"{k} steps" if i == 0 else None)
        ax.plot(*c["goal"], "k*", ms=14, label="goal")
        ax.plot(0, 0, "ko", ms=5)
        ax.set_title(label)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=500, help="meta-training iterations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--smoke", action="store_true", help="tiny run, 1 seed, into runs/smoke/ (not results)")
    args = p.parse_args()
    if args.smoke:
        extra, seeds, goals, out_dir = SMOKE, [0], 4, HERE / "runs" / "smoke"
        title = "2D navigation, SMOKE TEST (5 iterations, horizon 30, 1 seed): not results"
    else:
        extra, seeds, goals, out_dir = (f"train.steps={args.steps}",), args.seeds, EVAL_GOALS, HERE
        title = f"MAML-RL and MAML+L2F on 2D navigation, {args.steps} meta-iterations, {len(seeds)} seeds"
    t0 = time.perf_counter()
    cells = {}
    for label in METHODS:
        for seed in seeds:
            c = run_cell(label, seed, extra, goals, out_dir)
            cells[label, seed] = c
            if "error" in c:
                print(f"{label} seed {seed}: FAILED: {c['error']}", flush=True)
                continue
            c["mean"] = np.asarray(c["returns"]).mean(0).tolist()  # over held-out goals, per step count
            print(f"{label} seed {seed}: " + ", ".join(f"{v:.2f}" for v in c["mean"]), flush=True)
    ok = {label: [s for s in seeds if "mean" in cells[label, s]] for label in METHODS}
    table = {
        label: [summary([cells[label, s]["mean"][k] for s in ok[label]]) for k in range(STEPS + 1)]
        for label in METHODS
    }
    failed = [
        f"{label} seed {s}: {cells[label, s]['error']}"
        for label in METHODS
        for s in seeds
        if s not in ok[label]
    ]
    verdict, contrast = claim(cells, seeds)
    first = next(s for s in seeds if all(s in ok[label] for label in METHODS))
    fig = figure(cells, first, out_dir / "figures" / "trajectories.png")
    wall = time.perf_counter() - t0
    compute = sum(c["train_seconds"] + c["eval_seconds"] for c in cells.values())
    cmd = "experiments/meta_rl/navigation/run.py " + ("--smoke" if args.smoke else f"--steps {args.steps}")
    header = ["method", "seeds", *(f"return after {k} steps" for k in range(STEPS + 1))]
    rows = [
        [label, len(ok[label]), *(f"{fmt(s)} ({s['median']:.2f})" for s in table[label])] for label in METHODS
    ]
    # a trained policy that returns less before adaptation than the same seed's untrained policy collapsed
    collapsed = [
        f"{label} seed {s}"
        for label in METHODS
        if label != "random"
        for s in ok[label]
        if "mean" in cells["random", s] and cells[label, s]["mean"][0] < cells["random", s]["mean"][0]
    ]
    seed_rows = [
        [label, s, *(f"{v:.2f}" for v in cells[label, s]["mean"])] for label in METHODS for s in ok[label]
    ]
    crow = [
        [r["steps"], fmt(r), {1: "above 0", -1: "below 0", 0: "covers 0"}.get(r["sign"], "n/a")]
        for r in contrast
    ]
    md = f"""# {title}

Command: `.venv/bin/python {cmd}` (seeds {seeds}; {goals} held-out goals per seed; wall time
{wall / 60:.1f} min, compute {compute / 60:.1f} min summed over cells, including reused ones; {machine()}).

Mean undiscounted return over the held-out goals (model.params.trajectories episodes per goal and step
count, horizon task.params.horizon: base.toml with the command's overrides),
after 0-{STEPS} policy-gradient adaptation steps at the training step size; mean over seeds ± the 95%
t-interval half-width over the seeds whose training finished (a run that stopped on a non-finite
loss is listed below and left out), and in brackets the median over seeds. With 5 seeds one collapsed
run dominates a mean: read the medians and the per-seed table below.

{markdown_table(header, rows)}

Failed runs: {"; ".join(failed) if failed else "none"}. Collapsed runs (before adaptation, a lower
return than the same seed's untrained policy): {", ".join(collapsed) if collapsed else "none"}.

## Claim: "MAML+L2F adapts faster than MAML on 2D navigation" (L2F, Section 4.3, Figure 5a)

**{verdict}.** Paired by seed, MAML+L2F minus MAML (return after k steps):

{markdown_table(["steps k", "difference (mean ± 95% CI)", "interval"], crow)}

Met means the interval lies above 0 after each of 1, 2 and 3 steps.

### Per seed (mean return over the held-out goals after 0-{STEPS} steps)

{markdown_table(["method", "seed", *(f"{k} steps" for k in range(STEPS + 1))], seed_rows)}

![trajectories](figures/trajectories.png)

Trajectories of seed {first} on one held-out goal (the star), 5 episodes before adaptation (grey),
after 1 step (blue) and after {STEPS} steps (red).

## Protocol and departures from the papers

- Environment and settings: `base.toml` (bayesmeta/rl/navigation.py, models/maml_rl.py). Reward minus
  the squared distance (the papers' text; the reference code uses minus the distance), actions scaled
  from [-1, 1] to +-0.1 and clipped (rllab's `normalize`), no early stop within 0.01 of the goal.
- Inner loop: REINFORCE with a linear feature baseline fitted per batch, advantages divided by their sd,
  losses averaged over the n H steps as in the reference code. Meta-gradient through the inner step
  with DiCE's surrogate (the score-function terms of the inner rollouts), so the Hessian of the
  expected return is estimated without bias (ProMP's formulation II). Meta-optimizer Adam (lr 0.01)
  through the SVI engine, not TRPO as in both papers.
- MAML+L2F computes gamma_i from the policy gradient on one extra batch of 20 episodes at theta (before
  its 0-step return): it sees 20 more episodes of each task than MAML at every step count.
- pretrained: the same model with no inner step in training (policy gradient on the average return
  over goals), fine-tuned by the same steps; random: the seed's initial policy, fine-tuned.
"""
    write_text(out_dir / "RESULTS.md", md)
    write_json(
        out_dir / "results.json",
        {
            "title": title,
            "command": cmd,
            "seeds": seeds,
            "goals": goals,
            "returns": table,
            "failed": failed,
            "collapsed": collapsed,
            "claim": {
                "statement": "MAML+L2F adapts faster than MAML",
                "verdict": verdict,
                "contrast": contrast,
            },
            "wall_seconds": wall,
            "figure": str(fig.relative_to(out_dir)),
        },
    )
    print(md)


if __name__ == "__main__":
    main()
