"""Objective-landscape metrics of gradient-based meta-learning (METHODS 6), as pure functions.

Parameters are pytrees; "per task" means a leading task axis on every leaf. The run-level entry point
`landscape_metrics` takes a method's `Probe` (bayesmeta.method) and a batch of held-out tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bayesmeta.diagnostics.conflict import conflict_per_layer

Params = Any
TINY = 1e-30


def hvp(loss: Callable[[Params], jax.Array], params: Params, v: Params) -> Params:
    """H v with H the Hessian of `loss` at `params`: forward-over-reverse, jvp of grad (no explicit H)."""
    return jax.jvp(jax.grad(loss), (params,), (v,))[1]


def top_eigenvalue(
    loss: Callable[[Params], jax.Array], params: Params, key: jax.Array, iterations: int = 20
) -> jax.Array:
    """Eigenvalue of largest magnitude of the Hessian at `params` (its spectral norm, up to sign), by
    power iteration v <- Hv / ||Hv|| from a Gaussian v, reported as the Rayleigh quotient v.Hv."""
    flat, unravel = ravel_pytree(params)
    v0 = jax.random.normal(key, flat.shape, flat.dtype)

    def hv(v: jax.Array) -> jax.Array:
        return ravel_pytree(hvp(loss, params, unravel(v)))[0]

    def body(_: int, v: jax.Array) -> jax.Array:
        w = hv(v)
        return w / jnp.maximum(jnp.linalg.norm(w), TINY)

    v = jax.lax.fori_loop(0, iterations, body, v0 / jnp.linalg.norm(v0))
    return v @ hv(v)


def flatness(
    loss: Callable[[Params, jax.Array, jax.Array], jax.Array],
    phi: Params,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    iterations: int = 20,
) -> jax.Array:
    """E_i lambda_max(Hessian of loss(., x_i, y_i) at phi_i): sharpness at the adapted parameters
    (METHODS 6.1); phi, x, y carry a leading task axis. Smaller is flatter."""
    keys = jax.random.split(key, x.shape[0])
    per_task = jax.vmap(lambda p, xi, yi, k: top_eigenvalue(lambda q: loss(q, xi, yi), p, k, iterations))
    return jnp.mean(per_task(phi, x, y, keys))


def mean_off_diagonal(gram: jax.Array) -> jax.Array:
    """E_{i != j} G_ij of a (T, T) matrix."""
    t = gram.shape[0]
    return (jnp.sum(gram) - jnp.trace(gram)) / (t * (t - 1))


def rows(tree: Params) -> jax.Array:
    """A pytree with a leading task axis -> (T, D): one flat vector per task."""
    return jax.vmap(lambda t: ravel_pytree(t)[0])(tree)


def unit(v: jax.Array) -> jax.Array:
    """Rows scaled to unit length (a zero row stays zero)."""
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), TINY)


def trajectory_coherence(theta: Params, phi: Params) -> jax.Array:
    """E_{i != j} cos(phi_i - theta, phi_j - theta) (METHODS 6.2): 1 when all tasks move the same way."""
    d = unit(rows(jax.tree.map(lambda p, t: p - t[None], phi, theta)))
    return mean_off_diagonal(d @ d.T)


def gradient_coherence(grads: Params) -> jax.Array:
    """E_{i != j} g_i . g_j for per-task g_i = -grad L(D_i; theta) (METHODS 6.3): an unnormalised inner
    product, as specified (the sign of g cancels in the product)."""
    g = rows(grads)
    return mean_off_diagonal(g @ g.T)


def representation_coherence(features: jax.Array) -> jax.Array:
    """E_{i != j} cos(h_i, h_j) for one feature vector h_i (T, d) per task (METHODS 6.4).

    Normalised (a cosine) so that the metric measures agreement of direction, not the feature scale,
    which grows during training on its own and would dominate a raw h_i . h_j."""
    h = unit(features)
    return mean_off_diagonal(h @ h.T)


def landscape_metrics(probe: Any, batch: Any, key: jax.Array, iterations: int = 20) -> dict[str, jax.Array]:
    """The four landscape metrics (METHODS 6) and L2F's conflict per layer (METHODS 5) on `batch`.

    - flatness: top Hessian eigenvalue of each task's support loss (the loss its inner loop minimised)
      at its adapted phi_i, averaged over tasks;
    - trajectory coherence of phi_i - theta; gradient coherence of g_i = -grad support loss at theta;
    - representation coherence of h_i = the mean over task i's query inputs of the features (the
      penultimate layer) under the adapted phi_i, as cosines (see `representation_coherence`);
    - conflict/<layer>: E_i |arccos(u_hat_i . v)| of u_i = -grad_theta query loss(phi_i(theta)),
      differentiated through the method's own inner loop (first-order methods: as they train).
    """
    theta = probe.theta
    xs, ys, xq, yq = batch.x_support, batch.y_support, batch.x_query, batch.y_query
    phi = probe.adapt(theta, xs, ys)
    grads = jax.vmap(jax.grad(lambda th, x, y: -probe.support_loss(th, x, y)), (None, 0, 0))(theta, xs, ys)

    def query_losses(th: Params) -> jax.Array:
        return -jax.vmap(probe.query_loss)(probe.adapt(th, xs, ys), xq, yq)

    meta_grads = jax.jacrev(query_losses)(theta)  # u_i, leading task axis
    h = jnp.mean(jax.vmap(probe.features)(phi, xq), axis=1)
    out = {
        "flatness": flatness(probe.support_loss, phi, xs, ys, key, iterations),
        "trajectory_coherence": trajectory_coherence(theta, phi),
        "gradient_coherence": gradient_coherence(grads),
        "representation_coherence": representation_coherence(h),
    }
    out.update({f"conflict_{k}": v for k, v in conflict_per_layer(meta_grads).items()})
    return out
