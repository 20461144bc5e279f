"""NumPyro plumbing shared by all models: pytree parameters and the mean-scaled likelihood."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpyro
from numpyro.handlers import scale


def site_names(prefix: str, tree: Any) -> list[str]:
    """Site names `prefix.layer.leaf` for the leaves of a nested dict, in tree order."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [".".join([prefix, *(str(k.key) for k in path)]) for path, _ in paths]


def param_tree(prefix: str, init: Callable[[jax.Array], Any]) -> Any:
    """Register every leaf of the pytree init(key) as a `numpyro.param` site; return the tree.

    The initialiser runs lazily, once, only when a site is not substituted (SVI.init, seeded runs).
    """
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(shapes)
    cache: dict[str, list] = {}

    def lazy(i: int) -> Callable[[jax.Array], jax.Array]:
        def leaf(key: jax.Array) -> jax.Array:
            if "leaves" not in cache:
                cache["leaves"] = jax.tree.leaves(init(key))
            return cache["leaves"][i]

        return leaf

    values = [numpyro.param(name, lazy(i)) for i, name in enumerate(site_names(prefix, shapes))]
    assert len(values) == len(leaves)
    return jax.tree.unflatten(treedef, values)


def observe(likelihood: Any, out: jax.Array, y: jax.Array | None, name: str = "y") -> None:
    """y (T, n, ...) ~ likelihood(out) under plates (tasks, points), scaled to a mean over both.

    The mean makes the ELBO a per-point loss, as in the papers, so their KL weights beta carry over.
    """
    n_tasks, n_points = out.shape[:2]
    numpyro.deterministic("f", likelihood.mean(out))
    with (
        numpyro.plate("tasks", n_tasks, dim=-2),
        numpyro.plate("points", n_points, dim=-1),
        scale(scale=1.0 / (n_tasks * n_points)),
    ):
        numpyro.sample(name, likelihood.dist(out), obs=y)
