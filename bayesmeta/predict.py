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
from bayesmeta.sites import DRAW_CHECK
from bayesmeta.stats import diverged_tasks, summarize
from bayesmeta.tasks import Family, TaskBatch


def predictive(
    method: Method,
    inner_steps: int,
    num_samples: int,
    sites: tuple[str, ...] = ("y", "f"),
    blown_up: str = "keep",
) -> Callable[[dict, TaskBatch, jax.Array], dict]:
    """Jitted (params, batch, key) -> {site: (S, T, n, ...)}: adapt on the support set with
    `inner_steps` steps, then sample the query set (y_query withheld); by the method's own sampler
    when it declares one, else by numpyro.infer.Predictive (model and guide both get `inner_steps`).
    For a method with `draw_check` the result also holds "blown_up" (S, T), the draws whose support
    loss rose; `blown_up="reject"` replaces them by the task's accepted draws (`accepted_draws`)."""
    if blown_up not in ("keep", "reject"):
        raise ValueError(f"blown_up: expected 'keep' or 'reject', got {blown_up!r}")
    want = (*sites, DRAW_CHECK) if method.draw_check else sites

    def run(params: dict, batch: TaskBatch, key: jax.Array) -> dict:
        batch = batch._replace(y_query=None)
        if method.sampler is not None:
            out = method.sampler(params, batch, key, inner_steps, num_samples)
        else:
            out = Predictive(
                partial(method.model, inner_steps=inner_steps, training=False),
                params=params,
                guide=partial(method.guide, inner_steps=inner_steps) if method.predict_with_guide else None,
                num_samples=num_samples,
                return_sites=list(want),
            )(key, batch)
        out = {s: out[s] for s in want}
        if not method.draw_check:
            return out
        loss = out.pop(DRAW_CHECK)
        blown = ~(loss[..., 1] <= loss[..., 0])  # a NaN loss counts as blown up
        if blown_up == "reject":
            idx = accepted_draws(blown)
            out = {
                s: jnp.take_along_axis(v, idx.reshape(*idx.shape, *[1] * (v.ndim - 2)), 0)
                for s, v in out.items()
            }
        return out | {"blown_up": blown}

    return jax.jit(run)


def accepted_draws(blown: jax.Array) -> jax.Array:
    """Per task, the draw index (S, T) to use in place of each draw: itself if accepted, else the k-th
    blown-up draw takes the task's accepted draws in turn (k mod their number: rejection with
    replacement); a task with no accepted draw keeps all its draws."""
    n_ok = jnp.sum(~blown, 0)
    order = jnp.argsort(blown, axis=0, stable=True)  # accepted draws first, in their order
    rank = jnp.cumsum(blown, 0) - 1  # k for the k-th blown-up draw
    repl = jnp.take_along_axis(order, rank % jnp.maximum(n_ok, 1)[None], 0)
    keep = ~blown | (n_ok == 0)[None]
    return jnp.where(keep, jnp.arange(blown.shape[0])[:, None], repl)


def support_loss(
    method: Method, likelihood: Any, inner_steps: int, num_samples: int
) -> Callable[[dict, TaskBatch, jax.Array], jax.Array]:
    """(params, batch, key) -> per-task loss of the predictive mean on the support set itself after
    `inner_steps` adaptation steps (the loss the inner loop minimises)."""
    run = predictive(method, inner_steps, num_samples, ("f",))

    def loss(params: dict, batch: TaskBatch, key: jax.Array) -> jax.Array:
        f = run(params, batch._replace(x_query=batch.x_support), key)["f"]
        return likelihood.task_loss(jnp.mean(f, axis=0), batch.y_support)

    return loss


def eval_tasks(family: Family, key: jax.Array, n_tasks: int, chunk: int) -> list[TaskBatch]:
    """Held-out tasks, deterministic from `key`, in chunks of at most `chunk` tasks."""
    sizes = [min(chunk, n_tasks - i) for i in range(0, n_tasks, chunk)]
    sample = jax.jit(family.sample, static_argnums=1)  # eager sampling compiles every op on its own
    return [sample(jax.random.fold_in(key, i), s) for i, s in enumerate(sizes)]


@dataclass
class Evaluation:
    """Per-task metrics (name -> (T,)), predictive draws, and the support loss after s steps
    (key 0: before adaptation) per test-time step count; for a method without an inner loop, which
    adapts nothing, no support loss but `unfinite`, the tasks whose predictions are not finite."""

    per_task: dict[int, dict[str, np.ndarray]]
    draws: dict[int, dict[str, np.ndarray]]
    tasks: TaskBatch
    support_loss: dict[int, np.ndarray]
    unfinite: np.ndarray | None = None

    def diverged(self, s: int) -> np.ndarray:
        """Issue #12's rule: the adapted support loss rose or is not finite; without an inner loop
        nothing adapts, and a task diverged only when its predictions are not finite."""
        if self.unfinite is not None:
            return self.unfinite
        return diverged_tasks(self.support_loss[0], self.support_loss[s])

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            f"{name}@{s}": summarize(v, self.diverged(s))
            for s, m in self.per_task.items()
            for name, v in m.items()
        }


