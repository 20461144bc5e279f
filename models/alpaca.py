"""ALPaCA: a meta-learned conjugate prior over a linear head, with the exact posterior per task (Harrison,
Sharma & Pavone 2018, "Meta-Learning Priors for Efficient Online Bayesian Regression").

    phi(x) = [h_theta(x); 1]                        shared features: the body of model.net, and a bias
    W ~ MN(K0, Lambda0^-1, s^2 I)                   the head (d + 1, m): column c ~ N(K0_c, s^2 Lambda0^-1)
    y = W^T phi(x) + N(0, s^2 I)

Given a support set (Phi, Y) the posterior over W is conjugate and exact (Bayesian linear regression,
Bishop 2006, 3.3; the update ALPaCA uses):

    Lambda_n = Lambda0 + Phi^T Phi,   K_n = Lambda_n^-1 (Phi^T Y + Lambda0 K0),
    y* | x*, D ~ N(K_n^T phi(x*), s^2 (1 + phi(x*)^T Lambda_n^-1 phi(x*)) I).

Meta-training maximises that predictive log-likelihood of the query points, averaged over tasks and
points (`numpyro.factor`, empty guide; the SVI loss is on the scale of the other methods' mean query
NLL); theta, K0, Lambda0 = L0 L0^T (L0 lower triangular with a positive diagonal) and, with
model.noise = 'learned', s are meta-parameters. There is no approximate inference anywhere: when the
features span the true ones and the prior is learned, the predictive is the exact one (experiments/
gold_standard). At prediction (training=False) a head is drawn as the site `head_eps` ~ N(0, I),
W = K_n + s L_n^-T eps (L_n the Cholesky factor of Lambda_n), so S predictive draws are S heads.

`alpaca_mixture` (ours) puts a mixture of K such priors on the head, pi_c MN(K0_c, Lambda0_c^-1, s^2 I),
on the same features. The posterior stays exact: p(c | D) is proportional to pi_c p(D | c), each
component's evidence in closed form (log_evidence), and given c the head's posterior is the
component's conjugate update, so the predictive is the mixture sum_c p(c | D) N(y*; ...) per query
point, trained as ALPaCA is. A prediction draws the component (site `component`) and then a head. A
unimodal Gaussian prior can cover two function classes only by spreading between them; the mixture can
keep both and weigh them by how well each explains the support set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Requires, Spec, no_guide
from bayesmeta.nets import embedding, make_net
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def with_bias(h: jax.Array) -> jax.Array:
    """phi = [h; 1] for features h (..., n, d): (..., n, d + 1)."""
    return jnp.concatenate([h, jnp.ones((*h.shape[:-1], 1), h.dtype)], -1)


def prior_precision_factor(raw: jax.Array) -> jax.Array:
    """L0 = the strict lower triangle of raw plus exp(diag(raw)) on the diagonal: Lambda0 = L0 L0^T is
    positive definite for any raw (raw = 0 gives Lambda0 = I)."""
    return jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diag(raw)))


def conjugate_posterior(
    phi: jax.Array, y: jax.Array, k0: jax.Array, l0: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(K_n, L_n): the posterior mean K_n = Lambda_n^-1 (Phi^T Y + Lambda0 K0) (d + 1, m) and the
    Cholesky factor L_n of Lambda_n = Lambda0 + Phi^T Phi, for one task's support (phi (n, d + 1),
    y (n, m)) under the prior MN(K0, (L0 L0^T)^-1, s^2 I); s cancels from both, since the prior's
    covariance scales with the noise as in ALPaCA's matrix-normal prior."""
    lam0 = l0 @ l0.T
    ln = jnp.linalg.cholesky(lam0 + phi.T @ phi)
    kn = jax.scipy.linalg.cho_solve((ln, True), phi.T @ y + lam0 @ k0)
    return kn, ln


