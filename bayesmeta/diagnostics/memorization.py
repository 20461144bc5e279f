"""A memorization meter: how much a model's predictions on a query input depend on the support set.

    D = E_{i, x*} Var_r f(x*_i; D_{pi_r(i)})  /  E_{i, x*} Var_r g_{pi_r(i)}(x*_i)

The query inputs of task i are predicted after adapting to the support sets of R other tasks
pi_r(i); g_j is task j's true function. A model that ignores the support set (complete memorization,
I(y*; D | x*, theta) = 0, Yin et al. 2020) has D = 0; one that follows it to the truth has D ~ 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bayesmeta.method import Method
from bayesmeta.predict import predictive
from bayesmeta.tasks import Family, TaskBatch


def support_dependence(
    method: Method,
    params: dict,
    family: Family,
    tasks: TaskBatch,
    inner_steps: int,
    key: jax.Array,
    shuffles: int = 4,
    samples: int = 1,
) -> float:
    """The meter D on `tasks` (regression families with a `truth`), with `shuffles` support swaps."""
    run = predictive(method, inner_steps, samples, ("f",))
    preds, truths = [], []
    for r, k in enumerate(jax.random.split(key, shuffles)):
        perm = jax.random.permutation(k, tasks.n_tasks)
        swapped = tasks._replace(
            x_support=tasks.x_support[perm], y_support=tasks.y_support[perm], y_query=None
        )
        preds.append(jnp.mean(run(params, swapped, jax.random.fold_in(key, r))["f"], axis=0))
        truths.append(family.truth(jax.tree.map(lambda a, perm=perm: a[perm], tasks.info), tasks.x_query))
    num = jnp.mean(jnp.var(jnp.stack(preds), axis=0))
    den = jnp.mean(jnp.var(jnp.stack(truths), axis=0))
    return float(num / den)
