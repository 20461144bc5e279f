"""Small helpers for the benchmark scripts (experiments/bench): compile timing, timing over repeats,
XLA's own memory and FLOP accounts of a compiled computation, and the machine's float32 matmul rate."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import optax


def load_script(path: Path, name: str) -> ModuleType:
    """A script (e.g. another benchmark's run.py, which is not in a package) imported as module `name`,
    so one benchmark can reuse another's settings and timing functions."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_timed(fn: Callable, *args: Any, static_argnums: tuple[int, ...] = ()) -> tuple[float, Any]:
    """(seconds to lower and compile, the compiled executable) of jit(fn) at these arguments; a
    function that is already jitted is lowered as it is."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, static_argnums=static_argnums)
    t0 = time.perf_counter()
    exe = jitted.lower(*args).compile()
    return time.perf_counter() - t0, exe


def seconds(call: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls, each waited for (after one untimed warm-up call)."""
    jax.block_until_ready(call())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        out.append(time.perf_counter() - t0)
    return out


def memory_mib(exe: Any) -> dict[str, float]:
    """XLA's memory analysis of a compiled computation, MiB: temporaries, and the peak bound
    temporaries + arguments + outputs (what the benchmarks report as memory)."""
    m = exe.memory_analysis()
    temp = m.temp_size_in_bytes
    return {
        "temp_mib": temp / 2**20,
        "memory_mib": (temp + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20,
    }


def flops(exe: Any) -> float:
    """XLA's count of floating-point operations of a compiled computation (its cost analysis). The body
    of a loop left in the compiled program (a lax.scan of more than one step) is counted once, whatever
    its trip count, so count a loop-free computation (e.g. one SVI step with one inner step)."""
    cost = exe.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def gemm_gflops(sizes: tuple[int, ...] = (256, 512, 1024, 2048), repeats: int = 5) -> dict[int, float]:
    """Best float32 GFLOP/s of a jitted square matmul (2 n^3 FLOPs) per size, over `repeats` calls."""
    out = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.PRNGKey(n))
        a = jax.random.normal(ka, (n, n), jnp.float32)
        b = jax.random.normal(kb, (n, n), jnp.float32)
        f = jax.jit(jnp.dot)
        out[n] = 2 * n**3 / min(seconds(lambda f=f, a=a, b=b: f(a, b), repeats)) / 1e9
    return out


def best_gemm_gflops(repeats: int = 5) -> float:
    """The machine's float32 matmul rate: the best of gemm_gflops at sizes 1024 and 2048, recorded beside
    a benchmark's numbers so that runs on different machines and days can be compared."""
    return max(gemm_gflops((1024, 2048), repeats).values())


def write_results(
    out_dir: Path, title: str, intro: str, table: str, command: str, minutes: float, data: dict
):
    """A benchmark's RESULTS.md (title, intro, table, then its command, machine and wall time) and
    results.json ({"command", "machine"} and `data`), each written atomically."""
    from bayesmeta.experiment import machine
    from bayesmeta.io import write_json, write_text

    write_text(
        out_dir / "RESULTS.md",
        f"# {title}\n\n{intro}\n\n{table}\n\n- command: `{command}`\n- machine: {machine()}\n"
        f"- time: {minutes:.1f} min\n",
    )
    write_json(out_dir / "results.json", {"command": command, "machine": machine(), **data})


def hand_written_maml(
    loss: Callable, alpha: float, opt: optax.GradientTransformation
) -> tuple[Callable, Callable]:
    """Second-order MAML with one inner step in JAX + optax only, the reference for the engine's
    overhead: (meta_loss(theta, batch), step(theta, opt_state, batch) -> (theta, opt_state, loss)),
    phi_i = theta - alpha grad loss(theta, D_i), meta-loss = mean_i loss(phi_i, D*_i) (Finn et al. 2017)."""

    def meta_loss(theta: Any, batch: Any) -> jax.Array:
        def task(xs: jax.Array, ys: jax.Array, xq: jax.Array, yq: jax.Array) -> jax.Array:
            g = jax.grad(loss)(theta, xs, ys)
            phi = jax.tree.map(lambda t, d: t - alpha * d, theta, g)
            return loss(phi, xq, yq)

        return jnp.mean(jax.vmap(task)(batch.x_support, batch.y_support, batch.x_query, batch.y_query))

    def step(theta: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(meta_loss)(theta, batch)
        updates, opt_state = opt.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, value

    return meta_loss, step


def scanned_step(cfg: Any, steps: int, repeats: int) -> tuple[float, float, Any]:
    """(compile seconds, best seconds per SVI step, the compiled chunk) of a config's training as
    `bayesmeta fit` runs it: `steps` SVI steps in one scanned chunk (fit.make_chunk) with
    cfg.train.meta_batch tasks a step sampled on device, from svi.init; minimum over `repeats`."""
    from bayesmeta.fit import make_chunk, make_svi
    from bayesmeta.run import Setup

    setup = Setup.from_config(cfg)
    meta_batch = cfg.train.meta_batch
    svi = make_svi(setup.method, cfg.train)
    state = jax.jit(svi.init)(jax.random.PRNGKey(0), setup.family.sample(jax.random.PRNGKey(1), meta_batch))
    chunk = make_chunk(svi, setup.family, meta_batch)
    start, key = jax.numpy.asarray(0), jax.random.PRNGKey(2)
    compile_s, compiled = compile_timed(lambda s, i: chunk(s, i, steps, key), state, start)
    return compile_s, min(seconds(lambda: compiled(state, start), repeats)) / steps, compiled


def dispatched_step(cfg: Any, calls: int, repeats: int) -> tuple[float, float, Any]:
    """(compile seconds, best seconds per SVI step, the compiled step) of a config's training step on one
    batch of its family from svi.init: `calls` steps dispatched back to back, minimum over `repeats`."""
    from bayesmeta.fit import make_svi
    from bayesmeta.run import Setup

    setup = Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(0), cfg.train.meta_batch)
    svi = make_svi(setup.method, cfg.train)
    state = jax.jit(svi.init)(jax.random.PRNGKey(1), batch)
    compile_s, step = compile_timed(svi.update, state, batch)

    def dispatch() -> jax.Array:
        s, loss = state, None
        for _ in range(calls):
            s, loss = step(s, batch)
        return loss

    return compile_s, min(seconds(dispatch, repeats)) / calls, step
