"""Pure-JAX networks: `init(key) -> params` (a dict of layers) and `apply(params, x)` for one task.

Parameters are nested dicts {layer_name: {"w", "b"}} whose last layer is always "head", so an inner
loop can adapt "all" layers or the "head" only, and a conv net plugs in with the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bayesmeta.config import NetConfig

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "elu": jax.nn.elu}


def dense_init(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
    """Glorot-normal weights, zero bias."""
    w = jax.nn.initializers.glorot_normal()(key, (n_in, n_out), jnp.float32)
    return {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}


def dense(layer: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ layer["w"] + layer["b"]


@dataclass(frozen=True)
class MLP:
    """x (n, in_dim) -> hidden ReLU layers -> linear head (n, out_dim)."""

    in_dim: int
    out_dim: int
    hidden: tuple[int, ...] = (40, 40)
    activation: str = "relu"

    @property
    def layer_names(self) -> tuple[str, ...]:
        return (*(f"layer_{i}" for i in range(len(self.hidden))), "head")

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        sizes = (self.in_dim, *self.hidden, self.out_dim)
        keys = jax.random.split(key, len(sizes) - 1)
        return {
            name: dense_init(k, a, b)
            for name, k, a, b in zip(self.layer_names, keys, sizes[:-1], sizes[1:], strict=True)
        }

    def features(self, params: dict, x: jax.Array) -> jax.Array:
        """The representation fed to the head."""
        act = ACTIVATIONS[self.activation]
        for name in self.layer_names[:-1]:
            x = act(dense(params[name], x))
        return x

    def apply(self, params: dict, x: jax.Array) -> jax.Array:
        return dense(params["head"], self.features(params, x))


def make_net(cfg: NetConfig, in_dim: int, out_dim: int) -> MLP:
    return MLP(in_dim=in_dim, out_dim=out_dim, hidden=cfg.hidden, activation=cfg.activation)
