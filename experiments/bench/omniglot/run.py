"""Benchmark: conv MAML and prototypical networks on Omniglot 5-way 1-shot (1 query per class), conv4
with 64 filters, meta-batch 32.

    .venv/bin/python experiments/bench/omniglot/run.py [--steps 10] [--repeats 5]
    .venv/bin/python experiments/bench/omniglot/run.py --quick     # seconds; writes to a temp dir

Per configuration (second-order MAML with 1 inner step; ProtoNet with max-pooling downsampling; a
hand-written pure-JAX second-order MAML step of the same maths as the reference for the engine's
overhead): compile time, tasks per second with episode sampling inside the timed loop (the engine's
`make_chunk`: tasks sampled on device every step) and without (one pre-sampled batch, the same update in
a `lax.scan`), and XLA's memory analysis of one step. The FLOPs of one step (XLA's cost analysis) over
its time give achieved GFLOP/s, compared with the best float32 GEMM rate measured here. The slowest
configuration is profiled piece by piece (sampling, net forward, forward + gradient, inner loop, loss,
full step, and the largest convolution's patch extraction and matmul), each jitted and timed alone.
Times are minima over round-robin repeats. Writes RESULTS.md / results.json beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesmeta import config, registry
from bayesmeta.bench import compile_timed, flops, gemm_gflops, hand_written_maml, memory_mib, seconds
from bayesmeta.experiment import machine
from bayesmeta.fit import initial_state, make_chunk, make_svi
from bayesmeta.io import write_json, write_text
from bayesmeta.nets import Conv4, conv3x3, make_net, patches3x3, xla_conv3x3
from bayesmeta.run import Setup
from bayesmeta.sites import tree_from_params
from bayesmeta.tables import markdown_table

HERE = Path(__file__).parent
BASE = HERE.parents[1] / "omniglot" / "base.toml"  # conv4 MAML 5-way 1-shot, second-order, 1 step
METHODS = {
    "MAML": ("model.method='maml'",),
    "ProtoNet": ("model.method='protonet'", "model.net.downsample='maxpool'"),
}


# The standard protocol (issue #15): 15 queries per class; MAML's meta-batches (Finn et al. 2017: 32
# tasks for 5-way, 16 for 20-way), one inner step, first and second order
STANDARD = [(w, k, fo) for w in (5, 20) for k in (1, 5) for fo in (False, True)]
STANDARD_TARGETS = {"fraction_of_gemm": 0.5, "engine_over_hand_written": 1.1, "compile_s": 5.0}


def load(method: str, meta_batch: int, filters: int, *extra: str) -> config.Config:
    return registry.load_config(
        BASE,
        [
            "task.queries=1",
            "model.inner_steps=1",
            "model.first_order=false",
            f"train.meta_batch={meta_batch}",
            f"model.net.filters={filters}",
            *METHODS[method],
            *extra,
        ],
    )


def engine(cfg: config.Config, mb: int):
    """(setup, svi, the state before step 0, the data key, step 0's batch of mb tasks) of a config."""
    setup = Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    state, data_key = initial_state(svi, setup.family, cfg.train, cfg.seed)
    return setup, svi, state, data_key, setup.family.sample(jax.random.fold_in(data_key, 0), mb)


def checked_hand_written(cfg: config.Config, setup: Setup, svi, state, batch):
    """The hand-written second-order step at the engine state's parameters, (step, theta, opt_state),
    after checking that its meta-loss equals the engine's on the batch (the same maths)."""
    net = make_net(cfg.model.net, setup.family.x_dim, setup.family.y_dim)
    opt, meta_loss, step = hand_written(cfg, net)
    theta = tree_from_params("theta", net.init, svi.get_params(state))
    engine_loss = float(jax.jit(svi.evaluate)(state, batch))
    np.testing.assert_allclose(engine_loss, float(jax.jit(meta_loss)(theta, batch)), rtol=1e-4)
    return step, theta, opt.init(theta)


def standard(ways: int, shots: int, first_order: bool, filters: int, n: int, repeats: int, mb: int = 0):
    """One conv MAML configuration at the standard protocol: the engine's fixed-batch scan of n steps
    (and, second order, the hand-written step's) timed, with one step's compile time, FLOPs and memory."""
    mb = mb or (32 if ways == 5 else 16)
    cfg = load(
        "MAML",
        mb,
        filters,
        "task.queries=15",
        f"task.shots={shots}",
        f"task.params.ways={ways}",
        f"model.first_order={str(first_order).lower()}",
    )
    setup, svi, state, _, batch = engine(cfg, mb)
    compile_s, one = compile_timed(svi.update, state, batch)
    _, fixed = compile_timed(scanned(svi.update, n), state, batch)
    runs = {"engine": (fixed, (state, batch))}
    if not first_order:
        step, theta, opt_state = checked_hand_written(cfg, setup, svi, state, batch)
        _, hand = compile_timed(scanned(step, n), theta, opt_state, batch)
        runs["hand-written"] = (hand, (theta, opt_state, batch))
    for exe, a in runs.values():
        jax.block_until_ready(exe(*a))  # warm-up
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, (exe, a) in runs.items():
            times[k].append(_timed(exe, a) / n)
    best = {k: min(v) for k, v in times.items()}
    step_flops = flops(one)
    return {
        "ways": ways,
        "shots": shots,
        "queries": 15,
        "meta_batch": mb,
        "order": "first" if first_order else "second",
        "compile_s": compile_s,
        "seconds_per_step_min": best["engine"],
        "tasks_per_second": mb / best["engine"],
        "gflop_per_step": step_flops / 1e9,
        "gflops_achieved": step_flops / best["engine"] / 1e9,
        **memory_mib(one),
        "engine_over_hand_written": best["engine"] / best["hand-written"] if "hand-written" in best else None,
    }


def standard_table(rows: list[dict], peak: float) -> str:
    """The standard-protocol grid as a markdown table, each row's GEMM fraction against `peak`."""
    out = []
    for r in rows:
        ratio = r["engine_over_hand_written"]
        out.append(
            [
                f"{r['ways']}-way {r['shots']}-shot, {r['order']} order, meta-batch {r['meta_batch']}",
                f"{r['compile_s']:.1f}",
                f"{r['seconds_per_step_min'] * 1e3:.0f}",
                f"{r['tasks_per_second']:.1f}",
                f"{r['memory_mib']:.0f} ({r['temp_mib']:.0f})",
                f"{r['gflop_per_step']:.1f}",
                f"{r['gflops_achieved']:.1f}",
                f"{r['gflops_achieved'] / peak:.1%}",
                "-" if ratio is None else f"{ratio:.3f}",
            ]
        )
    header = [
        "configuration (15 queries per class)",
        "compile s (one step)",
        "ms per step",
        "tasks/s",
        "XLA memory MiB (temp)",
        "GFLOP per step",
        "GFLOP/s",
        "of GEMM peak",
        "engine / hand-written",
    ]
    return markdown_table(header, out)


def cross_entropy(net: Conv4, params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(net.apply(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], -1))


def hand_written(cfg: config.Config, net: Conv4):
    """Second-order conv MAML with one inner step in JAX + optax only (the nets' functions, no NumPyro,
    no engine): returns (optimizer, meta_loss(theta, batch), step(theta, opt_state, batch))."""
    alpha, opt = cfg.model.inner_lr, optax.adam(cfg.train.lr)

    def loss(p, x, y):
        return cross_entropy(net, p, x, y)

    return (opt, *hand_written_maml(loss, alpha, opt))


def scanned(step, n: int, family=None, meta_batch: int = 0, data_key=None):
    """n steps of step(*carry, batch) -> (*carry, loss) in one lax.scan: on a fixed batch (the last
    argument), or with tasks sampled on device per step as make_chunk does (the last argument = start)."""

    def run(*args):
        *carry, last = args

        def one(c, s):
            b = last if family is None else family.sample(jax.random.fold_in(data_key, s), meta_batch)
            *c, loss = step(*c, b)
            return tuple(c), loss

        xs = jnp.arange(n) if family is None else last + jnp.arange(n)
        c, losses = jax.lax.scan(one, tuple(carry), xs)
        return (*c, losses)

    return run


def profile(setup: Setup, svi, state, batch, mb: int, repeats: int) -> dict[str, dict[str, float]]:
    """Each piece of one training step jitted and timed alone, on the step's batch: ms and XLA FLOPs."""
    family, cfg = setup.family, setup.cfg
    net = make_net(cfg.model.net, family.x_dim, family.y_dim)
    params = svi.get_params(state)
    theta = {
        **net.init(jax.random.PRNGKey(0)),
        **tree_from_params("theta", lambda k: _drop_head(net, k), params),
    }
    x = jnp.concatenate([batch.x_support, batch.x_query], 1)
    y = jnp.concatenate([batch.y_support, batch.y_query], 1)

    def forward(th, x):
        return jax.vmap(net.features, in_axes=(None, 0))(th, x)

    def fwd_grad(th, x, y):
        return jax.value_and_grad(
            lambda t: jnp.mean(jax.vmap(lambda a, b: cross_entropy(net, t, a, b))(x, y))
        )(th)

    def inner(th, xs, ys):
        def task(a, b):
            g = jax.grad(lambda p: cross_entropy(net, p, a, b))(th)
            return jax.tree.map(lambda t, d: t - cfg.model.inner_lr * d, th, g)

        return jax.vmap(task)(xs, ys)

    # the largest convolution: block 1 (the second) on every image of the batch, at its input's shape
    stride = net.stride
    h0 = jnp.zeros((1, mb * x.shape[1], net.side, net.side))  # channels first, as Conv4 runs
    h1 = jax.eval_shape(lambda h: net.block(theta["block_0"], h), h0)
    h1 = jnp.ones(h1.shape, h1.dtype)
    w1 = theta["block_1"]["w"]

    def patches(h):
        return patches3x3(h, stride)

    def xla_conv(h, w):
        return xla_conv3x3(h, w, stride)

    def in_scan(conv):
        """Five chained calls of `conv` in a lax.scan (as inside the engine's training chunk); each
        call's kernel depends on the previous output, so XLA cannot hoist it out of the loop."""

        def run(h, w):
            def body(c, _):
                return c + 1e-12 * jnp.sum(conv(h, w + c)), None

            return jax.lax.scan(body, jnp.zeros((), h.dtype), None, length=5)[0]

        return run

    p1 = jnp.ones(jax.eval_shape(patches, h1).shape)
    w1m = w1.reshape(-1, w1.shape[-1])
    pieces = {
        "episode sampling": (lambda k: family.sample(k, mb), (jax.random.PRNGKey(3),)),
        "net forward (all images)": (forward, (theta, x)),
        "net forward + gradient (all images)": (fwd_grad, (theta, x, y)),
        "SVI loss only (svi.evaluate)": (svi.evaluate, (state, batch)),
        "full SVI step (svi.update)": (svi.update, (state, batch)),
        "block 1 conv: patch extraction": (patches, (h1,)),
        "block 1 conv: kernel matrix @ patches": (lambda p, w: w.T @ p.reshape(p.shape[0], -1), (p1, w1m)),
        "block 1 conv3x3 (both)": (lambda h, w: conv3x3(h, w, stride), (h1, w1)),
        "block 1 as one XLA convolution (reference)": (xla_conv, (h1, w1)),
        "block 1 conv3x3, 5 calls in a lax.scan": (in_scan(lambda h, w: conv3x3(h, w, stride)), (h1, w1)),
        "block 1 XLA convolution, 5 calls in a lax.scan": (in_scan(xla_conv), (h1, w1)),
    }
    if cfg.model.method == "maml":
        pieces["inner loop (support grad + update)"] = (inner, (theta, batch.x_support, batch.y_support))
    # the engine runs SVI steps inside a lax.scan: the same step there, with patches and with XLA's
    # convolution (model.net.conv = "xla"), per step
    xla_net = dataclasses.replace(cfg.model.net, conv="xla")
    xla_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, net=xla_net))
    xla = Setup.from_config(xla_cfg)
    xla_svi = make_svi(xla.method, xla_cfg.train)
    xla_state, _ = initial_state(xla_svi, xla.family, xla_cfg.train, 0)

    def scanned(update):
        return lambda st, b: jax.lax.scan(lambda c, _: (update(c, b)[0], None), st, None, length=3)[0]

    pieces["full SVI step in a lax.scan of 3 (all 3 steps)"] = (scanned(svi.update), (state, batch))
    pieces["full SVI step, XLA convolutions, alone"] = (xla_svi.update, (xla_state, batch))
    pieces["full SVI step, XLA convolutions, in a lax.scan of 3 (all 3 steps)"] = (
        scanned(xla_svi.update),
        (xla_state, batch),
    )
    out = {}
    for name, (fn, args) in pieces.items():
        _, exe = compile_timed(fn, *args)
        t = min(seconds(lambda exe=exe, args=args: exe(*args), repeats))
        out[name] = {"ms": t * 1e3, "gflop": flops(exe) / 1e9}
    return out


