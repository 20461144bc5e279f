"""Per-task gradients -> one gradient, as optax transformations (Meta-PCGrad, METHODS 7.3).

The updates these transformations receive carry a leading task axis; they return a gradient without
it, so `optax.chain(pcgrad(), optax.adam(lr))` is an optimizer over per-task gradients. Both combine
by the MEAN over tasks: with no conflicting pair, pcgrad's output equals `task_mean`'s, which is the
ordinary gradient of a loss that is a mean over tasks (the engine's convention).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree


def project_conflicting(grads: Any, key: jax.Array) -> Any:
    """PCGrad surgery (Yu et al. 2020): for each task i and each other task j in a random order (one
    permutation per i), if g_i . g_j < 0 then g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j, with g_j the
    original gradients. Pytree with a leading task axis in and out."""
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(grads)
    unravel = ravel_pytree(jax.tree.map(lambda a: a[0], grads))[1]
    n = flat.shape[0]
    sq = jnp.sum(flat * flat, axis=1)
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n))

    def one(g: jax.Array, i: jax.Array, order: jax.Array) -> jax.Array:
        def body(g: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            dot = g @ flat[j]
            conflict = (dot < 0) & (j != i)
            coef = jnp.where(conflict, dot / jnp.where(conflict, sq[j], 1.0), 0.0)
            return g - coef * flat[j], None

        return jax.lax.scan(body, g, order)[0]

    return jax.vmap(unravel)(jax.vmap(one)(flat, jnp.arange(n), orders))


def _mean(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)


def task_mean() -> optax.GradientTransformation:
    """mean_i g_i: the ordinary meta-batch gradient from per-task gradients."""
    return optax.stateless(lambda g, _: _mean(g))


class PCGradState(NamedTuple):
    key: jax.Array  # split every update; checkpointed with the optimizer state, so resume is exact


def pcgrad(seed: int = 0) -> optax.GradientTransformation:
    """mean_i of the PCGrad-projected g_i (`project_conflicting`), a fresh random order every update."""

    def init(params: Any) -> PCGradState:
        return PCGradState(jax.random.PRNGKey(seed))

    def update(updates: Any, state: PCGradState, params: Any = None) -> tuple[Any, PCGradState]:
        key, sub = jax.random.split(state.key)
        return _mean(project_conflicting(updates, sub)), PCGradState(key)

    return optax.GradientTransformation(init, update)