def predictive_moments(
    phi: jax.Array, kn: jax.Array, ln: jax.Array, sd: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean (n, m) and sd (n, 1) of y* at features phi (n, d + 1) under the posterior (K_n, L_n):
    N(K_n^T phi, s^2 (1 + phi^T Lambda_n^-1 phi)); the quadratic form is |L_n^-1 phi|^2."""
    v = jax.scipy.linalg.solve_triangular(ln, phi.T, lower=True)  # (d + 1, n)
    return phi @ kn, sd * jnp.sqrt(1.0 + jnp.sum(jnp.square(v), 0))[:, None]


def log_evidence(
    phi: jax.Array, y: jax.Array, k0: jax.Array, l0: jax.Array, ln: jax.Array, sd: jax.Array
) -> jax.Array:
    """log p(Y | prior) of one task's support (phi (n, d + 1), y (n, m)) under MN(K0, Lambda0^-1, s^2 I):
    each column is N(Phi k0, s^2 (I + Phi Lambda0^-1 Phi^T)); by the determinant lemma log det(I +
    Phi Lambda0^-1 Phi^T) = log det Lambda_n - log det Lambda0, and by Woodbury the quadratic form is
    |r|^2 - |L_n^-1 Phi^T r|^2 for r = y - Phi K0 (the model evidence, Bishop 2006, 3.86), with L_n the
    factor conjugate_posterior returns."""
    n, m = y.shape
    r = y - phi @ k0
    v = jax.scipy.linalg.solve_triangular(ln, phi.T @ r, lower=True)
    quad = jnp.sum(jnp.square(r)) - jnp.sum(jnp.square(v))
    logdet = 2.0 * (jnp.sum(jnp.log(jnp.diag(ln))) - jnp.sum(jnp.log(jnp.diag(l0))))
    return -0.5 * (n * m * jnp.log(2 * jnp.pi * jnp.square(sd)) + m * logdet + quad / jnp.square(sd))


def posterior_heads(kn: jax.Array, ln: jax.Array, sd: jax.Array, eps: jax.Array) -> jax.Array:
    """Draws W = K_n + s L_n^-T eps (d + 1, m) of the posterior MN(K_n, Lambda_n^-1, s^2 I), for
    standard-normal eps of the same shape: Cov of L_n^-T eps is (L_n L_n^T)^-1 = Lambda_n^-1."""
    return kn + sd * jax.scipy.linalg.solve_triangular(ln.T, eps, lower=False)


@dataclass(frozen=True)
class ALPaCA(Spec):
    """ALPaCA (Harrison et al. 2018): a meta-learned Gaussian prior over a linear head on learned
    features, conditioned on the support set in closed form; trained on the exact query predictive."""

    @dataclass(frozen=True)
    class Params:
        prior_scale: float = opt(
            1.0,
            gt=0,
            doc="initial prior sd of the head's weights in units of the noise sd (Lambda0 = I / scale^2)",
        )

    # a conjugate regression head, whose posterior needs one noise sd for all points
    requires: ClassVar[Requires] = {"likelihood": ("gaussian",), "noise": ("fixed", "learned")}

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context | None = None) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        body_init, d = embedding(net, x_dim)

        def init(key: jax.Array) -> dict:
            body = body_init(key)
            raw = jnp.diag(jnp.full((d + 1,), -jnp.log(p.prior_scale), jnp.float32))
            return {"body": body, "prior_mean": jnp.zeros((d + 1, y_dim), jnp.float32), "prior_factor": raw}

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            phi_s, phi_q = (
                with_bias(jax.vmap(lambda xi: net.features(theta["body"], xi))(x))
                for x in (batch.x_support, batch.x_query)
            )
            l0 = prior_precision_factor(theta["prior_factor"])
            kn, ln = jax.vmap(conjugate_posterior, (0, 0, None, None))(
                phi_s, batch.y_support, theta["prior_mean"], l0
            )
            out_lik = lik.in_model()  # the learned noise sd, if any, is registered once, here
            sd = out_lik.sd
            y = batch.y_query
            if training and y is not None:
                mean, scale = jax.vmap(predictive_moments, (0, 0, 0, None))(phi_q, kn, ln, sd)
                numpyro.deterministic("f", mean)
                logp = jnp.sum(dist.Normal(mean, scale).log_prob(y), -1)  # (T, n)
                numpyro.factor("alpaca", jnp.mean(logp))
                return
            with numpyro.plate("head_tasks", batch.n_tasks):
                eps = numpyro.sample("head_eps", dist.Normal(0.0, 1.0).expand(kn.shape[1:]).to_event(2))
            heads = jax.vmap(posterior_heads, (0, 0, None, 0))(kn, ln, sd, eps)
            observe(out_lik, jnp.einsum("tnk,tkm->tnm", phi_q, heads), y)

        return Method("alpaca", model, no_guide, likelihood=lik, inner_loop=False)


@dataclass(frozen=True)
class MixtureALPaCA(Spec):
    """ALPaCA with a mixture prior: K conjugate priors over the head on shared features, and the exact
    posterior over which one generated the task (its evidence); multimodal task families."""

    @dataclass(frozen=True)
    class Params:
        components: int = opt(2, ge=1, doc="mixture components of the head's prior (1 is ALPaCA)")
        prior_scale: float = opt(
            1.0,
            gt=0,
            doc="initial prior sd of the head's weights in units of the noise sd (Lambda0 = I / scale^2)",
        )

    requires: ClassVar[Requires] = ALPaCA.requires

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context | None = None) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        body_init, d = embedding(net, x_dim)
        k = p.components

        def init(key: jax.Array) -> dict:
            kb, km = jax.random.split(key)
            raw = jnp.diag(jnp.full((d + 1,), -jnp.log(p.prior_scale), jnp.float32))
            return {
                "body": body_init(kb),
                # distinct means break the components' symmetry (equal ones would get equal gradients)
                "prior_mean": p.prior_scale * jax.random.normal(km, (k, d + 1, y_dim), jnp.float32),
                "prior_factor": jnp.broadcast_to(raw, (k, d + 1, d + 1)),
                "logits": jnp.zeros((k,), jnp.float32),
            }

        def component_posterior(phi_s, y_s, k0, raw, sd):
            l0 = prior_precision_factor(raw)
            kn, ln = conjugate_posterior(phi_s, y_s, k0, l0)
            return kn, ln, log_evidence(phi_s, y_s, k0, l0, ln, sd)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            phi_s, phi_q = (
                with_bias(jax.vmap(lambda xi: net.features(theta["body"], xi))(x))
                for x in (batch.x_support, batch.x_query)
            )
            out_lik = lik.in_model()
            sd = out_lik.sd
            per_task = jax.vmap(component_posterior, (None, None, 0, 0, None))  # over components
            kn, ln, logev = jax.vmap(per_task, (0, 0, None, None, None))(  # over tasks: (T, K, ...)
                phi_s, batch.y_support, theta["prior_mean"], theta["prior_factor"], sd
            )
            post = jax.nn.log_softmax(jax.nn.log_softmax(theta["logits"]) + logev, -1)  # log p(c | D) (T, K)
            y = batch.y_query
            if training and y is not None:
                moments = jax.vmap(predictive_moments, (None, 0, 0, None))  # over components
                mean, scale = jax.vmap(moments, (0, 0, 0, None))(phi_q, kn, ln, sd)  # (T, K, n, m)
                numpyro.deterministic("f", jnp.sum(jnp.exp(post)[..., None, None] * mean, 1))
                logp = jnp.sum(dist.Normal(mean, scale).log_prob(y[:, None]), -1)  # (T, K, n)
                numpyro.factor("alpaca", jnp.mean(jax.nn.logsumexp(post[..., None] + logp, 1)))
                return
            with numpyro.plate("head_tasks", batch.n_tasks):
                c = numpyro.sample("component", dist.Categorical(logits=post))
                eps = numpyro.sample("head_eps", dist.Normal(0.0, 1.0).expand(kn.shape[2:]).to_event(2))
            pick = lambda a: jnp.take_along_axis(a, c.reshape(-1, *(1,) * (a.ndim - 1)), 1)[:, 0]  # noqa: E731
            heads = jax.vmap(posterior_heads, (0, 0, None, 0))(pick(kn), pick(ln), sd, eps)
            observe(out_lik, jnp.einsum("tnk,tkm->tnm", phi_q, heads), y)

        return Method("alpaca_mixture", model, no_guide, likelihood=lik, inner_loop=False)
