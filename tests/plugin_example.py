"""A user's own task family and method, as a plugin package would define them (test-only).

Neither is registered: configs name them by import path,

    task.family = "tests.plugin_example:Quadratic"
    model.method = "tests.plugin_example:PolyRidge"

and they use only bayesmeta's public extension API (bayesmeta.tasks, bayesmeta.method, bayesmeta.sites,
bayesmeta.likelihoods, bayesmeta.config.opt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpyro

from bayesmeta.config import opt
from bayesmeta.likelihoods import Gaussian
from bayesmeta.method import Context, Method, Spec, no_guide
from bayesmeta.sites import observe
from bayesmeta.tasks import TaskBatch


@dataclass(frozen=True)
class Quadratic:
    """y = a x^2 + b x + c + N(0, noise_sd^2), with a, b, c ~ U(coef) and x ~ U(x_range)."""

    @dataclass(frozen=True)
    class Params:
        coef: tuple[float, ...] = opt((-1.0, 1.0), doc="range of a, b and c")
        x_range: tuple[float, ...] = opt((-2.0, 2.0), doc="input range")
        noise_sd: float = opt(0.05, ge=0, doc="observation noise")

    params: Params
    shots: int
    queries: int
    x_dim: int = 1
    y_dim: int = 1

    def check(self) -> str | None:
        lo, hi = self.params.x_range
        return None if lo < hi else f"params.x_range: expected low < high, got {[lo, hi]}"

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        a, b, c = (info[k][:, None, None] for k in "abc")
        return a * x**2 + b * x + c

    def grid(self, info: dict[str, jax.Array], n: int) -> jax.Array:
        t = info["a"].shape[0]
        return jnp.broadcast_to(jnp.linspace(*self.params.x_range, n)[None, :, None], (t, n, 1))

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        kc, kx, ke = jax.random.split(key, 3)
        coef = jax.random.uniform(kc, (3, n_tasks), minval=self.params.coef[0], maxval=self.params.coef[1])
        info = dict(zip("abc", coef, strict=True))
        n = self.shots + self.queries
        x = jax.random.uniform(
            kx, (n_tasks, n, 1), minval=self.params.x_range[0], maxval=self.params.x_range[1]
        )
        y = self.truth(info, x) + self.params.noise_sd * jax.random.normal(ke, x.shape)
        s = self.shots
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:], info)


def features(x: jax.Array, degree: int) -> jax.Array:
    """Polynomial features [1, x, ..., x^degree] of (n, 1) inputs: (n, degree + 1)."""
    return x ** jnp.arange(degree + 1)


class PolyRidge(Spec):
    """Empirical Bayes ridge regression on polynomial features: a meta-learned prior mean m of the
    weights, and per task the posterior mean w = m + (F'F + lam I)^-1 F'(y - F m) (closed form)."""

    @dataclass(frozen=True)
    class Params:
        degree: int = opt(2, ge=0, le=8, doc="polynomial degree")
        ridge: float = opt(0.1, gt=0, doc="ridge penalty lam (prior precision over noise precision)")

    @staticmethod
    def build(cfg: Any, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        lik = Gaussian(cfg.noise_sd)
        k = p.degree + 1

        def adapt(m: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
            f = features(x, p.degree)
            return m + jnp.linalg.solve(f.T @ f + p.ridge * jnp.eye(k), f.T @ (y[:, 0] - f @ m))

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            m = numpyro.param("prior_mean", jnp.zeros(k))
            w = jax.vmap(adapt, (None, 0, 0))(m, batch.x_support, batch.y_support)
            out = jax.vmap(lambda wi, x: features(x, p.degree) @ wi)(w, batch.x_query)[..., None]
            observe(lik, out, batch.y_query)

        return Method("poly_ridge", model, no_guide, likelihood=lik)
