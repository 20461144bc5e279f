"""The task batch and the protocol every task family follows."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax


class TaskBatch(NamedTuple):
    """Support and query sets of T tasks: x (T, n, x_dim), y (T, n, y_dim); `info` holds task latents."""

    x_support: jax.Array
    y_support: jax.Array
    x_query: jax.Array
    y_query: jax.Array | None
    info: dict[str, jax.Array]

    @property
    def n_tasks(self) -> int:
        return self.x_support.shape[0]

    def take(self, idx: Any) -> TaskBatch:
        """Select tasks along the leading axis."""
        return jax.tree.map(lambda a: a[idx], self)


class Family(Protocol):
    """What the engine needs from a task family; `grid` and `truth` serve 1-D regression plots."""

    x_dim: int
    y_dim: int

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch: ...

    def grid(self, info: dict[str, jax.Array], n: int) -> jax.Array: ...

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array: ...
