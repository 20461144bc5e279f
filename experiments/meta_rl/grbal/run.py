"""GrBAL and ReBAL against MB and MB+DE when the dynamics change mid-episode (Nagabandi et al. 2019;
survey 002's GrBAL slides; issue #19 part A), on a pendulum in pure JAX (bayesmeta/tasks/dynamics.py).

    .venv/bin/python experiments/meta_rl/grbal/run.py          # 5 seeds, 5000 training steps, ~13 min, 1 core
    .venv/bin/python experiments/meta_rl/grbal/run.py --smoke       # ~2 min: checks the pipeline
    .venv/bin/python experiments/meta_rl/grbal/run.py --pilot       # the oracle pilot that chose SETTINGS

1. Dynamics models, meta-trained through the engine (bayesmeta.experiment.run_grid) on the
   `pendulum_dynamics` family (M = 16 support transitions, K = 16 query transitions per window, under
   uniformly random actions): GrBAL = `maml` (1 inner step, learned per-layer step size psi, as the
   paper's learned rate), ReBAL = `rebal` (an LSTM over the window), MB = `maml` with zero inner steps
   (one model fitted to the pooled windows, never adapted). Their held-out one-step MSE is the last table.
2. MPC episodes (bayesmeta.control: CEM, re-planned every step, each model adapted online on the last
   M = 16 transitions): from hanging under the "before" dynamics for T1 steps, then the dynamics change
   for T2 steps, in the settings of CHANGES: "hold" continues from where the pendulum is (mass doubles,
   actuator gain halves); "swing-light" and "swing-short" also reset it to hanging at the change, so
   the controller must swing it up again under the new dynamics (half the mass and a stronger motor;
   a shorter pole). MB+DE is the MB model with dynamic evaluation (one SGD step of its NLL on the last
   M transitions after every step, kept). "oracle" plans with the true dynamics of each phase.
3. A setting is informative only when the oracle succeeds in it (mean cost per step over the last
   quarter of the second phase below SUCCESS, upright and nearly still) in every episode; otherwise
   no verdict is drawn from it. The settings were chosen before the final run by the oracle-only pilot
   (`--pilot`: candidate changes, their own episode keys, no learned model), whose table is in
   PILOT.md: the first design's "knock" (mass doubles, gain halves, reset to hanging) is out because
   the oracle cannot swing the crippled pendulum up with this planner, at any horizon tried.
4. Mechanism: every model replays the oracle's transitions of the same episode (control.replay: the
   one-step prediction error of each executed transition, adapted or updated online as in MPC), so
   their errors just before and just after the change are compared on the same states and actions.

Writes RESULTS.md and results.json beside this file (runs under runs/; --smoke into runs/smoke/), with
the cost after the change per controller (mean over seeds, 95% t-interval), success rates, paired
contrasts by seed, the replayed model errors, figures, and the claim "GrBAL beats MB and MB+DE when the
dynamics change" stated per setting as met, not met or uninformative.
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
from bayesmeta.experiment import product, run_grid, script
from bayesmeta.io import write_json, write_text
from bayesmeta.report import save_fig
from bayesmeta.stats import t_half_width
from bayesmeta.tables import markdown_table
from bayesmeta.tasks.dynamics import Dynamics, Pendulum

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
# setting: (dynamics after the change, reset to hanging at the change); chosen by the --pilot table
CHANGES = {
    "hold": ((2.0, 1.0, 0.1, 0.5), False),  # mass doubles, the actuator gain halves; carry on
    "swing-light": ((0.5, 1.0, 0.1, 1.2), True),  # half the mass, a stronger motor; swing up again
    "swing-short": ((1.0, 0.75, 0.1, 1.0), True),  # a shorter pole; swing up again
}
# the oracle pilot's candidates: (after, reset, horizon); the first design's "knock" is the second row
PILOT = (
    ((1.0, 1.0, 0.1, 1.0), True, 15),  # no change, only the reset: the swing-up from rest itself
    ((2.0, 1.0, 0.1, 0.5), False, 15),
    ((2.0, 1.0, 0.1, 0.5), True, 15),
    ((2.0, 1.0, 0.1, 0.5), True, 25),
    ((2.0, 1.0, 0.1, 0.5), True, 40),
    ((1.0, 1.0, 0.1, 0.5), True, 15),
    ((1.0, 1.0, 0.1, 0.5), True, 25),
    ((1.5, 1.0, 0.1, 0.5), True, 15),
    ((2.0, 1.0, 0.1, 0.7), True, 15),
    ((1.0, 1.0, 0.1, 0.7), True, 15),
    ((2.0, 1.0, 0.1, 1.2), True, 15),
    ((1.0, 1.0, 0.3, 1.0), True, 15),
    ((0.5, 1.0, 0.1, 0.5), True, 15),
    ((0.5, 1.0, 0.1, 1.2), True, 15),
    ((0.5, 0.75, 0.0, 1.2), True, 15),
    ((1.0, 0.75, 0.1, 1.0), True, 15),
)
PILOT_KEY = 1000  # the pilot's episodes use keys PRNGKey(1000 + e), the final run's fold_in(PRNGKey(seed), e)
CONTROLLERS = ("oracle", "GrBAL", "ReBAL", "MB", "MB+DE")
LEARNED = CONTROLLERS[1:]
WINDOW = 16
DE_LR = 0.01
HORIZON = 15
SUCCESS = 0.1  # an episode succeeds when its mean cost per step over the last quarter of T2 is below this
NEAR = 20  # steps either side of the change over which replayed model errors are averaged


def dyn(values: tuple[float, ...]) -> Dynamics:
    return Dynamics(*(jnp.float32(v) for v in values))


def exact_model(env: Pendulum, d: Dynamics) -> control.OnlineModel:
    """The true dynamics d as a predictor (the oracle's model)."""

    def f(sx: jax.Array, sy: jax.Array, qx: jax.Array) -> jax.Array:
        s = jnp.stack([jnp.arctan2(qx[:, 1], qx[:, 0]), qx[:, 2] * env.max_speed], -1)
        return env.targets(s, jax.vmap(lambda a, u: env.step(d, a, u))(s, qx[:, 3] * env.max_torque))

    return control.adapting(f)


def models(runs: dict[str, bayesmeta.api.Run]) -> dict[str, control.OnlineModel]:
    """Each learned controller's online model (GrBAL adapted by its one inner step, ReBAL by its LSTM,
    MB never, MB+DE by dynamic evaluation of the MB model)."""
    mb = runs["MB"]
    return {
        "GrBAL": control.adapting(
            control.predictor(runs["GrBAL"].setup.eval_method, runs["GrBAL"].params, 1)
        ),
        "ReBAL": control.adapting(
            control.predictor(runs["ReBAL"].setup.eval_method, runs["ReBAL"].params, 0)
        ),
        "MB": control.adapting(control.predictor(mb.setup.eval_method, mb.params, 0)),
        "MB+DE": control.dynamic_evaluation(mb.setup.eval_method, mb.params, DE_LR, 1),
    }


def planner(env: Pendulum, horizon: int = HORIZON) -> control.Planner:
    return control.cem(200, horizon, -env.max_torque, env.max_torque, iterations=3, elites=20)


def two_phase(
    env: Pendulum,
    pre: control.OnlineModel,
    post: control.OnlineModel,
    plan: control.Planner,
    t1: int,
    t2: int,
    after: tuple[float, ...],
    reset: bool,
):
    """Jitted key -> dict of one episode: states (T1 + T2 + 1, 2), cost (T1 + T2,), model error
    (T1 + T2,), the executed transitions xs (T1 + T2, 4), ys (T1 + T2, 2) and the warm-up buffer:
    a warm-up window from hanging, T1 steps of BEFORE, the change (with `reset`, back to hanging),
    T2 steps of `after`; the buffer and the model state carry over the change."""
    down = jnp.array([jnp.pi, 0.0])
    b = jax.tree.map(lambda a: jnp.full((t1,), a), dyn(BEFORE))
    a = jax.tree.map(lambda v: jnp.full((t2,), v), dyn(after))

    def transitions(e: control.Episode) -> tuple:
        return env.features(e.states[:-1], e.actions), env.targets(e.states[:-1], e.states[1:])

    @jax.jit
    def run(key: jax.Array) -> dict:
        k1, k2, k3 = jax.random.split(key, 3)
        s, buf = control.warmup(env, dyn(BEFORE), down, k1, WINDOW)
        e1 = control.episode(env, b, pre, plan, s, k2, buf)
        state = e1.model_state if pre is post else None
        e2 = control.episode(env, a, post, plan, down if reset else e1.states[-1], k3, e1.buffer, state)
        (x1, y1), (x2, y2) = transitions(e1), transitions(e2)
        states = jnp.concatenate([e1.states, e2.states[1:]])
        if reset:
            states = states.at[t1].set(down)  # the state the second phase starts from
        return {
            "states": states,
            "cost": jnp.concatenate([e1.cost, e2.cost]),
            "error": jnp.concatenate([e1.model_error, e2.model_error]),
            "xs": jnp.concatenate([x1, x2]),
            "ys": jnp.concatenate([y1, y2]),
            "buffer": buf,
        }

    return run


def success(cost: np.ndarray, t2: int) -> np.ndarray:
    """Per episode (rows of cost (E, T1 + T2)): mean cost over the last quarter of T2 below SUCCESS."""
    return cost[:, -max(t2 // 4, 1) :].mean(1) < SUCCESS


def ci(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), t_half_width(values)


def fmt(m: float, h: float | None, digits: int = 3) -> str:
    return f"{m:.{digits}f}" + ("" if h is None else f" ± {h:.{digits}f}")


def pilot(out_dir: Path, t1: int, t2: int, episodes: int) -> None:
    """The oracle-only pilot: each PILOT candidate's oracle cost and success (keys PILOT_KEY + e)."""
    env, rows, found = Pendulum(), [], []
    t0 = time.perf_counter()
    for after, reset, horizon in PILOT:
        pre, post = exact_model(env, dyn(BEFORE)), exact_model(env, dyn(after))
        ep = two_phase(env, pre, post, planner(env, horizon), t1, t2, after, reset)
        cost = np.stack([np.asarray(ep(jax.random.PRNGKey(PILOT_KEY + e))["cost"]) for e in range(episodes)])
        ok = success(cost, t2)
        last = cost[:, -max(t2 // 4, 1) :].mean(1)
        found.append(
            {
                "after": after,
                "reset": reset,
                "horizon": horizon,
                "cost_after": float(cost[:, t1:].mean()),
                "cost_last_quarter": last.tolist(),
                "successes": int(ok.sum()),
                "episodes": episodes,
            }
        )
        rows.append(
            [
                str(after),
                "yes" if reset else "no",
                str(horizon),
                f"{cost[:, t1:].mean():.3f}",
                ", ".join(f"{v:.3f}" for v in last),
                f"{int(ok.sum())} of {episodes}",
            ]
        )
        print(rows[-1], flush=True)
    table = markdown_table(
        [
            "after (mass, length, friction, gain)",
            "reset to hanging",
            "CEM horizon",
            "oracle cost after",
            "cost over the last quarter, per episode",
            f"successes (< {SUCCESS})",
        ],
        rows,
    )
    cmd = (
        f".venv/bin/python experiments/meta_rl/grbal/run.py --pilot --t1 {t1} --t2 {t2} --episodes {episodes}"
    )
    md = (
        "# GrBAL pendulum: the oracle pilot that chose the settings\n\n"
        f"The oracle (CEM on the true dynamics of each phase) on candidate changes: before = {BEFORE} for "
        f"{t1} steps from hanging, then `after` for {t2} steps. Episode keys PRNGKey({PILOT_KEY} + e), "
        "disjoint from the final run's. A candidate is usable when the oracle succeeds in every episode "
        f"(mean cost per step over the last quarter of the second phase < {SUCCESS}). No learned model "
        "took part, so the choice cannot favour a method.\n\n"
        f"{table}\n\n- command: `{cmd}`\n- time: {(time.perf_counter() - t0) / 60:.1f} min\n"
    )
    write_text(out_dir / "PILOT.md", md)
    write_json(out_dir / "pilot.json", {"command": cmd, "success": SUCCESS, "candidates": found})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--episodes", type=int, default=4, help="MPC episodes per seed, controller and setting")
    p.add_argument("--t1", type=int, default=100, help="steps before the change")
    p.add_argument("--t2", type=int, default=100, help="steps after the change")
    p.add_argument("--smoke", action="store_true", help="300 steps, seed 0, short episodes, into runs/smoke/")
    p.add_argument(
        "--pilot", action="store_true", help="the oracle-only pilot of candidate changes (PILOT.md)"
    )
    p.add_argument("--out", type=Path, help="write here instead of beside this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--train-only", action="store_true", help="meta-train the grid's cells, then stop")
    args = p.parse_args()
    if args.pilot:
        pilot(args.out or HERE, args.t1, args.t2, args.episodes)
        return
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
    if args.train_only:
        return
    t1, t2 = args.t1, args.t2
    # [setting][controller][seed]: cost and own-trajectory model error (episodes, T1 + T2); replayed
    # errors on the oracle's transitions [setting][model][seed] (episodes, T1 + T2); first trajectories
    cost: dict = {}
    own_error: dict = {}
    replayed: dict = {}
    trajectories: dict = {}
    for seed in seeds:
        runs = {m: bayesmeta.open_run(out_dir / "runs" / f"{m}-fit-seed{seed}") for m in METHODS}
        env = runs["MB"].setup.family.env
        learned = models(runs)
        plan = planner(env)
        keys = [jax.random.fold_in(jax.random.PRNGKey(seed), e) for e in range(args.episodes)]
        for setting, (after, reset) in CHANGES.items():
            oracle = two_phase(
                env, exact_model(env, dyn(BEFORE)), exact_model(env, dyn(after)), plan, t1, t2, after, reset
            )
            outs = {"oracle": [oracle(k) for k in keys]}
            for name, m in learned.items():
                ep = two_phase(env, m, m, plan, t1, t2, after, reset)
                outs[name] = [ep(k) for k in keys]
                replay = jax.jit(lambda buf, xs, ys, m=m: control.replay(m, buf, xs, ys))
                replayed.setdefault(setting, {}).setdefault(name, {})[seed] = np.stack(
                    [np.asarray(replay(o["buffer"], o["xs"], o["ys"])) for o in outs["oracle"]]
                )
            for name, o in outs.items():
                cost.setdefault(setting, {}).setdefault(name, {})[seed] = np.stack(
                    [np.asarray(e["cost"]) for e in o]
                )
                own_error.setdefault(setting, {}).setdefault(name, {})[seed] = np.stack(
                    [np.asarray(e["error"]) for e in o]
                )
                if seed == seeds[0]:
                    trajectories.setdefault(setting, {})[name] = np.asarray(o[0]["states"])
                print(
                    f"seed {seed} {setting} {name}: cost after the change "
                    f"{cost[setting][name][seed][:, t1:].mean():.3f}, successes "
                    f"{int(success(cost[setting][name][seed], t2).sum())} of {args.episodes}",
                    flush=True,
                )
    summary, claims, rows, contrast_rows, mech_rows = {}, {}, [], [], []
    for setting, by_name in cost.items():
        per_seed = {n: [float(c[:, t1:].mean()) for c in by_name[n].values()] for n in by_name}
        pre_seed = {n: [float(c[:, t1 // 2 : t1].mean()) for c in by_name[n].values()] for n in by_name}
        wins = {n: np.concatenate([success(c, t2) for c in by_name[n].values()]) for n in by_name}
        own = {
            n: [float(c[:, t1 : t1 + NEAR].mean()) for c in own_error[setting][n].values()] for n in by_name
        }
        rep_after = {
            n: [float(c[:, t1 : t1 + NEAR].mean()) for c in replayed[setting][n].values()] for n in LEARNED
        }
        rep_before = {
            n: [float(c[:, t1 - NEAR : t1].mean()) for c in replayed[setting][n].values()] for n in LEARNED
        }
        summary[setting] = {
            "after": CHANGES[setting][0],
            "reset": CHANGES[setting][1],
            "controllers": {
                n: {
                    "cost_after_per_seed": per_seed[n],
                    "cost_after": ci(per_seed[n]),
                    "cost_before_second_half": ci(pre_seed[n]),
                    "successes": int(wins[n].sum()),
                    "episodes": int(wins[n].size),
                    "own_model_error_first_after": ci(own[n]),
                }
                for n in by_name
            },
            "replayed_error_on_oracle_transitions": {
                n: {"before_per_seed": rep_before[n], "after_per_seed": rep_after[n]} for n in LEARNED
            },
        }
        for n in by_name:
            rows.append(
                [
                    setting,
                    n,
                    fmt(*ci(pre_seed[n])),
                    fmt(*ci(per_seed[n])),
                    f"{int(wins[n].sum())} of {wins[n].size}",
                    fmt(*ci(own[n]), 4) if n != "oracle" else "0",
                ]
            )
        for n in LEARNED:
            mech_rows.append([setting, n, fmt(*ci(rep_before[n]), 4), fmt(*ci(rep_after[n]), 4)])
        mechanism = {}
        for base in ("MB", "MB+DE"):
            d = np.asarray(rep_after["GrBAL"]) - np.asarray(rep_after[base])
            m, h = ci(list(d))
            mechanism[base] = {"per_seed": d.tolist(), "mean": m, "half_width": h}
            mech_rows.append([setting, f"GrBAL - {base} (paired)", "", f"{fmt(m, h, 4)} ({verdict(m, h)})"])
        summary[setting]["replayed_error_after_contrasts"] = mechanism
        oracle_ok = bool(wins["oracle"].all())
        verdicts = []
        for base in ("MB", "MB+DE"):
            d = np.asarray(per_seed["GrBAL"]) - np.asarray(per_seed[base])
            m, h = ci(list(d))
            verdicts.append(h is not None and m + h < 0)
            contrast_rows.append([setting, f"GrBAL - {base}", fmt(m, h), verdict(m, h)])
            summary[setting][f"GrBAL-{base}"] = {"per_seed": d.tolist(), "mean": m, "half_width": h}
        claims[setting] = (
            f"uninformative (the oracle failed in {int((~wins['oracle']).sum())} of "
            f"{wins['oracle'].size} episodes)"
            if not oracle_ok
            else "no verdict (one seed)"
            if len(seeds) < 2
            else "met"
            if all(verdicts)
            else "not met"
        )
        summary[setting]["informative"] = oracle_ok
    figs = [
        plot_curves(cost, t1, out_dir / "figures" / "cost_after_change.png"),
        plot_trajectories(trajectories, t1, out_dir / "figures" / "trajectories.png"),
        plot_errors(replayed, t1, out_dir / "figures" / "replayed_model_error.png"),
    ]
    table = markdown_table(
        [
            "setting",
            "controller",
            f"cost per step, steps {t1 // 2}-{t1} (before)",
            "cost per step after the change",
            f"successes (last {max(t2 // 4, 1)} steps' mean cost < {SUCCESS})",
            f"own model error, first {NEAR} steps after",
        ],
        rows,
    )
    ctable = markdown_table(
        ["setting", "contrast (cost after the change)", "mean ± 95% CI over seeds", "verdict"], contrast_rows
    )
    mtable = markdown_table(
        ["setting", "model", f"error, {NEAR} steps before the change", f"error, first {NEAR} steps after"],
        mech_rows,
    )
    claim_lines = "\n".join(
        f'- **{s}** ({describe(s)}): "GrBAL beats MB and MB+DE when the dynamics change": **{c}**'
        for s, c in claims.items()
    )
    md = (
        f"# {title}\n\n## The claim\n\n{claim_lines}\n\nMet means GrBAL's cost after the change is "
        "below both MB's and MB+DE's, the paired 95% interval over seeds excluding 0. A setting is "
        f"informative only if the oracle (true dynamics) succeeds in every episode of it (mean cost over "
        f"the last {max(t2 // 4, 1)} steps < {SUCCESS}); the settings were fixed by the oracle-only pilot "
        "(PILOT.md) before this run.\n\n"
        f"## MPC cost (mean over seeds ± 95% t-interval; {args.episodes} episodes per seed)\n\n{table}\n\n"
        f"## Paired by seed\n\n{ctable}\n\n"
        "## Mechanism: one-step model error on the same transitions\n\nEvery model replays the oracle's "
        "executed transitions of each episode (bayesmeta.control.replay: adapted or updated online on the "
        "last M transitions exactly as under MPC, but on the same states and actions for all), squared "
        "error of the scaled one-step prediction summed over (dtheta, domega), averaged over the "
        f"{NEAR} steps before and after the change; mean ± 95% CI over seeds, and GrBAL minus each "
        f"baseline paired by seed.\n\n{mtable}\n\n"
        + "".join(f"![{f.stem}](figures/{f.name})\n\n" for f in figs)
        + f"## Protocol\n\nBefore: (mass, length, friction, gain) = {BEFORE} for {t1} steps from hanging "
        f"(after a {WINDOW}-step random warm-up); then each setting's dynamics for {t2} steps. Planner: "
        f"CEM, 3 iterations of 200 sequences, 20 elites, horizon {HORIZON}, re-planned every step; "
        f"window M = {WINDOW}; MB+DE: one SGD step (lr {DE_LR}) of the MB model's NLL on the window "
        "after every step. Cost per step: gym's wrap(theta)^2 + 0.1 omega^2 + 0.001 u^2 (0 upright and "
        "still, ~9.9 hanging). Own model "
        "error: the same squared error along each controller's own trajectory.\n\n"
        f"- command: `{res.command}`\n- seeds: {seeds}; episode keys fold_in(PRNGKey(seed), e)\n"
        f"- time: {(time.perf_counter() - t0) / 60:.1f} min (this invocation, including any training; runs "
        f"reused: {sum(o.reused for o in res.outcomes)})\n\n"
        f"## Dynamics models (held-out one-step MSE on random-action windows, scaled units)\n\n{res.table()}"
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
                "changes": CHANGES,
                "t1": t1,
                "t2": t2,
                "horizon": HORIZON,
                "episodes": args.episodes,
                "window": WINDOW,
                "de_lr": DE_LR,
                "success": SUCCESS,
                "near": NEAR,
            },
        },
    )
    print(json.dumps(claims))


def verdict(m: float, h: float | None) -> str:
    """Which side of 0 a paired 95% interval lies on."""
    if h is None:
        return "n/a (one seed)"
    return "GrBAL lower" if m + h < 0 else "GrBAL higher" if m - h > 0 else "no significant difference"


def describe(setting: str) -> str:
    after, reset = CHANGES[setting]
    return f"after = {after}" + (", reset to hanging" if reset else ", no reset")


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


def plot_errors(replayed: dict, t1: int, path: Path) -> Path:
    """Replayed one-step model error on the oracle's transitions around the change, mean over seeds."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(replayed), figsize=(6 * len(replayed), 3.8), squeeze=False)
    for ax, (setting, by_name) in zip(axes[0], replayed.items(), strict=True):
        lo = max(t1 - 2 * NEAR, 0)
        for i, (name, seeds) in enumerate(by_name.items()):
            c = np.stack([v.mean(0)[lo : t1 + 2 * NEAR] for v in seeds.values()])
            ax.plot(np.arange(lo, lo + c.shape[1]) - t1, c.mean(0), color=f"C{i + 1}", label=name)
        ax.axvline(0, color="k", ls="--", lw=1)
        ax.set(xlabel="steps from the change", ylabel="one-step error (scaled)", yscale="log", title=setting)
        ax.legend(fontsize=8)
    return save_fig(fig, path)


if __name__ == "__main__":
    script(main)
