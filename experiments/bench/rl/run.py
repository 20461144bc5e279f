"""Benchmark: the speed of the meta-RL code (issue #19 item 6): environment steps per second vmapped
over tasks, meta-training iterations per second through the engine's chunk, and MPC steps per second.

    .venv/bin/python experiments/bench/rl/run.py [--repeats 3]
    .venv/bin/python experiments/bench/rl/run.py --smoke    # ~30 s: tiny sizes, 1 repeat, a temp dir

1. Environment steps per second, the environment vmapped over 1, 20 and 100 tasks: 2-D navigation
   rollouts (bayesmeta/rl/navigation.py, experiments/meta_rl/navigation/base.toml: 20 episodes per task
   of horizon 100, each action sampled from the MLP 2-100-100-2 Gaussian policy), and the pendulum of
   `pendulum_dynamics` (bayesmeta/tasks/dynamics.py) stepped 1000 times per task under given random
   actions (no policy; long enough that the call's dispatch is amortised).
2. Meta-training iterations per second of `maml_rl` and `l2f_rl` at the navigation experiment's settings
   (base.toml: meta-batch 20 goals, 20 episodes per batch, 1 inner step, DiCE), as `fit` runs them: one
   jitted chunk of 10 iterations (make_svi / make_chunk, tasks sampled on device). The environment
   steps each iteration takes (per task: the inner batch and the outer batch, and L2F's extra batch for
   its attenuator) give the rate at which training steps the environment.
3. The same for the dynamics models of experiments/meta_rl/grbal (base.toml: meta-batch 32 windows of
   16 + 16 transitions, MLP 4-64-64-2): GrBAL (`maml`, one inner step with a learned per-layer step
   size) and ReBAL (`rebal`), 200 SVI steps per chunk; and MPC steps
   per second for GrBAL's model adapted online on the last 16 transitions (bayesmeta.control.episode:
   plan, execute the first action, push the transition), with the grbal experiment's CEM (3 iterations
   of 200 sequences, 20 elites, horizon 15) and random shooting with the same horizon and the same
   number of evaluated sequences (600). The model is at its initial parameters: the time does not
   depend on their values. Model predictions per second = MPC steps x sequences x horizon per second.

Compile time (lowering and compiling the program) is reported apart from run time; run time is the
minimum over --repeats calls of the compiled program (after one untimed call); memory is XLA's account
of each compiled program (temporaries + arguments + outputs, bayesmeta.bench.memory_mib). Writes
RESULTS.md and results.json beside this file (--smoke: into a temp dir, or --out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bayesmeta import control, registry
from bayesmeta.bench import compile_timed, memory_mib, seconds
from bayesmeta.experiment import machine
from bayesmeta.fit import initial_state, make_chunk, make_svi
from bayesmeta.io import write_json, write_text
from bayesmeta.nets import make_net
from bayesmeta.rl.navigation import GaussianPolicy, rollout
from bayesmeta.run import Setup
from bayesmeta.tables import markdown_table
from bayesmeta.tasks.dynamics import Dynamics

HERE = Path(__file__).parent
NAVIGATION = HERE.parents[1] / "meta_rl" / "navigation" / "base.toml"
GRBAL = HERE.parents[1] / "meta_rl" / "grbal" / "base.toml"
# label: (overrides, rollout batches per task and iteration besides the inner steps': the outer
# batch, and L2F's batch at theta for its attenuator)
META_RL = {
    "MAML-RL": (("model.method='maml_rl'",), 1),
    "MAML+L2F": (("model.method='l2f_rl'",), 2),
}
DYNAMICS_MODELS = {  # as experiments/meta_rl/grbal/run.py's METHODS
    "GrBAL": ("model.method='maml'", "model.params.learned_lr='per_layer_step'"),
    "ReBAL": ("model.method='rebal'",),
}
# the grbal experiment's dynamics before its change: mass, length, friction, gain
BEFORE = (1.0, 1.0, 0.1, 1.0)


@dataclass(frozen=True)
class Sizes:
    """What is measured: task counts of the vmapped environments, overrides of the navigation and
    grbal configs, steps per pendulum rollout, iterations per timed chunk (navigation, dynamics), MPC
    steps per timed episode, and the planners' sequences per CEM iteration, horizon, elites, iterations."""

    tasks: tuple[int, ...] = (1, 20, 100)
    navigation: tuple[str, ...] = ()
    grbal: tuple[str, ...] = ()
    pendulum_steps: int = 1000
    nav_chunk: int = 10
    dyn_chunk: int = 200
    mpc_steps: int = 50
    candidates: int = 200
    horizon: int = 15
    elites: int = 20
    iterations: int = 3


