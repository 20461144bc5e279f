"""The one SVI driver: any (model, guide), optax, chunks of jitted steps, checkpoints, resume, NaN guard.

A chunk of `log_every` SVI steps is one XLA computation (`lax.scan` over steps, tasks sampled on
device); the host sees the state only between chunks, to log, evaluate and checkpoint. Step s draws its
tasks from fold_in(data_key, s), so the trajectory does not depend on where a run was interrupted.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.svi import SVIState
from tqdm.auto import tqdm

from bayesmeta.config import ConfigError, TrainConfig
from bayesmeta.distributed import to_host
from bayesmeta.io import atomic_write
from bayesmeta.method import Method
from bayesmeta.pcgrad import pcgrad
from bayesmeta.tasks import Family

log = logging.getLogger("bayesmeta")
CHECKPOINT = "checkpoint/state.npz"


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the message names the step and the checkpoint kept."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the configured model."""


def fresh_adam(lr: float | optax.Schedule, eps: float = 1e-7) -> optax.GradientTransformation:
    """The first step of a newly built Adam, every step: -lr g / (|g| + eps), a sign-like update.

    This is what re-creating Keras's Adam at every iteration does (the reference MR-MAML notebook).
    """
    return optax.chain(
        optax.stateless(lambda g, _: jax.tree.map(lambda x: x / (jnp.abs(x) + eps), g)),
        optax.scale_by_learning_rate(lr),
    )


def learning_rate(cfg: TrainConfig) -> float | optax.Schedule:
    """train.lr under train.lr_schedule: a constant; 'step', lr * lr_decay^floor(t / lr_decay_every);
    'cosine', lr (1 + cos(pi t / steps)) / 2 (Loshchilov & Hutter 2017)."""
    if cfg.lr_schedule == "step":
        return optax.exponential_decay(cfg.lr, cfg.lr_decay_every, cfg.lr_decay, staircase=True)
    if cfg.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, cfg.steps)
    return cfg.lr


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """optax chain: optional global-norm clipping, then Adam / AdamW / SGD at the scheduled rate
    (`learning_rate`), with the parameters named by `fresh_adam` updated by `fresh_adam` instead."""
    lr = learning_rate(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    else:
        opt = {"adam": optax.adam, "sgd": optax.sgd}[cfg.optimizer](lr)
    if cfg.fresh_adam:
        prefix = cfg.fresh_adam

        def labels(params: dict) -> dict:
            return {k: "fresh" if prefix == "all" or k.startswith(prefix) else "kept" for k in params}

        opt = optax.multi_transform({"fresh": fresh_adam(lr), "kept": opt}, labels)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt) if cfg.grad_clip else opt


def make_svi(method: Method, cfg: TrainConfig, seed: int = 0) -> SVI:
    """SVI with the configured optimizer; under train.task_gradients = "pcgrad" the optimizer takes
    per-task gradients (leading task axis) and starts with Meta-PCGrad (see `task_update`)."""
    elbo = TraceMeanField_ELBO() if method.elbo == "meanfield" else Trace_ELBO()
    opt = make_optimizer(cfg)
    if cfg.task_gradients == "pcgrad":
        opt = optax.chain(pcgrad(seed), opt)
    return SVI(method.model, method.guide, opt, elbo)


def task_gradients(svi: SVI, params: dict, batch: Any, key: jax.Array) -> tuple[jax.Array, dict]:
    """(losses (T,), gradients with a leading task axis) of the ELBO of each one-task sub-batch, at the
    unconstrained `params`, through numpyro's own constrain_fn and elbo.loss, vmapped over tasks.

    A loss that is a mean over tasks has mean_i grad_i = its batch gradient. A meta-level term that
    does not depend on the batch size (beta * KL of global latents) sits once in every task's loss,
    so the mean counts it once, as the batch loss does; a term scaled by 1 / tasks (MAML's
    model.prior_scale penalty, scaled like one batch of data) is meta_batch times stronger here.
    """

    def loss(p: dict, task: Any) -> jax.Array:
        one = jax.tree.map(lambda a: a[None], task)
        return svi.loss.loss(key, svi.constrain_fn(p), svi.model, svi.guide, one, **svi.static_kwargs)

    return jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(params, batch)


