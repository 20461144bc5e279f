"""A memorization meter: how much a model's predictions on a query input depend on the support set,
and whether that dependence follows the truth.

    D     = E_{i, x*} Var_r f(x*_i; D_{pi_r(i)})            /  E_{i, x*} Var_r g_{pi_r(i)}(x*_i)
    slope = E_{i, x*} Cov_r(f(x*_i; D_{pi_r(i)}), g_{pi_r(i)}(x*_i)) / E_{i, x*} Var_r g_{pi_r(i)}(x*_i)

The query inputs of task i are predicted after adapting to the support sets of R other tasks
pi_r(i); g_j is task j's true function. A model that ignores the support set (complete memorization,
I(y*; D | x*, theta) = 0, Yin et al. 2020) has D = 0 and slope 0; one that follows it to the truth has
D ~ 1 and slope ~ 1. D alone cannot tell following the truth from following the support set's noise
(or fitting it badly): a model whose predictions swing with the support set in ways unrelated to the
truth has D > 0 but slope ~ 0. Every shuffle uses the same random key, so a stochastic model's
sampling noise is not counted as support dependence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.method import Method
from bayesmeta.predict import predictive
from bayesmeta.tasks import Counterfactual, Family, TaskBatch


def support_dependence(
    method: Method,
    params: dict,
    family: Family,
    tasks: TaskBatch,
    inner_steps: int,
    key: jax.Array,
    shuffles: int = 4,
    samples: int = 1,
) -> dict[str, float]:
    """{"support_dependence": D, "truth_slope": slope} on `tasks` (regression families with a
    `truth`, or `Counterfactual` ones), over `shuffles` support swaps that share one prediction key."""
    run = predictive(method, inner_steps, samples, ("f",))
    perm_key, pred_key = jax.random.split(key)

    @jax.jit
    def shuffled(params: dict, tasks: TaskBatch, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the predictive mean after adapting to swapped support sets, the truth it should follow)."""
        swapped, truth = swap(family, k, tasks)
        return jnp.mean(run(params, swapped, pred_key)["f"], axis=0), truth

    pairs = [shuffled(params, tasks, k) for k in jax.random.split(perm_key, shuffles)]
    f, g = (np.stack([np.asarray(p[i]) for p in pairs]) for i in (0, 1))
    fc, gc = f - f.mean(0), g - g.mean(0)
    var_g = np.mean(np.square(gc))
    return {
        "support_dependence": float(np.mean(np.square(fc)) / var_g),
        "truth_slope": float(np.mean(fc * gc) / var_g),
    }


def swap(family: Family, key: jax.Array, tasks: TaskBatch) -> tuple[TaskBatch, jax.Array]:
    """One support swap: (tasks with another task's support set and y_query withheld, that task's
    truth at the query inputs): the family's counterfactual, else task i gets task pi(i)'s support set
    for a random permutation pi and the truth g_{pi(i)}(x*_i)."""
    if isinstance(family, Counterfactual):
        return family.counterfactual(key, tasks)
    perm = jax.random.permutation(key, tasks.n_tasks)
    swapped = tasks._replace(x_support=tasks.x_support[perm], y_support=tasks.y_support[perm], y_query=None)
    return swapped, family.truth(jax.tree.map(lambda a: a[perm], tasks.info), tasks.x_query)
