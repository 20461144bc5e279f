"""LLAMA: MAML as empirical Bayes with a Laplace approximation (Grant et al. 2018, METHODS 1).

    -log p(D*_i | theta) ~= -log p(D*_i | phi_i) + (tau/2) |phi_i - theta|^2 + eta/2 log det H_i

phi_i is the inner loop's output and H_i = tau I + J_i^T J_i / sd^2 the Gauss-Newton curvature of the
support NLL at phi_i (J_i: Jacobian of the support outputs), sd the likelihood's ([model] noise: fixed or
learned). In general H_i = tau I + J_i^T diag(w^2) J_i with w the square root of the likelihood's Fisher
in the outputs (Gaussian.fisher_sqrt: 1/sd; for the heteroscedastic head (f, r), 1/sd(x) and
sqrt(2) sd'(r) / sd(x)), so the model whitens J's rows by w and the functions below take sd = 1. A
categorical likelihood keeps w = 1/model.noise_sd (a stand-in, not the softmax's Fisher). Curvatures, all PSD:

  ggn         the whole network, exactly: J has K rows, so by the matrix determinant lemma
              log det H = P log tau + log det(I_K + J J^T / (tau sd^2)), and samples of N(0, H^-1) come
              from the eigendecomposition of the K x K matrix J J^T.
  last_layer  the same for the head only (the exact Hessian there: outputs are linear in the head).
  diagonal    diag(H), the usual scalable approximation.

Predictions sample phi ~ N(phi_i, H_i^-1) (`numpyro.sample("laplace_eps", N(0, I))`, transformed).
The Laplace and prior terms enter as a factor with the likelihood's scale 1/(T Q).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree

from bayesmeta.adapt import InnerLoop, split
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import Gaussian, make_likelihood
from bayesmeta.method import Context, Method, Spec, no_guide
from bayesmeta.nets import make_net
from bayesmeta.sites import observe, param_tree, record_draw_check
from bayesmeta.tasks import TaskBatch


def jacobian(apply: object, flat: jax.Array, x: jax.Array) -> jax.Array:
    """J = d f(x; params) / d params, (K * y_dim, P), for flattened params."""
    return jax.jacrev(lambda v: apply(v, x).ravel())(flat)


def laplace_logdet(jac: jax.Array, sd: float, tau: float, curvature: str) -> jax.Array:
    """log det(tau I + J^T J / sd^2), or of its diagonal."""
    p = jac.shape[1]
    if curvature == "diagonal":
        return jnp.sum(jnp.log(tau + jnp.sum(jnp.square(jac), 0) / sd**2))
    small = jnp.eye(jac.shape[0]) + jac @ jac.T / (tau * sd**2)
    return p * jnp.log(tau) + jnp.linalg.slogdet(small)[1]


def laplace_sample(jac: jax.Array, sd: float, tau: float, curvature: str, eps: jax.Array) -> jax.Array:
    """H^{-1/2} eps for H = tau I + J^T J / sd^2, exactly through J J^T's eigenvectors (or diag(H)^{-1/2})."""
    if curvature == "diagonal":
        return eps / jnp.sqrt(tau + jnp.sum(jnp.square(jac), 0) / sd**2)
    u = jac.T / (sd * jnp.sqrt(tau))  # H = tau (I + U U^T)
    lam, v = jnp.linalg.eigh(u.T @ u)
    lam = jnp.clip(lam, 0.0)
    # (I + U U^T)^{-1/2} = I + U V diag(((1 + lam)^{-1/2} - 1) / lam) V^T U^T   (-> -1/2 as lam -> 0)
    coef = jnp.where(lam > 1e-12, (jax.lax.rsqrt(1 + lam) - 1) / jnp.where(lam > 1e-12, lam, 1.0), -0.5)
    return (eps + u @ (v @ (coef * (v.T @ (u.T @ eps))))) / jnp.sqrt(tau)


@dataclass(frozen=True)
class LLAMA(Spec):
    @dataclass(frozen=True)
    class Params:
        curvature: str = opt("ggn", choices=["ggn", "last_layer", "diagonal"])
        eta: float = opt(1.0, ge=0, doc="weight of the 1/2 log det H term")
        prior_precision: float = opt(
            1.0, gt=0, doc="tau: precision of the implicit Gaussian prior N(theta, 1/tau)"
        )
        sample_posterior: bool = opt(True, doc="predict with phi ~ N(phi_hat, H^-1) (else the mode)")

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        lik = make_likelihood(cfg)
        net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
        inner = InnerLoop.from_config(cfg)
        tau = p.prior_precision
        part = "head" if p.curvature == "last_layer" else "all"

        def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
            return lik.loss(net.apply(params, x), y)

        def whitening(out_lik: object, out: jax.Array) -> jax.Array:
            """Per support output, the factor w of the curvature J^T diag(w^2) J: the likelihood's
            Fisher square root (1/sd for a Gaussian), or 1/model.noise_sd for a categorical one."""
            if isinstance(out_lik, Gaussian):
                return out_lik.fisher_sqrt(out).ravel()
            return jnp.full(out.size, 1.0 / cfg.noise_sd)

        def laplace(
            out_lik: object, phi: dict, theta: dict, x_s: jax.Array, key_eps: jax.Array | None
        ) -> tuple:
            """(log det H, tau |phi - theta|^2 over the Laplace block, phi with a posterior draw)."""
            block, rest = split(phi, part)
            flat, unravel = ravel_pytree(block)
            jac = jacobian(lambda v, x: net.apply({**rest, **unravel(v)}, x), flat, x_s)
            jac = whitening(out_lik, net.apply(phi, x_s))[:, None] * jac  # whitened: sd = 1 below
            logdet = laplace_logdet(jac, 1.0, tau, p.curvature)
            prior = tau * jnp.sum(jnp.square(flat - ravel_pytree(split(theta, part)[0])[0]))
            if key_eps is None:
                return logdet, prior, phi
            return (
                logdet,
                prior,
                {**rest, **unravel(flat + laplace_sample(jac, 1.0, tau, p.curvature, key_eps))},
            )

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", net.init)
            out_lik = lik.in_model()  # a learned noise sd enters the curvature too
            phi, _ = inner(task_loss, theta, batch.x_support, batch.y_support, inner_steps)
            n_tasks, n_query = batch.x_query.shape[:2]
            eps = None
            if not training and p.sample_posterior:
                size = ravel_pytree(split(theta, part)[0])[0].size
                with numpyro.plate("laplace_tasks", n_tasks):
                    eps = numpyro.sample("laplace_eps", dist.Normal(0.0, 1.0).expand([size]).to_event(1))
            logdet, prior, phi = jax.vmap(
                partial(laplace, out_lik), in_axes=(0, None, 0, 0 if eps is not None else None)
            )(phi, theta, batch.x_support, eps)
            if not training:  # did this draw (the mode plus Laplace noise) lower the support loss?
                losses = jax.vmap(task_loss, in_axes=(None, 0, 0))
                record_draw_check(
                    losses(theta, batch.x_support, batch.y_support),
                    jax.vmap(task_loss)(phi, batch.x_support, batch.y_support),
                )
            numpyro.deterministic("laplace_logdet", logdet)
            numpyro.factor(
                "laplace", -(0.5 * p.eta * jnp.sum(logdet) + 0.5 * jnp.sum(prior)) / (n_tasks * n_query)
            )
            observe(out_lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

        return Method("llama", model, no_guide, likelihood=lik, draw_check=True)
