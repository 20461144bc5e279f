"""Wires a Config to the engine: build family and method, fit, evaluate, write the run folder."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer import SVI, Predictive

from bayesmeta import config as config_mod
from bayesmeta.config import Config
from bayesmeta.diagnostics.landscape import landscape_metrics
from bayesmeta.distributed import is_primary
from bayesmeta.fit import (
    CHECKPOINT,
    FitResult,
    NonFiniteError,
    fit_seeds,
    initial_state,
    load_checkpoint,
    make_svi,
    task_mesh,
)
from bayesmeta.io import publish, run_lock, write_text
from bayesmeta.likelihoods import Gaussian
from bayesmeta.method import Context, Method
from bayesmeta.predict import Evaluation, eval_tasks, evaluate, predictive, quick_metric
from bayesmeta.provenance import environment
from bayesmeta.registry import build_method, make_family
from bayesmeta.report import INFERENCE, build_datatree, save_datatree, write_report
from bayesmeta.sections import (
    Evaluated,
    compute_sections,
    dump_sections,
    query_points,
    tree_contributions,
)
from bayesmeta.tasks import Classification, DenseGrid, Environment, Family, GroundTruth, TaskMetrics

GRID_POINTS = 200
# metrics.json's schema: raised whenever evaluation changes what it measures, so that experiment grids
# re-evaluate finished runs from their checkpoints instead of reusing numbers of older code
# (4: calibration's pit is the randomized PIT, continuous on [0, 1]; 5: calibration reads the
# predictive mixture, its PIT F(y) and the coverage and widths of its central intervals)
METRICS_VERSION = 5
CHANGED_SECTION = {5: "calibration"}
"""Versions that changed one section's numbers only: metrics.json of an earlier version without that
section (a classification run has no calibration) still holds (`up_to_date`)."""


def up_to_date(metrics: dict[str, Any]) -> bool:
    """Whether a metrics.json (or a recorded failure) measures what the current code would: its version
    is current, or every later version changed only a section it does not have."""
    v = metrics.get("version")
    if not isinstance(v, int) or v > METRICS_VERSION:
        return False
    later = range(v + 1, METRICS_VERSION + 1)
    return all(u in CHANGED_SECTION and not metrics.get(CHANGED_SECTION[u]) for u in later)


@dataclass
class Setup:
    cfg: Config
    family: Family
    eval_family: Family
    method: Method
    likelihood: Any
    eval_method: Method  # the method built for the evaluation family's outputs (same parameters)

    @classmethod
    def from_config(cls, cfg: Config) -> Setup:
        family = make_family(cfg.task, "task")
        eval_family = make_family(cfg.eval.task, "eval.task")
        if eval_family.x_dim != family.x_dim:
            raise config_mod.ConfigError(
                f"eval.task: its inputs ({eval_family.x_dim}) differ from task's ({family.x_dim})"
            )
        context = Context(
            n_tasks=cfg.train.steps * cfg.train.meta_batch,
            n_query=query_points(family),
            n_classes=family.n_classes if isinstance(family, Classification) else None,
            environment=family.environment if isinstance(family, Environment) else None,
        )
        method = build_method(cfg.model, family.x_dim, family.y_dim, context)
        if cfg.train.diagnostics_every and method.probe is None:
            raise config_mod.ConfigError(
                f"train.diagnostics_every: method {cfg.model.method!r} has no probe hook (Method.probe) for "
                "the landscape diagnostics; set it to 0"
            )
        eval_model = forward_only(cfg.model) if not method.inner_loop else cfg.model
        eval_method = method
        # built again for another number of outputs (a 20-way protonet tested 5-way) or another net
        if eval_family.y_dim != family.y_dim or eval_model != cfg.model:
            eval_method = build_method(eval_model, family.x_dim, eval_family.y_dim, context)
            if param_shapes(method, family) != param_shapes(eval_method, eval_family):
                raise config_mod.ConfigError(
                    f"eval.task: {cfg.model.method}'s parameters depend on the number of outputs, which "
                    f"differs between task ({family.y_dim}) and eval.task ({eval_family.y_dim})"
                )
        return cls(cfg, family, eval_family, method, method.likelihood, eval_method)

    @property
    def eval_key(self) -> jax.Array:
        return jax.random.PRNGKey(self.cfg.eval.seed)


def forward_only(model: config_mod.ModelConfig) -> config_mod.ModelConfig:
    """The model config a method without an inner loop predicts with: conv4's patches (the training
    path: their gradients are plain matmuls) become XLA's convolution, whose forward pass alone runs
    1.6-1.7x faster on CPU (experiments/bench/evaluation/conv.py); the parameters are the same."""
    if model.net.kind != "conv4" or model.net.conv != "patches":
        return model
    return dataclasses.replace(model, net=dataclasses.replace(model.net, conv="xla"))


def param_shapes(method: Method, family: Family) -> dict[str, Any]:
    """Shapes of the model's and guide's parameter sites on one task of `family` (traced abstractly)."""

    def sites(key: jax.Array) -> dict[str, jax.Array]:
        batch = family.sample(key, 1)
        out = {}
        for fn in (method.model, method.guide):
            tr = handlers.trace(handlers.seed(fn, key)).get_trace(batch)
            out |= {k: v["value"] for k, v in tr.items() if v["type"] == "param"}
        return out

    return jax.eval_shape(sites, jax.random.PRNGKey(0))


def require_predictive(setup: Setup) -> None:
    """The run folder's evaluation (a predictive of y at query points) needs a family of supervised
    tasks; a family of MDPs (tasks.Environment), whose methods collect rollouts, is refused here."""
    if isinstance(setup.family, Environment):
        raise config_mod.ConfigError(
            f"task.family: {setup.cfg.task.family} is a family of MDPs (its methods collect rollouts), which "
            "bayesmeta fit / evaluate / sample cannot evaluate; train and evaluate it with its experiment "
            "script (experiments/meta_rl/) or bayesmeta.fit.fit"
        )


def default_run_dir(cfg: Config, root: str | Path = "runs") -> Path:
    return Path(root) / cfg.name


def landscape_monitor(setup: Setup, metric: Any) -> Any:
    """params -> landscape metrics (diagnostics.landscape) on train.diagnostics_tasks held-out tasks,
    with the held-out metric of the same step under the prefix `test_` (e.g. test_mse@10)."""
    cfg = setup.cfg.train
    tasks = setup.eval_family.sample(jax.random.fold_in(setup.eval_key, 10**6 + 1), cfg.diagnostics_tasks)
    probe = setup.eval_method.probe
    run = jax.jit(
        lambda p: landscape_metrics(probe(p), tasks, jax.random.PRNGKey(7), cfg.diagnostics_power_iterations)
    )

    def diagnose(params: dict) -> dict[str, float]:
        out = {k: float(v) for k, v in run(params).items()}
        return out | {f"test_{k}": v for k, v in metric(params).items()}

    return diagnose


RESULTS = ("metrics.json", INFERENCE, "summary.md", "posterior_summary.csv", "plots")  # made by finish
CACHE = "cache"  # finish's fit-level results (sections.Section.fit_level), by a hash of what they read


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
) -> tuple[FitResult, dict | None]:
    """Fit the configured method; when the run completes, evaluate it and write the run folder (in a
    multi-process run, process 0 does both and the others return no metrics).

    Holds the folder's lock throughout, and changes nothing in it until the config has built a model
    whose initial state (and, on resume, checkpoint) is valid; a fresh start first removes the
    previous run's checkpoint and results, so no file describes a run other than this one."""
    ((result, metrics),) = train_seeds([cfg], [run_dir], resume=resume, until=until, progress=progress)
    if isinstance(result, NonFiniteError):
        raise result
    return result, metrics


