"""Curvature from Hessian-vector products alone (no Hessian is ever formed).

HVPs are forward-over-reverse, jax.jvp of jax.grad (Pearlmutter 1994): one extra pass per product,
exact for any twice-differentiable scalar loss of a parameter pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Params = Any


def hvp(loss: Callable[[Params], jax.Array], params: Params, v: Params) -> Params:
    """H v with H = d^2 loss / d params^2 at params (forward-over-reverse)."""
    return jax.jvp(jax.grad(loss), (params,), (v,))[1]


def probes(key: jax.Array, params: Params, n: int, kind: str = "gaussian") -> Params:
    """n probe vectors shaped like params (leading axis n) with E[v v^T] = I: N(0, I) or Rademacher."""
    flat, unravel = ravel_pytree(params)
    if kind == "gaussian":
        v = jax.random.normal(key, (n, flat.size), flat.dtype)
    elif kind == "rademacher":
        v = jax.random.rademacher(key, (n, flat.size), flat.dtype)
    else:
        raise ValueError(f"probes: expected 'gaussian' or 'rademacher', got {kind!r}")
    return jax.vmap(unravel)(v)


def hessian_frobenius_sq(
    loss: Callable[[Params], jax.Array],
    params: Params,
    key: jax.Array,
    n_probes: int = 1,
    kind: str = "gaussian",
) -> jax.Array:
    """Hutchinson's estimate of ||H||_F^2 = tr(H^T H) = E_v ||H v||^2 for E[v v^T] = I (Hutchinson 1989),
    the mean over n_probes probes: unbiased, with variance 2 ||H^2||_F^2 / n_probes for v ~ N(0, I)."""
    vs = probes(key, params, n_probes, kind)
    hv = jax.vmap(lambda v: ravel_pytree(hvp(loss, params, v))[0])(vs)
    return jnp.mean(jnp.sum(jnp.square(hv), -1))