def evaluate(
    method: Method,
    likelihood: Any,
    params: dict,
    batches: list[TaskBatch],
    inner_steps: tuple[int, ...],
    num_samples: int,
    key: jax.Array,
    progress: bool = False,
    blown_up: str = "keep",
    extra_metrics: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = None,
) -> Evaluation:
    """Adapt and predict every batch for each test-time step count; draws of "y", "f" and the
    likelihood's own draw sites (a heteroscedastic sd), metrics of the predictive mean, and the support
    loss before and after adaptation (for the divergence rule; a method without an inner loop predicts
    once, for every step count, and no support loss is computed); for methods that check
    their draws, the fraction of each task's draws that blew up ("blown_up_draws", counted before any
    rejection); `extra_metrics(mean, y)` adds a family's own per-task metrics (tasks.TaskMetrics)."""
    per_task: dict[int, dict[str, list]] = {}
    draws: dict[int, dict[str, list]] = {}
    support: dict[int, list] = {}
    steps = (0, *(s for s in inner_steps if s != 0))
    predicted = [s for s in steps if s in inner_steps]
    adapts = method.inner_loop or not predicted
    if not adapts:  # every step count predicts alike: compute the first, copy it to the others
        predicted = predicted[:1]
    computed = steps if adapts else tuple(predicted)
    unfinite: list[np.ndarray] = []
    total = len(batches) * len(computed)
    with tqdm(total=total, desc="evaluate", disable=not progress or total < 2) as bar:
        for s in computed:
            run = predictive(method, s, num_samples, ("y", "f", *likelihood.draw_sites), blown_up)
            loss = support_loss(method, likelihood, s, num_samples) if adapts else None
            for i, batch in enumerate(batches):
                k = jax.random.fold_in(key, i)
                if adapts:
                    support.setdefault(s, []).append(np.asarray(loss(params, batch, k)))
                bar.update()
                if s not in predicted:
                    continue
                out = run(params, batch, k)
                mean = jnp.mean(out["f"], axis=0)
                if not adapts:
                    unfinite.append(np.asarray(~jnp.all(jnp.isfinite(mean.reshape(len(mean), -1)), 1)))
                metrics = likelihood.task_metrics(mean, batch.y_query)
                if extra_metrics is not None:
                    metrics |= extra_metrics(mean, batch.y_query)
                if "blown_up" in out:
                    metrics["blown_up_draws"] = jnp.mean(out.pop("blown_up"), 0)
                for name, v in metrics.items():
                    per_task.setdefault(s, {}).setdefault(name, []).append(np.asarray(v))
                for site, v in out.items():
                    draws.setdefault(s, {}).setdefault(site, []).append(np.asarray(v))
    for s in steps if batches else ():  # the copies (identical: the same computation on the same keys)
        if adapts:
            support.setdefault(s, support[0])
        if s in inner_steps and predicted:
            per_task.setdefault(s, per_task[predicted[0]])
            draws.setdefault(s, draws[predicted[0]])
    cat = partial(np.concatenate, axis=0)
    tasks = jax.tree.map(lambda *a: np.concatenate(a, 0), *batches)
    return Evaluation(
        per_task={s: {k: cat(v) for k, v in m.items()} for s, m in per_task.items()},
        draws={s: {k: np.concatenate(v, axis=1) for k, v in m.items()} for s, m in draws.items()},
        tasks=tasks,
        support_loss={s: cat(v) for s, v in support.items()},
        unfinite=None if adapts else cat(unfinite) if unfinite else np.zeros(0, bool),
    )


def quick_metric(
    method: Method, likelihood: Any, batch: TaskBatch, inner_steps: int, chunk: int | None = None
) -> Callable[[dict], dict[str, float]]:
    """params -> {metric@steps: mean over the batch}: the cheap evaluation run during training, of one
    predictive draw (for a method with a posterior its MSE includes the draw's spread about the mean),
    `chunk` tasks at a time (all at once when None), so that its memory is that of eval.batch tasks."""
    run = predictive(method, inner_steps, 1, sites=("f",))
    key = jax.random.PRNGKey(0)
    n = batch.n_tasks
    parts = [batch.take(slice(i, i + (chunk or n))) for i in range(0, n, chunk or n)]

    def metric(params: dict) -> dict[str, float]:
        per_task: dict[str, list] = {}
        for part in parts:
            mean = run(params, part, key)["f"][0]
            for k, v in likelihood.task_metrics(mean, part.y_query).items():
                per_task.setdefault(k, []).append(v)
        return {f"{k}@{inner_steps}": float(jnp.mean(jnp.concatenate(v))) for k, v in per_task.items()}

    return metric