def train_seeds(
    cfgs: list[Config],
    run_dirs: list[str | Path | None],
    *,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
) -> list[tuple[FitResult | NonFiniteError, dict | None]]:
    """`train` for configs that differ only in seed and name, trained together (fit.fit_seeds: one
    vmapped computation), each then evaluated into its own folder; a seed whose loss turns non-finite
    is returned as its NonFiniteError (its last good checkpoint kept) and the others finish."""
    first = cfgs[0]
    if any(dataclasses.replace(c, seed=first.seed, name=first.name) != first for c in cfgs):
        raise ValueError("train_seeds: the configs must differ only in seed and name")
    setups = [Setup.from_config(c) for c in cfgs]
    setup = setups[0]
    require_predictive(setup)
    dirs = [Path(d) if d is not None else default_run_dir(c) for c, d in zip(cfgs, run_dirs, strict=True)]
    templates = [template_state(setup, c)[0] for c in cfgs]
    task_mesh(first.train.devices)
    primary = is_primary()  # of a multi-process run, only process 0 writes the folder and evaluates
    with contextlib.ExitStack() as stack:
        if primary:
            for d in dirs:
                stack.enter_context(run_lock(d, "bayesmeta fit"))
        for template, d in zip(templates, dirs, strict=True):
            if resume:
                load_checkpoint(d, template)
        for c, d in zip(cfgs, dirs, strict=True):
            if primary and not resume:
                clear_run(d)
            if primary:
                write_text(d / "config.toml", config_mod.dumps(c))
        monitor = setup.eval_family.sample(jax.random.fold_in(setup.eval_key, 10**6), first.train.eval_tasks)
        metric = quick_metric(
            setup.eval_method, setup.likelihood, monitor, max(first.eval.inner_steps), first.eval.batch
        )
        results = fit_seeds(
            setup.method,
            setup.family,
            first.train,
            seeds=tuple(c.seed for c in cfgs),
            run_dirs=tuple(dirs),
            resume=resume,
            until=until,
            evaluate=metric,
            diagnose=landscape_monitor(setup, metric) if first.train.diagnostics_every else None,
            progress=progress and primary,
            desc=first.name if len(cfgs) == 1 else f"{first.name} and {len(cfgs) - 1} more seeds",
            save=primary,
        )
        out: list[tuple[FitResult | NonFiniteError, dict | None]] = []
        for s, d, r in zip(setups, dirs, results, strict=True):
            done = not isinstance(r, NonFiniteError) and r.step >= first.train.steps and primary
            out.append((r, finish(s, d, r, progress=progress) if done else None))
        return out


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's results (metrics.json first: it marks a finished run), then its
    checkpoint: a fresh start must not leave them beside its own config."""
    for name in RESULTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def template_state(setup: Setup, cfg: Config) -> tuple[Any, SVI]:
    """The shapes of cfg's SVI state before step 0 (traced, not computed: a checkpoint's template, and
    the check that the configured model builds), and the SVI object that tracing initialised."""
    svi = make_svi(setup.method, cfg.train, cfg.seed)
    return initial_state(svi, setup.family, cfg.train, cfg.seed, shapes_only=True)[0], svi


def restore(cfg: Config, run_dir: Path) -> tuple[Setup, FitResult]:
    """Rebuild the method and load the run's checkpointed parameters."""
    setup = Setup.from_config(cfg)
    require_predictive(setup)
    template, svi = template_state(setup, cfg)
    state, step, trace = load_checkpoint(run_dir, template, resume=False)
    return setup, FitResult(svi.get_params(state), state, step, trace)


