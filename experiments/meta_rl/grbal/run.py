"""GrBAL and ReBAL against MB and MB+DE when the dynamics change mid-episode (Nagabandi et al. 2019;
survey 002's GrBAL slides; issue #19 part A), on a pendulum in pure JAX (bayesmeta/tasks/dynamics.py).

    .venv/bin/python experiments/meta_rl/grbal/run.py               # 5 seeds, 5000 meta-training steps
    .venv/bin/python experiments/meta_rl/grbal/run.py --smoke       # ~1 min: checks the pipeline

1. Dynamics models, meta-trained through the engine (bayesmeta.experiment.run_grid) on the
   `pendulum_dynamics` family (M = 16 support transitions, K = 16 query transitions per window):
   GrBAL = `maml` (1 inner step, learned per-layer step size psi, as the paper's learned rate),
   ReBAL = `rebal` (an LSTM over the window), MB = `maml` with zero inner steps (one model fitted to
   the pooled windows, never adapted). Their held-out one-step MSE is in the first table.
2. MPC episodes (bayesmeta.control: CEM, re-planned every step, each model adapted online on the last
   M = 16 transitions): from the hanging position under the training-time "before" dynamics for T1
   steps, then the dynamics change (mass doubles, actuator gain halves) for T2 steps, in two settings:
   "hold", the pendulum continues from where it is; "knock", it is also reset to hanging at the change,
   so the controller must swing it up again under the new dynamics. MB+DE is the MB model with
   dynamic evaluation (one SGD step of its NLL on the last M transitions after every step, kept).
   "oracle" plans with the true dynamics of each phase (a reference, not a method).

Writes RESULTS.md and results.json beside this file (runs under runs/; --smoke into runs/smoke/), with
the cost after the change per controller (mean over seeds, 95% t-interval), paired contrasts by seed,
figures of the cost over time after the change and of trajectories, and the claim "GrBAL beats MB and
MB+DE when the dynamics change" stated as met or not met per setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bayesmeta
from bayesmeta import control
from bayesmeta.experiment import product, run_grid
from bayesmeta.io import write_json, write_text
from bayesmeta.report import save_fig
from bayesmeta.stats import t_half_width
from bayesmeta.tables import markdown_table
from bayesmeta.tasks.dynamics import Dynamics

HERE = Path(__file__).parent
METHODS = {
    "GrBAL": ("model.method='maml'", "model.params.learned_lr='per_layer_step'"),
    "MB": ("model.method='maml'", "model.inner_steps=0"),
    "ReBAL": ("model.method='rebal'",),
}
SETTINGS = {"fit": ()}
SMOKE = (
    "train.steps=300",
    "train.log_every=100",
    "train.eval_every=300",
    "train.checkpoint_every=300",
    "train.eval_tasks=20",
    "eval.tasks=100",
)
BEFORE = (1.0, 1.0, 0.1, 1.0)  # mass, length, friction, gain
AFTER = (2.0, 1.0, 0.1, 0.5)  # mass doubles, the actuator gain halves
CONTROLLERS = ("GrBAL", "ReBAL", "MB", "MB+DE", "oracle")
WINDOW = 16
DE_LR = 0.01


def dyn(values: tuple[float, ...]) -> Dynamics:
    return Dynamics(*(jnp.float32(v) for v in values))


def exact_model(env: object, d: Dynamics) -> control.OnlineModel:
    """The true dynamics d as a predictor (the oracle's model)."""

    def f(sx: jax.Array, sy: jax.Array, qx: jax.Array) -> jax.Array:
        s = jnp.stack([jnp.arctan2(qx[:, 1], qx[:, 0]), qx[:, 2] * env.max_speed], -1)
        return env.targets(s, jax.vmap(lambda a, u: env.step(d, a, u))(s, qx[:, 3] * env.max_torque))

    return control.adapting(f)


def models(runs: dict[str, bayesmeta.api.Run]) -> dict[str, tuple]:
    """Each controller's (model before the change, model after): the same online model except the oracle."""
    mb = runs["MB"]
    out = {
        "GrBAL": control.adapting(
            control.predictor(runs["GrBAL"].setup.eval_method, runs["GrBAL"].params, 1)
        ),
        "ReBAL": control.adapting(
            control.predictor(runs["ReBAL"].setup.eval_method, runs["ReBAL"].params, 0)
        ),
        "MB": control.adapting(control.predictor(mb.setup.eval_method, mb.params, 0)),
        "MB+DE": control.dynamic_evaluation(mb.setup.eval_method, mb.params, DE_LR, 1),
    }
    env = mb.setup.family.env
    return {k: (v, v) for k, v in out.items()} | {
        "oracle": (exact_model(env, dyn(BEFORE)), exact_model(env, dyn(AFTER)))
    }


def two_phase(
    env: object,
    pre: control.OnlineModel,
    post: control.OnlineModel,
    planner: object,
    t1: int,
    t2: int,
    knock: bool,
):
    """Jitted key -> (states (T1 + T2 + 1, 2), cost (T1 + T2,), model error (T1 + T2,)) of one episode:
    warm-up window from hanging, T1 steps of BEFORE, the change (and, with knock, a reset to hanging),
    T2 steps of AFTER; the buffer and the model state carry over the change."""
    down = jnp.array([jnp.pi, 0.0])
    b = jax.tree.map(lambda a: jnp.full((t1,), a), dyn(BEFORE))
    a = jax.tree.map(lambda v: jnp.full((t2,), v), dyn(AFTER))

    @jax.jit
    def run(key: jax.Array) -> tuple:
        k1, k2, k3 = jax.random.split(key, 3)
        s, buf = control.warmup(env, dyn(BEFORE), down, k1, WINDOW)
        e1 = control.episode(env, b, pre, planner, s, k2, buf)
        state = e1.model_state if pre is post else None
        s2 = down if knock else e1.states[-1]
        e2 = control.episode(env, a, post, planner, s2, k3, e1.buffer, state)
        states = jnp.concatenate([e1.states, e2.states[1:]])
        if knock:
            states = states.at[t1].set(down)  # the knock: the state the second phase starts from
        return states, jnp.concatenate([e1.cost, e2.cost]), jnp.concatenate([e1.model_error, e2.model_error])

    return run


def ci(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), t_half_width(values)


def fmt(m: float, h: float | None) -> str:
    return f"{m:.3f}" + ("" if h is None else f" ± {h:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--episodes", type=int, default=4, help="MPC episodes per seed, controller and setting")
    p.add_argument("--t1", type=int, default=100, help="steps before the change")
    p.add_argument("--t2", type=int, default=100, help="steps after the change")
    p.add_argument("--planner", choices=["cem", "rs"], default="cem")
    p.add_argument("--smoke", action="store_true", help="300 steps, seed 0, short episodes, into runs/smoke/")
    p.add_argument("--out", type=Path, help="write here instead of beside this file (e.g. a pilot run)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.smoke:
        extra, seeds, out_dir = SMOKE, [0], HERE / "runs" / "smoke"
        args.episodes, args.t1, args.t2 = 1, 40, 40
        title = "GrBAL / ReBAL pendulum, SMOKE TEST (300 steps, 1 seed, 40 + 40 MPC steps): not results"
    else:
        extra, seeds, out_dir = (f"train.steps={args.steps}",), args.seeds, args.out or HERE
        title = f"GrBAL / ReBAL, a pendulum whose dynamics change mid-episode ({args.steps} training steps)"
    t0 = time.perf_counter()
    cells = product(METHODS, SETTINGS, seeds, extra)
    res = run_grid(
        title, HERE / "base.toml", cells, ["mse@0", "mse@1"], out_dir, progress=not args.no_progress
    )
    planner = (
        control.cem(200, 15, -2.0, 2.0, iterations=3, elites=20)
        if args.planner == "cem"
        else control.random_shooting(500, 15, -2.0, 2.0)
    )
    # per setting, controller, seed: cost curves (episodes, T1 + T2), and seed 0's first trajectory
    curves: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    errors: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    trajectories: dict[str, dict[str, np.ndarray]] = {}
    for seed in seeds:
        runs = {m: bayesmeta.open_run(out_dir / "runs" / f"{m}-fit-seed{seed}") for m in METHODS}
        env = runs["MB"].setup.family.env
        for name, (pre, post) in models(runs).items():
            for setting, knock in (("hold", False), ("knock", True)):
                ep = two_phase(env, pre, post, planner, args.t1, args.t2, knock)
                outs = [ep(jax.random.fold_in(jax.random.PRNGKey(seed), e)) for e in range(args.episodes)]
                curves.setdefault(setting, {}).setdefault(name, {})[seed] = np.stack(
                    [np.asarray(o[1]) for o in outs]
                )
                errors.setdefault(setting, {}).setdefault(name, {})[seed] = np.stack(
                    [np.asarray(o[2]) for o in outs]
                )
                if seed == seeds[0]:
                    trajectories.setdefault(setting, {})[name] = np.asarray(outs[0][0])
                after = curves[setting][name][seed][:, args.t1 :].mean()
                print(f"seed {seed} {setting} {name}: cost after the change {after:.3f}", flush=True)
    summary, claims, rows, contrast_rows = {}, {}, [], []
    for setting, by_name in curves.items():
        per_seed = {n: [float(c[:, args.t1 :].mean()) for c in by_name[n].values()] for n in by_name}
        pre_seed = {
            n: [float(c[:, args.t1 // 2 : args.t1].mean()) for c in by_name[n].values()] for n in by_name
        }
        err_seed = {
            n: [float(c[:, args.t1 : args.t1 + 20].mean()) for c in errors[setting][n].values()]
            for n in by_name
        }
        summary[setting] = {
            n: {
                "cost_after_per_seed": per_seed[n],
                "cost_after": ci(per_seed[n]),
                "cost_before_second_half": ci(pre_seed[n]),
                "model_error_first_20_after": ci(err_seed[n]),
            }
            for n in by_name
        }
        for n in by_name:
            rows.append([setting, n, fmt(*ci(pre_seed[n])), fmt(*ci(per_seed[n])), fmt(*ci(err_seed[n]))])
        verdicts = []
        for base in ("MB", "MB+DE"):
            d = np.asarray(per_seed["GrBAL"]) - np.asarray(per_seed[base])
            m, h = ci(list(d))
            better = h is not None and m + h < 0
            verdicts.append(better)
            sig = (
                "n/a (one seed)"
                if h is None
                else "GrBAL lower"
                if better
                else "GrBAL higher"
                if m - h > 0
                else "no significant difference"
            )
            contrast_rows.append([setting, f"GrBAL - {base}", fmt(m, h), sig])
            summary[setting][f"GrBAL-{base}"] = {"per_seed": d.tolist(), "mean": m, "half_width": h}
        claims[setting] = "no verdict (one seed)" if len(seeds) < 2 else "met" if all(verdicts) else "not met"
    fig_curves = plot_curves(curves, args.t1, out_dir / "figures" / "cost_after_change.png")
    fig_traj = plot_trajectories(trajectories, args.t1, out_dir / "figures" / "trajectories.png")
    table = markdown_table(
        [
            "setting",
            "controller",
            f"cost per step, steps {args.t1 // 2}-{args.t1} (before)",
            "cost per step after the change",
            "model error, first 20 steps after",
        ],
        rows,
    )
    ctable = markdown_table(
        ["setting", "contrast (cost after the change)", "mean ± 95% CI over seeds", "verdict"], contrast_rows
    )
    claim_lines = "\n".join(
        f'- **{s}**: "GrBAL beats MB and MB+DE when the dynamics change": **{c}** (GrBAL\'s cost after the '
        "change must be below both, the paired 95% interval over seeds excluding 0)"
        for s, c in claims.items()
    )
    md = (
        f"# {title}\n\n## The claim\n\n{claim_lines}\n\n## MPC cost (mean over seeds ± 95% t-interval; "
        f"{args.episodes} episodes per seed)\n\n{table}\n\n## Paired by seed\n\n{ctable}\n\n"
        f"![cost after the change](figures/{fig_curves.name})\n\n![trajectories](figures/{fig_traj.name})\n\n"
        f"## Protocol\n\nDynamics (mass, length, friction, gain) {BEFORE} for {args.t1} steps, then "
        f'{AFTER} for {args.t2} steps; "knock" also resets the pendulum to hanging at the change. Planner: '
        f"{args.planner} (CEM: 3 iterations of 200 sequences, 20 elites; random shooting: 500), horizon 15, "
        f"re-planned every step; window M = {WINDOW}; MB+DE: one SGD step (lr {DE_LR}) of the MB model's "
        "NLL on the window after every step. Cost per step: gym's wrap(theta)^2 + 0.1 omega^2 + 0.001 u^2 "
        "(0 upright and still, ~9.9 hanging). Model error: squared error of the one-step prediction of the "
        "executed transition (scaled units).\n\n"
        f"- command: `{res.command}`\n- seeds: {seeds}\n- time: {(time.perf_counter() - t0) / 60:.1f} min "
        f"(this invocation, including any training; runs reused: {sum(o.reused for o in res.outcomes)})\n\n"
        f"## Dynamics models (held-out one-step MSE, scaled units)\n\n{res.table()}"
    )
    write_text(out_dir / "RESULTS.md", md)
    write_json(
        out_dir / "results.json",
        {
            "title": title,
            "command": res.command,
            "seeds": seeds,
            "claims": claims,
            "mpc": summary,
            "models": res.rows,
            "protocol": {
                "before": BEFORE,
                "after": AFTER,
                "t1": args.t1,
                "t2": args.t2,
                "planner": args.planner,
                "episodes": args.episodes,
                "window": WINDOW,
                "de_lr": DE_LR,
            },
        },
    )
    print(json.dumps(claims))


def plot_curves(curves: dict, t1: int, path: Path) -> Path:
    """Cost per step after the change, mean over seeds (each seed's mean over episodes) with 95% bands."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 3.8), squeeze=False)
    for ax, (setting, by_name) in zip(axes[0], curves.items(), strict=True):
        for i, (name, seeds) in enumerate(by_name.items()):
            c = np.stack([v.mean(0)[t1:] for v in seeds.values()])  # (seeds, T2)
            m = c.mean(0)
            ax.plot(m, color=f"C{i}", label=name)
            if len(c) > 1:
                h = np.array([t_half_width(c[:, t]) for t in range(c.shape[1])])
                ax.fill_between(np.arange(len(m)), m - h, m + h, color=f"C{i}", alpha=0.2)
        ax.set(xlabel="steps after the change", ylabel="cost per step", title=f"{setting}: after the change")
        ax.legend(fontsize=8)
    return save_fig(fig, path)


def plot_trajectories(trajectories: dict, t1: int, path: Path) -> Path:
    """The pendulum's angle |wrap(theta)| over the episode (first seed, first episode) per controller."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(trajectories), figsize=(6 * len(trajectories), 3.8), squeeze=False)
    for ax, (setting, by_name) in zip(axes[0], trajectories.items(), strict=True):
        for i, (name, states) in enumerate(by_name.items()):
            theta = np.abs(np.mod(states[:, 0] + np.pi, 2 * np.pi) - np.pi)
            ax.plot(theta, color=f"C{i}", label=name)
        ax.axvline(t1, color="k", ls="--", lw=1)
        ax.set(
            xlabel="step",
            ylabel="|angle from upright| (rad)",
            title=f"{setting}: trajectories (change at dashed line)",
        )
        ax.legend(fontsize=8)
    return save_fig(fig, path)


if __name__ == "__main__":
    main()