def task_update(svi: SVI, state: SVIState, batch: Any) -> tuple[SVIState, jax.Array]:
    """svi.update with per-task gradients: the optimizer (e.g. pcgrad then Adam) combines them; the
    loss is the mean of the per-task losses. The keys are split as in SVI.update."""
    if jax.tree.leaves(state.mutable_state):
        raise ConfigError("train.task_gradients: per-task gradients do not support numpyro.mutable state")
    rng_key, rng_key_step = jax.random.split(state.rng_key)
    losses, grads = task_gradients(svi, svi.optim.get_params(state.optim_state), batch, rng_key_step)
    loss = jnp.mean(losses)
    return SVIState(
        svi.optim.update(grads, state.optim_state, value=loss), state.mutable_state, rng_key
    ), loss


@dataclass
class Trace:
    """The training record: loss per step, and evaluation metrics at chosen steps."""

    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    diagnostics_step: list[int] = field(default_factory=list)
    diagnostics: dict[str, list[float]] = field(default_factory=dict)

    def add_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.eval_step.append(step)
        for k, v in metrics.items():
            self.eval.setdefault(k, []).append(v)

    def add_diagnostics(self, step: int, values: dict[str, float]) -> None:
        self.diagnostics_step.append(step)
        for k, v in values.items():
            self.diagnostics.setdefault(k, []).append(v)

    def to_json(self) -> str:
        return json.dumps(
            {
                "eval_step": self.eval_step,
                "eval": self.eval,
                "seconds": self.seconds,
                "diagnostics_step": self.diagnostics_step,
                "diagnostics": self.diagnostics,
            }
        )

    @classmethod
    def from_arrays(cls, loss: np.ndarray, meta: str) -> Trace:
        d = json.loads(meta)
        return cls(
            loss=[float(v) for v in loss],
            eval_step=d["eval_step"],
            eval=d["eval"],
            seconds=d["seconds"],
            diagnostics_step=d.get("diagnostics_step", []),
            diagnostics=d.get("diagnostics", {}),
        )


@dataclass
class FitResult:
    params: dict[str, jax.Array]
    state: Any
    step: int
    trace: Trace


def _tree_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(the key of the SVI state's initialisation, the key every step's tasks are folded from)."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, data_key


def step_tasks(family: Family, data_key: jax.Array, step: Any, meta_batch: int) -> Any:
    """The meta-batch of training step `step` (0-based): the same tasks in training, after a resume,
    and when the PAC-Bayes bound regenerates the tasks the fit saw."""
    return family.sample(jax.random.fold_in(data_key, step), meta_batch)


def initial_state(
    svi: SVI, family: Family, cfg: TrainConfig, seed: int, shapes_only: bool = False
) -> tuple[Any, jax.Array]:
    """(the SVI state before step 0, the key every step's tasks are folded from), both from the seed.
    svi.init runs as one XLA computation (jit; eager tracing of a model with an inner loop is several
    times slower); `shapes_only` traces it without computing (jax.eval_shape): a template for a
    checkpoint, and the check that the configured model builds."""
    init_key, data_key = run_keys(seed)
    tasks = step_tasks(family, data_key, 0, cfg.meta_batch)
    init = jax.eval_shape(svi.init, init_key, tasks) if shapes_only else jax.jit(svi.init)(init_key, tasks)
    return init, data_key


def task_mesh(devices: int) -> Mesh | None:
    """A one-axis mesh ("tasks") over the first `devices` devices, or None for one device."""
    if devices == 1:
        return None
    available = jax.devices()
    if devices > len(available):
        raise ConfigError(
            f"train.devices: {devices} requested, {len(available)} available ({available[0].platform}); on a "
            f"CPU, XLA_FLAGS=--xla_force_host_platform_device_count={devices} provides that many"
        )
    return Mesh(np.array(available[:devices]), ("tasks",))


