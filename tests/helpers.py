"""Shared by the maths tests of MAML's variants: a tiny regression problem and its ELBO."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import registry
from bayesmeta.registry import build_method, make_family

TINY = [
    "model.net.hidden=[3]",
    "model.net.activation='tanh'",
    "model.inner_steps=2",
    "model.inner_lr=0.3",
    "task.shots=4",
    "task.queries=3",
]


def tiny_setup(*overrides: str, tasks: int = 3):
    """(config, method, a batch of `tasks` sinusoid tasks, the method's initial parameters) for TINY."""
    cfg = registry.load_config(None, [*TINY, *overrides])
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    batch = fam.sample(jax.random.PRNGKey(4), tasks)
    svi = SVI(method.model, method.guide, optax.sgd(0.0), Trace_ELBO())
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(3), batch))
    return cfg, method, batch, params


@functools.cache
def jitted_elbo(method):
    return jax.jit(lambda p, b, k: Trace_ELBO().loss(k, p, method.model, method.guide, b))


def elbo(method, params, batch, key=None):
    """The Trace_ELBO loss of `method` at `params` on `batch` (key 0 unless given)."""
    return jitted_elbo(method)(params, batch, jax.random.PRNGKey(0) if key is None else key)


def random_params(init, scale: float = 0.3, seed: int = 0):
    """The parameter tree `init()` would build, its leaves filled with N(0, scale^2) numpy draws: the
    structure comes from jax.eval_shape (traced, never compiled), so a test of a network's structural
    property (causality, permutation invariance) needs no compile of its many-layer initializer."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), jax.eval_shape(init)
    )


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def fit_lowers_loss(cfg, ratio: float = 0.7):
    """Fit cfg's method on its family from seed 0; assert every loss is finite and the mean of the last
    50 steps is below `ratio` x that of the first 50. Returns the FitResult."""
    from bayesmeta.fit import fit

    fam = make_family(cfg.task)
    result = fit(build_method(cfg.model, fam.x_dim, fam.y_dim), fam, cfg.train, seed=0, progress=False)
    loss = np.asarray(result.trace.loss)
    assert np.all(np.isfinite(loss)) and loss[-50:].mean() < ratio * loss[:50].mean(), (
        loss[:50].mean(),
        loss[-50:].mean(),
    )
    return result