def grid_predictions(setup: Setup, params: dict, tasks: Any) -> dict[str, Any] | None:
    """Predictive means on a dense input grid for the first eval.plot_tasks tasks (1-D regression)."""
    n = min(setup.cfg.eval.plot_tasks, tasks.x_support.shape[0])
    fam = setup.eval_family
    if n == 0 or not isinstance(setup.likelihood, Gaussian) or not isinstance(fam, DenseGrid | GroundTruth):
        return None
    plot = jax.tree.map(lambda a: a[:n], tasks)
    x = fam.grid(plot.info, GRID_POINTS)
    batch = plot._replace(x_query=x, y_query=None)
    f = {
        s: np.asarray(
            predictive(setup.eval_method, s, setup.cfg.eval.samples, ("f",), setup.cfg.eval.blown_up_draws)(
                params, batch, jax.random.PRNGKey(1)
            )["f"]
        )
        for s in setup.cfg.eval.inner_steps
    }
    return {"x": np.asarray(x), "truth": np.asarray(fam.truth(plot.info, x)), "f": f}


def posterior_draws(setup: Setup, params: dict, batch: Any) -> dict[str, np.ndarray]:
    """Draws (S, ...) of the guide's meta-level latents: the stochastic meta-parameters."""
    prefixes = setup.eval_method.global_latents
    if not prefixes:
        return {}
    draws = Predictive(setup.eval_method.guide, params=params, num_samples=setup.cfg.eval.posterior_draws)(
        jax.random.PRNGKey(2), batch
    )
    return {k: np.asarray(v) for k, v in draws.items() if k.split(".")[0] in prefixes}