def _drop_head(net: Conv4, key: jax.Array) -> dict:
    return {k: v for k, v in net.init(key).items() if k != "head"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="SVI steps per timed call (one lax.scan)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--filters", type=int, default=64)
    p.add_argument(
        "--quick", action="store_true", help="tiny check (2 steps, 8 filters, meta-batch 2), temp dir"
    )
    p.add_argument(
        "--standard-steps", type=int, default=2, help="SVI steps per timed call in the standard-protocol grid"
    )
    args = p.parse_args()
    started = time.perf_counter()
    n, repeats, mb, filters, sizes = (
        args.steps,
        args.repeats,
        args.meta_batch,
        args.filters,
        (256, 512, 1024, 2048),
    )
    out_dir = HERE
    if args.quick:
        n, repeats, mb, filters, sizes = 2, 2, 2, 8, (64, 128)
        out_dir = Path(tempfile.mkdtemp(prefix="bench_omniglot_"))

    gemm = gemm_gflops(sizes, repeats)
    peak = max(gemm.values())
    print("float32 GEMM GFLOP/s:", {k: round(v, 1) for k, v in gemm.items()})

    # name -> {"sampled"/"fixed": (compiled, arguments)} and per-implementation facts (1 query per class)
    rows: dict[str, dict] = {}
    setups = {}
    for method in METHODS:
        cfg = load(method, mb, filters)
        setup, svi, state, data_key, batch = engine(cfg, mb)
        setups[method] = (setup, svi, state, batch)
        one_c, one = compile_timed(svi.update, state, batch)
        chunk = make_chunk(svi, setup.family, mb)
        start = jnp.asarray(0)
        sampled_c, sampled = compile_timed(lambda s, i, c=chunk, k=data_key: c(s, i, n, k), state, start)
        fixed_c, fixed = compile_timed(scanned(svi.update, n), state, batch)
        rows[f"{method} (engine)"] = {
            "method": method,
            "step": one,
            "compile_s": {"one step": one_c, "scan, sampled": sampled_c, "scan, fixed batch": fixed_c},
            "runs": {"sampled": (sampled, (state, start)), "fixed": (fixed, (state, batch))},
        }
        if method != "MAML":
            continue
        step, theta, opt_state = checked_hand_written(cfg, setup, svi, state, batch)
        one_c, one = compile_timed(step, theta, opt_state, batch)
        sampled_c, sampled = compile_timed(
            scanned(step, n, setup.family, mb, data_key), theta, opt_state, start
        )
        fixed_c, fixed = compile_timed(scanned(step, n), theta, opt_state, batch)
        rows["MAML (hand-written JAX)"] = {
            "method": method,
            "step": one,
            "compile_s": {"one step": one_c, "scan, sampled": sampled_c, "scan, fixed batch": fixed_c},
            "runs": {
                "sampled": (sampled, (theta, opt_state, start)),
                "fixed": (fixed, (theta, opt_state, batch)),
            },
        }

    times: dict[tuple[str, str], list[float]] = {(r, k): [] for r in rows for k in ("sampled", "fixed")}
    for exe, a in (v for r in rows.values() for v in r["runs"].values()):
        jax.block_until_ready(exe(*a))  # warm-up
    for _ in range(repeats):  # round-robin, so drifts in machine load hit every configuration
        for (r, k), ts in times.items():
            exe, a = rows[r]["runs"][k]
            ts.append(_timed(exe, a))

    res = {}
    for r, row in rows.items():
        step_flops = flops(row["step"])
        best = {k: min(times[r, k]) / n for k in ("sampled", "fixed")}
        med = {k: statistics.median(times[r, k]) / n for k in ("sampled", "fixed")}
        res[r] = {
            "compile_s": row["compile_s"],
            "seconds_per_step_min": best,
            "seconds_per_step_median": med,
            "tasks_per_second": {k: mb / v for k, v in best.items()},
            "sampling_cost": best["sampled"] / best["fixed"] - 1,
            **memory_mib(row["step"]),
            "gflop_per_step": step_flops / 1e9,
            "gflops_achieved": step_flops / best["fixed"] / 1e9,
            "fraction_of_gemm": step_flops / best["fixed"] / 1e9 / peak,
        }
    overhead = {
        k: res["MAML (engine)"]["seconds_per_step_min"][k]
        / res["MAML (hand-written JAX)"]["seconds_per_step_min"][k]
        for k in ("sampled", "fixed")
    }
    grid = [
        standard(w, k, fo, filters, 1 if args.quick else args.standard_steps, repeats, 2 if args.quick else 0)
        for w, k, fo in (STANDARD[:1] if args.quick else STANDARD)
    ]
    print(standard_table(grid, peak))
    slowest = max((r for r in res if "engine" in r), key=lambda r: res[r]["seconds_per_step_min"]["fixed"])
    prof = profile(*setups[rows[slowest]["method"]], mb, repeats)
    full_ms = prof["full SVI step (svi.update)"]["ms"]

    rows = []
    for r, v in res.items():
        c, t, q = v["compile_s"], v["seconds_per_step_min"], v["tasks_per_second"]
        rows.append(
            [
                r,
                f"{c['one step']:.1f} / {c['scan, sampled']:.1f}",
                f"{t['sampled'] * 1e3:.1f} / {t['fixed'] * 1e3:.1f}",
                f"{q['sampled']:,.0f} / {q['fixed']:,.0f}",
                f"{v['sampling_cost']:+.1%}",
                f"{v['memory_mib']:.1f} ({v['temp_mib']:.1f})",
                f"{v['gflop_per_step']:.2f}",
                f"{v['gflops_achieved']:.1f}",
                f"{v['fraction_of_gemm']:.1%}",
            ]
        )
    header = [
        "configuration",
        "compile s (step / scan)",
        "ms per step, sampled / fixed",
        "tasks/s, sampled / fixed",
        "sampling cost",
        "XLA memory MiB (temp)",
        "GFLOP per step",
        "GFLOP/s",
        "of GEMM peak",
    ]
    table = markdown_table(header, rows)
    prows = []
    for name, v in prof.items():
        rate = v["gflop"] / (v["ms"] / 1e3) if v["ms"] > 0 else 0.0
        prows.append([name, f"{v['ms']:.2f}", f"{v['gflop']:.3f}", f"{rate:.1f}", f"{v['ms'] / full_ms:.1%}"])
    ptable = markdown_table(["piece (jitted alone)", "ms", "GFLOP", "GFLOP/s", "ms / full step"], prows)
    gemm_s = ", ".join(f"{k}: {v:.1f}" for k, v in gemm.items())
    summary = (
        f"engine / hand-written time per MAML step: {overhead['sampled']:.3f} (sampled scan), "
        f"{overhead['fixed']:.3f} (fixed-batch scan); target <= 1.2. Best float32 GEMM {peak:.1f} GFLOP/s "
        f"(square sizes {gemm_s})."
    )
    print(table, summary, f"profile of {slowest}:", ptable, sep="\n")
    cmd = f".venv/bin/python experiments/bench/omniglot/run.py --steps {n} --repeats {repeats}"
    if args.quick:
        cmd = ".venv/bin/python experiments/bench/omniglot/run.py --quick"
    elif (mb, filters) != (32, 64):
        cmd += f" --meta-batch {mb} --filters {filters}"
    if not args.quick and args.standard_steps != 2:
        cmd += f" --standard-steps {args.standard_steps}"
    write_text(
        out_dir / "RESULTS.md",
        (
            "# Benchmark: conv MAML and ProtoNet on Omniglot 5-way 1-shot\n\n"
            f"{'QUICK CHECK, NOT RESULTS. ' if args.quick else ''}Omniglot (minimal background sets, "
            f"rotations), 5-way 1-shot with 1 query per class, conv4 with {filters} filters, meta-batch "
            f"{mb}, "
            "Adam. MAML: second-order, 1 inner step of 0.4, stride-2 downsampling; ProtoNet: 2x2 max "
            f"pooling. Each timed call is a `lax.scan` of {n} SVI steps, minimum over {repeats} "
            "round-robin repeats. *Sampled*: the engine's `make_chunk` (tasks sampled on device at every "
            "step, as `bayesmeta fit` trains); *fixed*: one pre-sampled batch, the same update scanned. "
            "Memory: XLA's memory analysis of one compiled step (temporaries + arguments + outputs; "
            "temporaries alone in brackets). GFLOP per step: XLA's cost analysis of one compiled step; "
            "GFLOP/s = that over the fixed-batch time; *of GEMM peak*: against the best jitted float32 "
            "square matmul on this machine. `conv3x3` builds its patches from strided slices (no FLOPs); "
            "XLA's cost analysis counts a loop body once, so the scanned pieces of the profile report one "
            "step's FLOPs.\n\n"
            f"{table}\n\n{summary}\n\n## The standard protocol\n\nConv MAML with 15 queries per class "
            "(Finn et al.'s protocol), 5- and 20-way, 1 and 5 shots, first and second order, one inner "
            f"step; meta-batch 32 (5-way) or 16 (20-way) as in their paper. Each timed call is a "
            f"`lax.scan` of {args.standard_steps} SVI steps on one batch, minimum over {repeats} repeats; "
            "GFLOP per step from XLA's cost analysis of one step; *engine / hand-written*: against the "
            "pure-JAX second-order step of the same maths (its loss checked equal). Targets (issue #15): "
            f"at least {STANDARD_TARGETS['fraction_of_gemm']:.0%} of the GEMM peak for second order, "
            f"engine / hand-written at most {STANDARD_TARGETS['engine_over_hand_written']}, compile under "
            f"{STANDARD_TARGETS['compile_s']:.0f} s.\n\n{standard_table(grid, peak)}\n\n"
            f"## Where the time goes: {slowest}\n\nEach piece jitted and timed "
            f"alone on the step's batch ({mb} tasks, 10 images each); minimum over {repeats} calls; "
            "block 1 is the second conv block, the largest matmul of the net. The last rows run the "
            "full step inside a `lax.scan`, as the engine trains, with `conv3x3` and with XLA's "
            'convolution (`model.net.conv = "xla"`): on this CPU backend XLA\'s convolution is fast '
            "alone and an order of magnitude slower inside the scan, which is why the default is "
            "patches times a matrix.\n\n"
            f"{ptable}\n\n- command: `{cmd}`\n- machine: {machine()}\n"
            f"- time: the benchmark took {(time.perf_counter() - started) / 60:.1f} min, compiles included\n"
        ),
    )
    write_json(
        out_dir / "results.json",
        {
            "command": cmd,
            "machine": machine(),
            "quick": args.quick,
            "gemm_gflops": {str(k): v for k, v in gemm.items()},
            "gemm_peak_gflops": peak,
            "engine_over_hand_written": overhead,
            "configurations": res,
            "standard_protocol": grid,
            "profile": {"configuration": slowest, "pieces": prof},
        },
    )
    print("wrote", out_dir / "RESULTS.md")


def _timed(exe, a) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(exe(*a))
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