def make_chunk(
    svi: SVI,
    family: Family,
    meta_batch: int,
    mesh: Mesh | None = None,
    per_task: bool = False,
    lanes: bool = False,
) -> Callable[[Any, jax.Array, int, jax.Array], tuple]:
    """chunk(state, start, n, data_key): n SVI steps in one jitted lax.scan -> (state, losses (n,),
    finite); step s's tasks come from fold_in(data_key, s). The key is an argument, not a constant, so
    every seed of a configuration compiles to the same program (one entry of XLA's persistent cache).

    With a mesh, each step's tasks are sharded along its "tasks" axis (the state is replicated), and
    XLA's SPMD partitioner turns the mean over tasks into a cross-device reduction. `per_task` steps
    by `task_update` (per-task gradients into the optimizer) instead of svi.update. With `lanes`, the
    state and `data_key` carry a leading axis of independent runs (seeds), vmapped in the same XLA
    computation: losses (K, n), finite (K,).
    """

    def run(state: Any, start: jax.Array, n: int, key: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        def one(state: Any, step: jax.Array) -> tuple[Any, jax.Array]:
            batch = step_tasks(family, key, step, meta_batch)
            if mesh is not None:
                batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, PartitionSpec("tasks")))
            return task_update(svi, state, batch) if per_task else svi.update(state, batch)

        state, losses = jax.lax.scan(one, state, start + jnp.arange(n))
        return state, losses, _tree_finite(svi.optim.get_params(state.optim_state))

    def chunk(state: Any, start: jax.Array, n: int, data_key: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        if lanes:
            return jax.vmap(lambda s, k: run(s, start, n, k))(state, data_key)
        return run(state, start, n, data_key)

    return jax.jit(chunk, static_argnums=2)


def save_checkpoint(run_dir: Path, state: Any, step: int, trace: Trace) -> Path:
    leaves = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}

    def write(f: Any) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            step=step,
            loss=np.asarray(trace.loss, np.float32),
            meta=np.array(trace.to_json()),
            **leaves,
        )
        f.write(buf.getvalue())

    return atomic_write(run_dir / CHECKPOINT, write)


def missing_checkpoint(run_dir: Path, resume: bool) -> str:
    """Why there is no checkpoint and what to do, for a resume or for reading a trained run."""
    if resume:
        return (
            f"{run_dir} has no checkpoint to resume from ({CHECKPOINT}); run bayesmeta fit without --resume"
        )
    return (
        f"{run_dir} has no checkpoint ({CHECKPOINT}): it was never trained, or training was interrupted "
        "before the first checkpoint; run bayesmeta fit first"
    )


