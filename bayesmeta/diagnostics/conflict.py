"""L2F's degree of conflict between per-task meta-gradients (Baik, Hong & Lee 2020; METHODS 5)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

TINY = 1e-30


def degree_of_conflict(u: Any) -> jax.Array:
    """E_i |arccos(u_hat_i . v)|, v = sum_i u_i / ||sum_i u_i||, for u with a leading task axis.

    0 when all u_i point the same way. When the u_i cancel exactly there is no common direction:
    v is taken as 0 and every angle is pi/2.
    """
    g = jax.vmap(lambda t: ravel_pytree(t)[0])(u)
    total = jnp.sum(g, axis=0)
    v = total / jnp.maximum(jnp.linalg.norm(total), TINY)
    u_hat = g / jnp.maximum(jnp.linalg.norm(g, axis=1, keepdims=True), TINY)
    return jnp.mean(jnp.abs(jnp.arccos(jnp.clip(u_hat @ v, -1.0, 1.0))))


def conflict_per_layer(u: dict) -> dict[str, jax.Array]:
    """degree_of_conflict of each top-level entry (a layer: all its tensors together) of u."""
    return {k: degree_of_conflict(v) for k, v in u.items()}
