"""Samplers shared by the data-backed families: distinct draws from groups of different sizes (a task's
points, a class's images) and N-way episodes assembled from per-class draws."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.tasks.base import TaskBatch


def device(a: np.ndarray) -> jax.Array:
    """A concrete device array, also when first needed inside a jit trace (cached data, not a tracer)."""
    with jax.ensure_compile_time_eval():
        return jnp.asarray(a)


def choose(key: jax.Array, n: jax.Array, k: int) -> jax.Array:
    """k distinct integers of 0..n-1 in uniformly random order, for every entry of n (..., traced,
    each >= k): (..., k). Floyd's algorithm draws a uniform k-subset in k steps whatever n is (no
    (..., max n) array), and a random permutation orders it."""
    kf, kp = jax.random.split(key)

    def step(i: int, chosen: jax.Array) -> jax.Array:
        j = n - k + i  # step i adds j when its draw t in 0..j was chosen before, else t
        t = jax.random.randint(jax.random.fold_in(kf, i), n.shape, 0, j + 1)
        taken = jnp.any(chosen == t[..., None], -1)
        return chosen.at[..., i].set(jnp.where(taken, j, t))

    chosen = jax.lax.fori_loop(0, k, step, jnp.full((*n.shape, k), -1, n.dtype))
    order = jnp.argsort(jax.random.uniform(kp, chosen.shape), -1)
    return jnp.take_along_axis(chosen, order, -1)


def draw_members(key: jax.Array, start: jax.Array, count: jax.Array, group: jax.Array, k: int) -> jax.Array:
    """For every entry of `group` (...), the positions of k distinct members of that group, in random
    order: (..., k) indices into members stored group after group (group g at start[g], count[g] of
    them, each count >= k)."""
    return start[group][..., None] + choose(key, count[group], k)


def pick_classes(key: jax.Array, n_tasks: int, n_classes: int, ways: int) -> jax.Array:
    """(T, N): N distinct classes of 0..n_classes-1 per task; label j of task t is column j."""
    keys = jax.random.split(key, n_tasks)
    return jax.vmap(lambda k: jax.random.choice(k, n_classes, (ways,), replace=False))(keys)


def episode(x: jax.Array, shots: int, classes: jax.Array) -> TaskBatch:
    """An N-way episode from inputs x (T, N, K+Q, d) of N classes: the first `shots` of each class are
    its support set, the rest its queries, labelled 0..N-1 in class order; info["classes"] = classes."""
    n_tasks, ways, per_class = x.shape[:3]
    y = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32)[None, :, None], (n_tasks, ways, per_class))

    def flat(a: jax.Array) -> jax.Array:
        return a.reshape(n_tasks, -1, *a.shape[3:])

    k = shots
    return TaskBatch(
        flat(x[:, :, :k]), flat(y[:, :, :k]), flat(x[:, :, k:]), flat(y[:, :, k:]), {"classes": classes}
    )