def load_checkpoint(run_dir: Path, template: Any, resume: bool = True) -> tuple[Any, int, Trace]:
    """Restore (state, step, trace) into the structure of `template` (a fresh svi.init state); `resume`
    (else: evaluate or sample a trained run) words the error of a missing checkpoint."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(missing_checkpoint(run_dir, resume))
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zip or pickle errors from a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    leaves, treedef = jax.tree.flatten(template)
    saved = [data.get(f"leaf_{i}") for i in range(len(leaves))]
    if any(s is None or s.shape != tuple(t.shape) for s, t in zip(saved, leaves, strict=True)) or (
        f"leaf_{len(leaves)}" in data
    ):
        raise CheckpointError(f"checkpoint {path} does not match the configured model and optimizer")
    state = jax.tree.unflatten(treedef, [jnp.asarray(s, t.dtype) for s, t in zip(saved, leaves, strict=True)])
    return state, int(data["step"]), Trace.from_arrays(data["loss"], str(data["meta"]))


def interrupt_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM (a batch scheduler's or a machine's stop) raise KeyboardInterrupt, so training
    checkpoints its current step as on Ctrl-C; returns the function that restores the handler. Outside
    the main thread, or where the program set its own handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

    signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class Lane:
    """One run of those trained together: its seed, folder, record and fate."""

    seed: int
    run_dir: Path | None
    trace: Trace
    last_saved: int
    error: NonFiniteError | None = None


def _lane(state: Any, i: int, batched: bool) -> Any:
    """The state of lane i of a batched (leading lane axis) state."""
    return jax.tree.map(lambda a: a[i], state) if batched else state


def _keep(new: Any, old: Any, alive: np.ndarray) -> Any:
    """new where the lane is alive, old (its last good state) where it failed."""
    return jax.tree.map(lambda a, b: jnp.where(alive.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _first_bad(losses: np.ndarray) -> int:
    """Index of the first non-finite loss of a chunk, or its last step (the parameters went bad)."""
    finite = np.isfinite(losses)
    return int(np.argmin(finite)) if not finite.all() else len(losses) - 1


def fit(
    method: Method,
    family: Family,
    cfg: TrainConfig,
    *,
    seed: int,
    run_dir: str | Path | None = None,
    resume: bool = False,
    until: int | None = None,
    evaluate: Callable[[dict], dict[str, float]] | None = None,
    diagnose: Callable[[dict], dict[str, float]] | None = None,
    progress: bool = True,
    desc: str = "fit",
    save: bool = True,
) -> FitResult:
    """Meta-train `method` on tasks from `family` by SVI for cfg.steps steps (or up to `until`).

    Checkpoints (to run_dir) every cfg.checkpoint_every steps, at the end and on KeyboardInterrupt
    (Ctrl-C, or SIGTERM while training);
    `resume` continues from the checkpoint and ends in the same parameters as an uninterrupted run.
    A non-finite loss or parameter raises NonFiniteError naming the step, after saving the last good
    state. `evaluate(params) -> metrics` runs every cfg.eval_every steps, `diagnose(params) -> values`
    every cfg.diagnostics_every steps (when > 0), both also at the last step. Without a progress bar,
    one line goes to the logger "bayesmeta" every cfg.eval_every steps and at the end. With `save`
    false (every process but the first of a multi-process run) nothing is written; `resume` still reads
    run_dir's checkpoint. The returned state is this process's copy.
    """
    (out,) = fit_seeds(
        method,
        family,
        cfg,
        seeds=(seed,),
        run_dirs=(run_dir,),
        resume=resume,
        until=until,
        evaluate=evaluate,
        diagnose=diagnose,
        progress=progress,
        desc=desc,
        save=save,
    )
    if isinstance(out, NonFiniteError):
        raise out
    return out


def fit_seeds(
    method: Method,
    family: Family,
    cfg: TrainConfig,
    *,
    seeds: tuple[int, ...],
    run_dirs: tuple[str | Path | None, ...],
    resume: bool = False,
    until: int | None = None,
    evaluate: Callable[[dict], dict[str, float]] | None = None,
    diagnose: Callable[[dict], dict[str, float]] | None = None,
    progress: bool = True,
    desc: str = "fit",
    save: bool = True,
) -> list[FitResult | NonFiniteError]:
    """`fit` for several seeds of one configuration at once: with more than one seed the runs are lanes
    of one vmapped XLA computation (one compile, batched kernels), each with its own tasks, state,
    checkpoint, trace and evaluation, ending in the parameters it would reach alone (up to float
    reassociation). A lane whose loss turns non-finite keeps its last good checkpoint, stops, and is
    returned as its NonFiniteError while the others go on. Each lane's trace counts 1/K of the wall time.
    """
    batched = len(seeds) > 1
    dirs = [Path(d) if d is not None else None for d in run_dirs]
    if len(dirs) != len(seeds):
        raise ValueError("fit_seeds: one run directory (or None) per seed")
    mesh = task_mesh(cfg.devices)
    if batched and mesh is not None:
        raise ConfigError("train.devices: seeds trained together run on one device; set it to 1")
    svis = [make_svi(method, cfg, seed) for seed in seeds]  # a seed's optimizer state may start from it
    svi = svis[0]  # initialised below (svi.init sets its constrain_fn); it steps every lane
    states, keys, lanes = [], [], []
    for seed, run_dir, lane_svi in zip(seeds, dirs, svis, strict=True):
        state, data_key = initial_state(lane_svi, family, cfg, seed)
        step, trace = 0, Trace()
        if resume:
            if run_dir is None:
                raise CheckpointError("resume needs a run directory")
            state, step, trace = load_checkpoint(run_dir, state)
        states.append(state)
        keys.append(data_key)
        lanes.append(Lane(seed, run_dir, trace, step))
    step = lanes[0].last_saved
    if any(lane.last_saved != step for lane in lanes):
        found = ", ".join(f"{lane.run_dir}: {lane.last_saved}" for lane in lanes)
        raise CheckpointError(f"seeds trained together must resume from the same step ({found})")
    stack = (lambda *a: jnp.stack(a)) if batched else (lambda a: a)
    state = jax.tree.map(stack, *states)
    data_key = stack(*keys)
    total = cfg.steps if until is None else min(until, cfg.steps)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    chunk = make_chunk(svi, family, cfg.meta_batch, mesh, cfg.task_gradients != "batch", batched)
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=desc,
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    postfix: dict[str, str] = {}
    base = [lane.trace.seconds for lane in lanes]
    t0 = time.perf_counter()

    def clock() -> None:
        for lane, b in zip(lanes, base, strict=True):
            lane.trace.seconds = b + (time.perf_counter() - t0) / len(lanes)

    def checkpoint(host: Any, at: int, which: list[Lane]) -> None:
        clock()
        for i, lane in enumerate(lanes):
            if lane in which and lane.run_dir is not None and save:
                save_checkpoint(lane.run_dir, _lane(host, i, batched), at, lane.trace)
                lane.last_saved = at

    restore_sigterm = interrupt_on_sigterm()
    try:
        while step < total and any(lane.error is None for lane in lanes):
            n = min(cfg.log_every - step % cfg.log_every, total - step)
            new_state, losses, finite = chunk(state, jnp.asarray(step), n, data_key)
            losses = np.asarray(to_host(losses)).reshape(len(lanes), n)
            finite = np.asarray(to_host(finite)).reshape(len(lanes))
            bad = [
                i
                for i, lane in enumerate(lanes)
                if lane.error is None and not (np.all(np.isfinite(losses[i])) and finite[i])
            ]
            if bad:
                host = to_host(state)
                checkpoint(host, step, [lanes[i] for i in bad])
                for i in bad:
                    at = _first_bad(losses[i])
                    lane = lanes[i]
                    where = "nowhere (no run directory)"
                    if lane.run_dir is not None and save:
                        where = str(lane.run_dir / CHECKPOINT)
                    lane.error = NonFiniteError(
                        f"non-finite loss or parameters at step {step + at + 1}; last good state "
                        f"(step {lane.last_saved}) kept in {where}"
                    )
                if not batched:
                    break
                new_state = _keep(new_state, state, np.array([lane.error is None for lane in lanes]))
            state, step = new_state, step + n
            live = [(i, lane) for i, lane in enumerate(lanes) if lane.error is None]
            for i, lane in live:
                lane.trace.loss.extend(losses[i].tolist())
            postfix["loss"] = f"{np.mean([losses[i].mean() for i, _ in live]):.4g}" if live else "nan"
            evaluating = evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
            diagnosing = (
                diagnose is not None
                and cfg.diagnostics_every
                and (step % cfg.diagnostics_every == 0 or step == cfg.steps)
            )
            if evaluating or diagnosing:
                params = to_host(svi.get_params(state))
                for i, lane in live:
                    if evaluating:
                        metrics = evaluate(_lane(params, i, batched))
                        lane.trace.add_eval(step, metrics)
                        postfix.update({k: f"{v:.4g}" for k, v in metrics.items()})
                    if diagnosing:
                        lane.trace.add_diagnostics(step, diagnose(_lane(params, i, batched)))
            bar.set_postfix(postfix, refresh=False)
            bar.update(n)
            if not progress and (step % cfg.eval_every == 0 or step == total):
                log.info(
                    "%s: step %d/%d, %s, %.0f s",
                    desc,
                    step,
                    cfg.steps,
                    ", ".join(f"{k} {v}" for k, v in postfix.items()),
                    time.perf_counter() - t0,
                )
            if step % cfg.checkpoint_every == 0 or step == total:
                checkpoint(to_host(state), step, [lane for _, lane in live])
    except KeyboardInterrupt:
        unsaved = [lane for lane in lanes if lane.error is None and step > lane.last_saved]
        checkpoint(to_host(state), step, unsaved)
        raise
    finally:
        restore_sigterm()
        bar.close()
    clock()
    state = to_host(state)
    out: list[FitResult | NonFiniteError] = []
    for i, lane in enumerate(lanes):
        s = _lane(state, i, batched)
        out.append(lane.error or FitResult(params=svi.get_params(s), state=s, step=step, trace=lane.trace))
    return out