FULL = Sizes()
SMOKE = Sizes(
    tasks=(1, 2),
    navigation=(
        "task.params.horizon=10",
        "model.params.trajectories=4",
        "model.net.hidden=[]",
        "train.meta_batch=2",
    ),
    grbal=("train.meta_batch=4", "task.shots=4", "task.queries=4", "model.net.hidden=[]"),
    pendulum_steps=10,
    nav_chunk=2,
    dyn_chunk=2,
    mpc_steps=2,
    candidates=10,
    horizon=3,
    elites=3,
    iterations=2,
)


def timed(fn: Callable, args: tuple, repeats: int) -> dict[str, float]:
    """Compile seconds, the minimum seconds of a call over `repeats`, and XLA's memory (MiB) of jit(fn)."""
    compile_s, exe = compile_timed(fn, *args)
    best = min(seconds(lambda: exe(*args), repeats))
    return {"compile_s": compile_s, "seconds": best, "memory_mib": memory_mib(exe)["memory_mib"]}


def navigation_rollouts(sizes: Sizes, tasks: int, repeats: int) -> dict[str, float]:
    """n episodes of the policy on each of `tasks` goals, vmapped over the goals (one program)."""
    cfg = registry.load_config(NAVIGATION, list(sizes.navigation))
    family = Setup.from_config(cfg).family
    env = family.environment
    policy = GaussianPolicy(make_net(cfg.model.net, env.obs_dim, env.act_dim))
    n = cfg.model.params["trajectories"]

    def run(params: dict, goals: dict, key: jax.Array) -> Any:
        keys = jax.random.split(key, tasks)
        return jax.vmap(lambda g, k: rollout(env, policy, params, g, k, n))(goals, keys)

    args = (policy.init(jax.random.PRNGKey(0)), family.sample(jax.random.PRNGKey(1), tasks).info)
    r = timed(run, (*args, jax.random.PRNGKey(2)), repeats)
    steps = tasks * n * env.horizon
    return {**r, "env_steps": steps, "env_steps_per_s": steps / r["seconds"]}


def pendulum_rollouts(sizes: Sizes, tasks: int, repeats: int) -> dict[str, float]:
    """`pendulum_steps` steps of each of `tasks` pendulums (own dynamics, given random actions), vmapped."""
    cfg = registry.load_config(GRBAL, list(sizes.grbal))
    family = Setup.from_config(cfg).family
    env = family.env
    kd, ks, ku = jax.random.split(jax.random.PRNGKey(0), 3)
    s0 = jax.random.uniform(ks, (tasks, 2), minval=-jnp.pi, maxval=jnp.pi)
    u = jax.random.uniform(ku, (tasks, sizes.pendulum_steps), minval=-env.max_torque, maxval=env.max_torque)
    r = timed(jax.vmap(env.rollout), (family.dynamics(kd, tasks), s0, u), repeats)
    steps = tasks * sizes.pendulum_steps
    return {**r, "env_steps": steps, "env_steps_per_s": steps / r["seconds"]}


def meta_training(cfg: Any, n: int, repeats: int) -> dict[str, float]:
    """One chunk of n SVI steps as `fit` runs it (tasks sampled on device from the data key)."""
    setup = Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    state, key = initial_state(svi, setup.family, cfg.train, 0)
    chunk = make_chunk(svi, setup.family, cfg.train.meta_batch)
    r = timed(lambda s, i, k: chunk(s, i, n, k), (state, jnp.asarray(0), key), repeats)
    return {
        **r,
        "iterations": n,
        "ms_per_iteration": r["seconds"] / n * 1e3,
        "iterations_per_s": n / r["seconds"],
        "tasks_per_s": cfg.train.meta_batch * n / r["seconds"],
    }


