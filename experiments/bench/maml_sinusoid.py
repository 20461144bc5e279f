"""Benchmark: MAML on the sinusoid (meta-batch 25, 10-shot, 1 inner step, second-order).

    .venv/bin/python experiments/bench/maml_sinusoid.py [--steps 2000] [--repeats 5]

Prints and writes (RESULTS.md, results.json beside this file): meta-training tasks per second and
compile time for the engine's SVI step and for a hand-written pure-JAX step of the same maths, their
ratio (the engine's overhead), the same with a chunk of steps fused by lax.scan (the engine's
training loop, tasks sampled on device), and memory. The two steps are checked to compute the same
loss before timing.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesmeta import config, registry
from bayesmeta.bench import best_gemm_gflops, hand_written_maml
from bayesmeta.experiment import machine
from bayesmeta.fit import make_chunk, make_svi
from bayesmeta.io import write_json, write_text
from bayesmeta.nets import make_net
from bayesmeta.run import Setup
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
OVERRIDES = [
    "train.meta_batch=25",
    "task.shots=10",
    "task.queries=10",
    "model.inner_steps=1",
    "model.first_order=false",
    "model.inner_lr=0.01",
    "train.lr=1e-3",
]


def hand_written(cfg: config.Config):
    """The same MAML step written directly in JAX + optax: no NumPyro, no engine."""
    net = make_net(cfg.model.net, 1, 1)
    alpha, opt = cfg.model.inner_lr, optax.adam(cfg.train.lr)

    def mse(p, x, y):
        return jnp.mean((net.apply(p, x) - y) ** 2)

    return net, opt, hand_written_maml(mse, alpha, opt)[1]


def compiled(fn, *args):
    """(compile seconds, executable) for fn at these arguments."""
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0, exe


def run_steps(exe, args: tuple, calls: int) -> float:
    """Seconds for `calls` calls, each feeding its outputs back as the leading arguments."""
    state = args
    t0 = time.perf_counter()
    for _ in range(calls):
        out = exe(*state)
        state = (*out[: len(args) - 1], args[-1])
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--chunk", type=int, default=500, help="steps fused in one lax.scan")
    args = p.parse_args()
    cfg = registry.load_config(None, OVERRIDES)
    setup = Setup.from_config(cfg)
    mb = cfg.train.meta_batch
    batch = setup.family.sample(jax.random.PRNGKey(0), mb)

    svi = make_svi(setup.method, cfg.train)
    state = svi.init(jax.random.PRNGKey(1), batch)
    net, opt, hand_step = hand_written(cfg)
    theta = {
        layer: {leaf: svi.get_params(state)[f"theta.{layer}.{leaf}"] for leaf in ("w", "b")}
        for layer in net.layer_names
    }
    opt_state = opt.init(theta)

    # same maths: the engine's loss is the MSE plus the Gaussian constant log(sd sqrt(2 pi))
    const = float(np.log(cfg.model.noise_sd * np.sqrt(2 * np.pi)))
    _, engine_loss = jax.jit(svi.update)(state, batch)
    _, _, hand_loss = jax.jit(hand_step)(theta, opt_state, batch)
    np.testing.assert_allclose(float(engine_loss), float(hand_loss) + const, rtol=1e-5)

    n_chunks = max(1, args.steps // args.chunk)
    chunk = make_chunk(svi, setup.family, mb)

    def hand_chunk(theta, opt_state, start):
        def one(carry, s):
            b = setup.family.sample(jax.random.fold_in(jax.random.PRNGKey(2), s), mb)
            th, os_, loss = hand_step(*carry, b)
            return (th, os_), loss

        (theta, opt_state), losses = jax.lax.scan(one, (theta, opt_state), start + jnp.arange(args.chunk))
        return theta, opt_state, losses

    # (name, function, arguments, calls per repeat, steps per call)
    configs = [
        ("engine step", lambda s, b: svi.update(s, b), (state, batch), args.steps, 1),
        ("hand-written step", lambda *a: hand_step(*a), (theta, opt_state, batch), args.steps, 1),
        (
            f"engine, scan of {args.chunk} steps",
            lambda s, st: (chunk(s, st, args.chunk, jax.random.PRNGKey(2))[0], st),
            (state, jnp.asarray(0)),
            n_chunks,
            args.chunk,
        ),
        (
            f"hand-written, scan of {args.chunk} steps",
            hand_chunk,
            (theta, opt_state, jnp.asarray(0)),
            n_chunks,
            args.chunk,
        ),
    ]
    exes = {name: compiled(fn, *a) for name, fn, a, _, _ in configs}
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    for _ in range(args.repeats):  # round-robin, so drifts in machine load hit every configuration
        for name, _, a, calls, per in configs:
            times[name].append(run_steps(exes[name][1], a, calls) / (calls * per))
    results = {name: (exes[name][0], min(t), statistics.median(t)) for name, t in times.items()}

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    temp = jax.jit(svi.update).lower(state, batch).compile().memory_analysis()
    temp_kib = getattr(temp, "temp_size_in_bytes", 0) / 1024
    names = list(results)
    ratio_step = results["engine step"][1] / results["hand-written step"][1]
    ratio_chunk = results[names[2]][1] / results[names[3]][1]

    table = markdown_table(
        ["configuration", "compile s", "ms/step (min)", "ms/step (median)", "tasks per second (at min)"],
        [
            [name, f"{c:.2f}", f"{best * 1e3:.3f}", f"{med * 1e3:.3f}", f"{mb / best:,.0f}"]
            for name, (c, best, med) in results.items()
        ],
    )
    summary = (
        f"engine / hand-written time per step: {ratio_step:.3f} (single steps), "
        f"{ratio_chunk:.3f} (scanned chunks); target <= 1.1 (issue #15)"
    )
    print(
        table,
        summary,
        f"peak RSS {peak_mib:.0f} MiB; XLA temp buffers of one step {temp_kib:.0f} KiB",
        sep="\n",
    )
    gemm = best_gemm_gflops()
    cmd = f".venv/bin/python experiments/bench/maml_sinusoid.py --steps {args.steps} --repeats {args.repeats}"
    write_text(
        HERE / "RESULTS.md",
        (
            "# Benchmark: MAML on the sinusoid\n\nMeta-batch 25, 10-shot + 10 queries, 1 inner step, "
            "second-order, MLP 1-40-40-1, Adam. Median of "
            f"{args.repeats} repeats of {args.steps} steps; compile time is lowering + XLA compilation.\n\n"
            f"{table}\n\n{summary}.\n\nPeak RSS of the process {peak_mib:.0f} MiB; XLA temporary buffers of "
            f"one engine step {temp_kib:.0f} KiB. Best float32 GEMM of this machine in the same run "
            f"{gemm:.1f} GFLOP/s (jitted square matmuls of 1024 and 2048), to compare runs across machines "
            "and days."
            f"\n\n- command: `{cmd}`\n- machine: {machine()}\n"
            "- single steps are one dispatch each on a fixed batch; scanned chunks also sample their tasks "
            "on device, as `bayesmeta fit` does\n"
        ),
    )
    write_json(
        HERE / "results.json",
        {
            "command": cmd,
            "machine": machine(),
            "ratio_single_step": ratio_step,
            "ratio_scanned": ratio_chunk,
            "peak_rss_mib": peak_mib,
            "xla_temp_kib": temp_kib,
            "gemm_gflops": gemm,
            "configurations": {
                k: {
                    "compile_seconds": c,
                    "seconds_per_step_min": best,
                    "seconds_per_step_median": med,
                    "tasks_per_second": mb / best,
                }
                for k, (c, best, med) in results.items()
            },
        },
    )


if __name__ == "__main__":
    main()
