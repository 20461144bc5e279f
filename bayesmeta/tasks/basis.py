"""A gold-standard family: Bayesian linear regression on fixed basis functions.

    w_i ~ N(mu0, diag(s0^2)),   y = phi(x)^T w_i + N(0, sd^2),   phi(x) = (1, x, sin x, cos x)

Given a support set the exact posterior predictive is Gaussian in closed form (Bishop 2006, 3.3):
Sigma_n = (Sigma0^-1 + Phi^T Phi / sd^2)^-1, mu_n = Sigma_n (Sigma0^-1 mu0 + Phi^T y / sd^2),
y* ~ N(phi*^T mu_n, phi*^T Sigma_n phi* + sd^2). A meta-learner that learned the prior exactly from
infinitely many tasks could at best match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from bayesmeta.config import opt
from bayesmeta.tasks.base import Regression1D, TaskBatch, regression_batch


def features(x: jax.Array) -> jax.Array:
    """phi(x) = (1, x, sin x, cos x) for x (..., 1)."""
    return jnp.concatenate([jnp.ones_like(x), x, jnp.sin(x), jnp.cos(x)], -1)


@dataclass(frozen=True)
class BasisRegression(Regression1D):
    @dataclass(frozen=True)
    class Params:
        prior_mean: tuple[float, ...] = opt((0.0, 0.3, 1.0, -0.5))
        prior_sd: tuple[float, ...] = opt((1.0, 0.3, 1.0, 1.0), ge=0)
        x_range: tuple[float, ...] = opt((-5.0, 5.0))
        noise_sd: float = opt(0.3, gt=0)

    ranges: ClassVar[tuple[str, ...]] = ("x_range",)

    def check(self) -> str | None:
        p = self.params
        if len(p.prior_mean) != 4 or len(p.prior_sd) != 4:
            return "params.prior_mean: expected 4 numbers (and prior_sd 4), one per basis function"
        return super().check()

    def truth(self, info: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        return jnp.einsum("tnk,tk->tn", features(x), info["w"])[..., None]

    def prior_weights(self, key: jax.Array, n: int) -> jax.Array:
        """n draws of w ~ N(mu0, diag(s0^2)): (n, 4)."""
        p = self.params
        return jnp.asarray(p.prior_mean) + jnp.asarray(p.prior_sd) * jax.random.normal(key, (n, 4))

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p = self.params
        kw, kx, ke = jax.random.split(key, 3)
        info = {"w": self.prior_weights(kw, n_tasks)}
        return regression_batch(kx, ke, self.truth, info, self.shots, self.queries, p.x_range, p.noise_sd)

    def prior_functions(self, key: jax.Array, n: int, x: jax.Array) -> jax.Array:
        """n functions phi(x)^T w of the prior at the inputs x (m, 1): (n, m, 1)."""
        return jnp.einsum("mk,nk->nm", features(x), self.prior_weights(key, n))[..., None]

    def observation_sd(self) -> float:
        """The sd of the Gaussian observation noise."""
        return self.params.noise_sd

    def exact_predictive(self, batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
        """Mean and sd (T, Q, 1) of the exact posterior predictive of y at the query inputs."""
        p = self.params
        prior_prec = jnp.diag(1.0 / jnp.square(jnp.asarray(p.prior_sd)))
        phi_s, phi_q = features(batch.x_support), features(batch.x_query)
        prec = prior_prec + jnp.einsum("tnk,tnl->tkl", phi_s, phi_s) / p.noise_sd**2
        cov = jnp.linalg.inv(prec)
        rhs = (
            prior_prec @ jnp.asarray(p.prior_mean)
            + jnp.einsum("tnk,tn->tk", phi_s, batch.y_support[..., 0]) / p.noise_sd**2
        )
        mean_w = jnp.einsum("tkl,tl->tk", cov, rhs)
        mean = jnp.einsum("tnk,tk->tn", phi_q, mean_w)
        var = jnp.einsum("tnk,tkl,tnl->tn", phi_q, cov, phi_q) + p.noise_sd**2
        return mean[..., None], jnp.sqrt(var)[..., None]
