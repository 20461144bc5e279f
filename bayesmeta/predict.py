"""Posterior predictive for new tasks through numpyro.infer.Predictive, and metrics over tasks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Predictive
from tqdm.auto import tqdm

from bayesmeta.method import Method
from bayesmeta.tasks import Family, TaskBatch


def predictive(
    method: Method, inner_steps: int, num_samples: int, sites: tuple[str, ...] = ("y", "f")
) -> Callable[[dict, TaskBatch, jax.Array], dict]:
    """Jitted (params, batch, key) -> {site: (S, T, n, ...)}: adapt on the support set with
    `inner_steps` steps, then sample the query set (y_query withheld)."""

    def run(params: dict, batch: TaskBatch, key: jax.Array) -> dict:
        pred = Predictive(
            partial(method.model, inner_steps=inner_steps),
            params=params,
            guide=method.guide if method.predict_with_guide else None,
            num_samples=num_samples,
            return_sites=list(sites),
        )
        return pred(key, batch._replace(y_query=None))

    return jax.jit(run)


def summarize(values: np.ndarray) -> dict[str, float | int | None]:
    """Mean over tasks with sd and the normal-approximation 95% CI half-width 1.96 sd / sqrt(n).

    A task whose adapted prediction diverged makes the mean non-finite (reported as None); the
    median, the mean over finite tasks and their count say how much of the mean that is.
    """
    values = np.asarray(values, np.float64)
    n = values.size
    finite = values[np.isfinite(values)]

    def num(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    sd = values.std(ddof=1) if n > 1 else 0.0
    return {
        "mean": num(values.mean()),
        "sd": num(sd),
        "ci95": num(1.96 * sd / np.sqrt(n)),
        "n": n,
        "median": num(np.median(values)),
        "n_nonfinite": int(n - finite.size),
        "mean_finite": num(finite.mean()) if finite.size else None,
    }


def eval_tasks(family: Family, key: jax.Array, n_tasks: int, chunk: int) -> list[TaskBatch]:
    """Held-out tasks, deterministic from `key`, in chunks of at most `chunk` tasks."""
    sizes = [min(chunk, n_tasks - i) for i in range(0, n_tasks, chunk)]
    return [family.sample(jax.random.fold_in(key, i), s) for i, s in enumerate(sizes)]


@dataclass
class Evaluation:
    """Per-task metrics (name -> (T,)) and predictive draws per test-time step count."""

    per_task: dict[int, dict[str, np.ndarray]]
    draws: dict[int, dict[str, np.ndarray]]
    tasks: TaskBatch

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"{name}@{s}": summarize(v) for s, m in self.per_task.items() for name, v in m.items()}


def evaluate(
    method: Method,
    likelihood: Any,
    params: dict,
    batches: list[TaskBatch],
    inner_steps: tuple[int, ...],
    num_samples: int,
    key: jax.Array,
    progress: bool = False,
) -> Evaluation:
    """Adapt and predict every batch for each test-time step count; metrics of the predictive mean."""
    per_task: dict[int, dict[str, list]] = {}
    draws: dict[int, dict[str, list]] = {}
    total = len(batches) * len(inner_steps)
    with tqdm(total=total, desc="evaluate", disable=not progress or total < 2) as bar:
        for s in inner_steps:
            run = predictive(method, s, num_samples)
            for i, batch in enumerate(batches):
                out = run(params, batch, jax.random.fold_in(key, i))
                mean = jnp.mean(out["f"], axis=0)
                for name, v in likelihood.task_metrics(mean, batch.y_query).items():
                    per_task.setdefault(s, {}).setdefault(name, []).append(np.asarray(v))
                for site, v in out.items():
                    draws.setdefault(s, {}).setdefault(site, []).append(np.asarray(v))
                bar.update()
    cat = partial(np.concatenate, axis=0)
    tasks = jax.tree.map(lambda *a: np.concatenate(a, 0), *batches)
    return Evaluation(
        per_task={s: {k: cat(v) for k, v in m.items()} for s, m in per_task.items()},
        draws={s: {k: np.concatenate(v, axis=1) for k, v in m.items()} for s, m in draws.items()},
        tasks=tasks,
    )


def quick_metric(
    method: Method, likelihood: Any, batch: TaskBatch, inner_steps: int
) -> Callable[[dict], dict[str, float]]:
    """params -> {metric@steps: mean over the batch}: the cheap evaluation run during training."""
    run = predictive(method, inner_steps, 1, sites=("f",))
    key = jax.random.PRNGKey(0)

    def metric(params: dict) -> dict[str, float]:
        mean = run(params, batch, key)["f"][0]
        return {
            f"{k}@{inner_steps}": float(jnp.mean(v))
            for k, v in likelihood.task_metrics(mean, batch.y_query).items()
        }

    return metric