def navigation_training(sizes: Sizes, overrides: tuple[str, ...], batches: int, repeats: int) -> dict:
    """meta_training at the navigation settings, with the environment steps each iteration takes."""
    cfg = registry.load_config(NAVIGATION, [*overrides, *sizes.navigation])
    r = meta_training(cfg, sizes.nav_chunk, repeats)
    per_task = (
        (cfg.model.inner_steps + batches) * cfg.model.params["trajectories"] * cfg.task.params["horizon"]
    )
    steps = cfg.train.meta_batch * per_task
    return {**r, "env_steps_per_iteration": steps, "env_steps_per_s": steps * r["iterations_per_s"]}


def planners(sizes: Sizes, env: Any) -> dict[str, tuple[control.Planner, int]]:
    """label: (planner, sequences it evaluates per plan): the grbal experiment's CEM, and random
    shooting with as many sequences."""
    lo, hi, h = -env.max_torque, env.max_torque, sizes.horizon
    evaluated = sizes.candidates * sizes.iterations
    cem = f"CEM ({sizes.iterations} x {sizes.candidates} sequences, {sizes.elites} elites, horizon {h})"
    return {
        cem: (control.cem(sizes.candidates, h, lo, hi, sizes.iterations, sizes.elites), evaluated),
        f"random shooting ({evaluated} sequences, horizon {h})": (
            control.random_shooting(evaluated, h, lo, hi),
            evaluated,
        ),
    }


def mpc(sizes: Sizes, repeats: int) -> dict[str, dict[str, float]]:
    """MPC steps per second of GrBAL's model (adapted on the last M transitions at every step) with
    each planner: one episode of mpc_steps steps under the BEFORE dynamics from hanging."""
    cfg = registry.load_config(GRBAL, [*DYNAMICS_MODELS["GrBAL"], *sizes.grbal])
    setup = Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    params = svi.get_params(initial_state(svi, setup.family, cfg.train, 0)[0])
    env = setup.family.env
    d = Dynamics(*(jnp.float32(v) for v in BEFORE))
    schedule = jax.tree.map(lambda a: jnp.full((sizes.mpc_steps,), a), d)
    s0, buffer = control.warmup(env, d, jnp.array([jnp.pi, 0.0]), jax.random.PRNGKey(0), cfg.task.shots)
    out = {}
    for label, (plan, evaluated) in planners(sizes, env).items():

        def run(p: dict, s: jax.Array, buf: tuple, key: jax.Array, plan: control.Planner = plan) -> Any:
            model = control.adapting(control.predictor(setup.eval_method, p, cfg.model.inner_steps))
            return control.episode(env, schedule, model, plan, s, key, buf)

        r = timed(run, (params, s0, buffer, jax.random.PRNGKey(1)), repeats)
        rate = sizes.mpc_steps / r["seconds"]
        out[label] = {
            **r,
            "mpc_steps": sizes.mpc_steps,
            "mpc_steps_per_s": rate,
            "model_predictions_per_s": rate * evaluated * sizes.horizon,
        }
    return out