def log_likelihood(setup: Setup, params: dict, ev: Evaluation) -> dict[int, np.ndarray]:
    """Pointwise log p(y_query | f) (S, T, n) of every predictive draw, per test-time step count, under
    the method's likelihood at the fitted parameters and the draws (a learned or per-point noise sd)."""
    lik = setup.eval_method.likelihood
    y = jnp.asarray(ev.tasks.y_query)
    out = {}
    for s, d in ev.draws.items():
        draws = {k: jnp.asarray(v) for k, v in d.items()}
        out[s] = np.asarray(lik.at(params, draws).log_prob(draws["f"], y))
    return out


def finish(
    setup: Setup, run_dir: Path, result: FitResult, progress: bool = True, fit_dir: Path | None = None
) -> dict:
    """Evaluate on held-out tasks and write inference.nc, metrics.json, summary.md, plots and the
    config evaluated under, all or nothing (io.publish): a failure leaves the previous files. Results
    that depend on the fit alone (the PAC-Bayes bound) are kept in <fit_dir>/cache/ (fit_dir: the
    training run's folder, default run_dir) and reused by later evaluations of the same fit."""
    cfg = setup.cfg
    t0 = time.perf_counter()
    batches = eval_tasks(setup.eval_family, setup.eval_key, cfg.eval.tasks, cfg.eval.batch)
    ev: Evaluation = evaluate(
        setup.eval_method,
        setup.likelihood,
        result.params,
        batches,
        cfg.eval.inner_steps,
        cfg.eval.samples,
        jax.random.fold_in(setup.eval_key, 1),
        progress=progress,
        blown_up=cfg.eval.blown_up_draws,
        extra_metrics=setup.eval_family.task_metrics if isinstance(setup.eval_family, TaskMetrics) else None,
    )
    grid = grid_predictions(setup, result.params, ev.tasks)
    results = compute_sections(Evaluated(setup, result.params, ev, result), (fit_dir or run_dir) / CACHE)
    eval_seconds = time.perf_counter() - t0
    loss = np.asarray(result.trace.loss)
    metrics = {
        "version": METRICS_VERSION,
        "name": cfg.name,
        "method": setup.method.name,
        "family": cfg.task.family,
        "eval_family": cfg.eval.task.family,
        "seed": cfg.seed,
        "steps": result.step,
        "train_seconds": result.trace.seconds,
        "eval_seconds": eval_seconds,
        "eval_tasks": cfg.eval.tasks,
        "final_loss": float(loss[-100:].mean()),
        "largest_loss": {"value": float(loss.max()), "step": int(np.argmax(loss)) + 1},
        "environment": environment(),
        "metrics": ev.summary(),
        **dump_sections(results),
    }
    if result.trace.eval_step:  # the held-out metric during training: {name: {step: value}}
        steps = [str(s) for s in result.trace.eval_step]
        metrics["history"] = {k: dict(zip(steps, v, strict=True)) for k, v in result.trace.eval.items()}
    attrs = {
        "method": setup.method.name,
        "family": cfg.task.family,
        "config": config_mod.dumps(cfg),
        "train_seconds": result.trace.seconds,
        "inference": "SVI: the stochastic meta-parameters' variational posterior is drawn in posterior, "
        "the meta-parameters held in numpyro.param are in point_estimates",
    }
    groups, section_attrs = tree_contributions(results)
    dt = build_datatree(
        posterior=posterior_draws(setup, result.params, batches[0]),
        point_estimates={k: np.asarray(v) for k, v in result.params.items()},
        draws=ev.draws,
        log_likelihood=log_likelihood(setup, result.params, ev),
        tasks=ev.tasks,
        grid=grid,
        trace=result.trace,
        attrs=attrs | section_attrs,
        inner_steps=list(cfg.eval.inner_steps),
        groups=groups,
    )

    def write(stage: Path) -> None:
        save_datatree(dt, stage / INFERENCE)
        write_report(stage, dt, metrics)
        write_text(stage / "config.toml", config_mod.dumps(cfg))

    with run_lock(run_dir, "bayesmeta evaluate"):
        publish(run_dir, write, last=("metrics.json", "config.toml"))
    return metrics