def tables(res: dict) -> list[str]:
    """The four Markdown tables of RESULTS.md."""
    env_rows = [
        [
            name,
            tasks,
            f"{r['env_steps']:,}",
            f"{r['compile_s']:.2f}",
            f"{r['env_steps_per_s']:,.0f}",
            f"{r['memory_mib']:.2f}",
        ]
        for name, by_tasks in res["environment"].items()
        for tasks, r in by_tasks.items()
    ]
    nav_rows = [
        [
            n,
            f"{r['compile_s']:.1f}",
            f"{r['ms_per_iteration']:.1f}",
            f"{r['iterations_per_s']:.2f}",
            f"{r['env_steps_per_iteration']:,}",
            f"{r['env_steps_per_s']:,.0f}",
            f"{r['memory_mib']:.1f}",
        ]
        for n, r in res["meta_rl"].items()
    ]
    dyn_rows = [
        [
            n,
            f"{r['compile_s']:.1f}",
            f"{r['ms_per_iteration']:.3f}",
            f"{r['iterations_per_s']:,.0f}",
            f"{r['tasks_per_s']:,.0f}",
            f"{r['memory_mib']:.1f}",
        ]
        for n, r in res["dynamics_models"].items()
    ]
    mpc_rows = [
        [
            n,
            f"{r['compile_s']:.1f}",
            f"{r['mpc_steps_per_s']:,.1f}",
            f"{r['model_predictions_per_s']:,.0f}",
            f"{r['memory_mib']:.1f}",
        ]
        for n, r in res["mpc"].items()
    ]
    return [
        markdown_table(
            ["environment", "tasks", "env steps per call", "compile s", "env steps per second", "XLA MiB"],
            env_rows,
        ),
        markdown_table(
            [
                "method (navigation)",
                "compile s",
                "ms per iteration",
                "iterations per second",
                "env steps per iteration",
                "env steps per second",
                "XLA MiB",
            ],
            nav_rows,
        ),
        markdown_table(
            [
                "model (pendulum dynamics)",
                "compile s",
                "ms per iteration",
                "iterations per second",
                "tasks per second",
                "XLA MiB",
            ],
            dyn_rows,
        ),
        markdown_table(
            [
                "planner (GrBAL model)",
                "compile s",
                "MPC steps per second",
                "model predictions per second",
                "XLA MiB",
            ],
            mpc_rows,
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, into a temp dir: not results")
    p.add_argument("--out", type=Path, help="write here instead (--smoke: instead of a temp dir)")
    args = p.parse_args()
    sizes, repeats, out_dir = FULL, args.repeats, args.out or HERE
    base = ".venv/bin/python experiments/bench/rl/run.py"
    cmd = f"{base} --repeats {repeats}"
    if args.smoke:
        sizes, repeats, cmd = SMOKE, 1, f"{base} --smoke"
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_rl_"))
    if args.out:
        cmd += f" --out {args.out}"
    t0 = time.perf_counter()
    res = {
        "environment": {
            "2-D navigation, policy included": {
                str(t): navigation_rollouts(sizes, t, repeats) for t in sizes.tasks
            },
            "pendulum, given actions": {str(t): pendulum_rollouts(sizes, t, repeats) for t in sizes.tasks},
        },
        "meta_rl": {
            label: navigation_training(sizes, over, batches, repeats)
            for label, (over, batches) in META_RL.items()
        },
        "dynamics_models": {
            label: meta_training(registry.load_config(GRBAL, [*over, *sizes.grbal]), sizes.dyn_chunk, repeats)
            for label, over in DYNAMICS_MODELS.items()
        },
        "mpc": mpc(sizes, repeats),
    }
    took = time.perf_counter() - t0
    env_t, nav_t, dyn_t, mpc_t = tables(res)
    text = "\n\n".join((env_t, nav_t, dyn_t, mpc_t))
    print(text)
    write_text(
        out_dir / "RESULTS.md",
        (
            "# Benchmark: meta-RL speed (environment steps, meta-training iterations, MPC steps)\n\n"
            f"{'SMOKE TEST (tiny sizes, 1 repeat): not results.\n\n' if args.smoke else ''}"
            f"Compile time apart from run time; run time the minimum over {repeats} repeats of the "
            "compiled program; memory XLA's account of it (temporaries + arguments + outputs). "
            "Settings: the module docstring of experiments/bench/rl/run.py.\n\n"
            "## Environment steps, vmapped over tasks\n\n"
            f"Navigation: {', '.join(map(str, sizes.tasks))} tasks x the "
            "episodes of base.toml, each step sampling the policy's action; pendulum: "
            f"{sizes.pendulum_steps} steps per task under given random actions.\n\n{env_t}\n\n"
            "## Meta-training, 2-D navigation (experiments/meta_rl/navigation/base.toml)\n\n"
            f"One chunk of {sizes.nav_chunk} iterations (make_chunk, as `fit` runs it).\n\n{nav_t}\n\n"
            "## Meta-training, pendulum dynamics models (experiments/meta_rl/grbal/base.toml)\n\n"
            f"One chunk of {sizes.dyn_chunk} SVI steps.\n\n{dyn_t}\n\n"
            "## MPC with GrBAL's model adapted online\n\n"
            f"One episode of {sizes.mpc_steps} MPC steps (plan, act, adapt on the last "
            "window).\n\n"
            f"{mpc_t}\n\n- command: `{cmd}`\n- machine: {machine()}\n- took {took / 60:.1f} min\n"
        ),
    )
    write_json(
        out_dir / "results.json",
        {
            "command": cmd,
            "machine": machine(),
            "smoke": args.smoke,
            "repeats": repeats,
            "sizes": asdict(sizes),
            "results": res,
            "seconds": took,
        },
    )
    print("wrote", out_dir / "RESULTS.md")


if __name__ == "__main__":
    main()
