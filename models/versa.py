"""VERSA: amortized inference over a task-specific linear head, trained by ML-PIP (Gordon et al. 2019,
"Meta-Learning Probabilistic Inference for Prediction"; METHODS 9).

    h = h_theta(x)                                  shared features: the body of model.net (MLP, Conv4)
    q(w_c | D) = N(mu_c, diag(sd_c^2)),  w_c = [weights (d); bias]   amortized head, one row per output:
      classification  (mu_c, sd_c) = A(mean of h(x_i) over the support examples of class c)
                      each class from its own examples: permuting the classes permutes the rows of q
                      (equivariance), the order of examples within a class does not matter
      regression      (mu, sd) = B(mean_i e([h(x_i), y_i])), the rows c = the output dimensions
    out_c(x*) = h(x*)^T w_c[:d] + w_c[d]             logits (Categorical) or means (Gaussian)

Training maximises the ML-PIP objective, the predictive log-likelihood of the query set under L head
draws w_l ~ q (option head_samples; the paper's Monte Carlo ML-PIP objective):

    L(theta) = mean over tasks and query points of  log (1/L) sum_l p(y* | x*, w_l)

(logsumexp over draws, per query point; not an ELBO: there is no KL and no prior on w). It enters as
`numpyro.factor("ml_pip", L)` with the empty guide, so the SVI loss is -L, on the scale of the other
methods' mean query NLL. At prediction (training=False, y_query withheld) a head is drawn as the site
`head_eps` ~ N(0, I), w = mu + sd * eps, so S predictive draws are S heads; "f" is the head's output
(the Gaussian mean, or the class probabilities). The weights are sampled directly (not the paper's
local reparameterization of the logits), so one draw is one function over all query points.
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
from bayesmeta.nets import MLP, embedding, make_net, task_vmap
from bayesmeta.sites import SD_FLOOR, observe, param_tree
from bayesmeta.tasks import TaskBatch


def head_outputs(w: jax.Array, h: jax.Array) -> jax.Array:
    """out[..., n, c] = h[n] . w[..., c, :d] + w[..., c, d] for rows w (..., m, d + 1), features h (n, d)."""
    return jnp.einsum("nd,...cd->...nc", h, w[..., :-1]) + w[..., None, :, -1]


def ml_pip(logp: jax.Array) -> jax.Array:
    """log (1/L) sum_l exp(logp_l) over the leading axis of L draws (ML-PIP's estimator, Gordon et al.)."""
    return jax.scipy.special.logsumexp(logp, axis=0) - jnp.log(logp.shape[0])


def class_means(h: jax.Array, y: jax.Array, ways: int) -> jax.Array:
    """(ways, d): the mean of the features h (n, d) of each class's support examples (0 if it has none)."""
    onehot = jax.nn.one_hot(y.reshape(-1), ways)
    return (onehot.T @ h) / jnp.maximum(onehot.sum(0), 1.0)[:, None]


def gaussian_expected_loglik(
    h: jax.Array, y: jax.Array, loc: jax.Array, sd: jax.Array, noise_sd: float
) -> jax.Array:
    """E_q[log N(y; h^T w + b, s^2)] = log N(y; h^T mu + mu_b, s^2) - (sum_k h_k^2 sd_k^2 + sd_b^2)/(2 s^2),
    per point and output (n, m), for q = N(loc, sd^2) over the rows (m, d + 1): the squared residual of
    the mean head plus the trace term."""
    mean = head_outputs(loc, h)
    var = head_outputs(jnp.square(sd).at[..., -1].set(0.0), jnp.square(h)) + jnp.square(sd[..., -1])
    return dist.Normal(mean, noise_sd).log_prob(y) - var / (2 * noise_sd**2)


def gaussian_predictive_loglik(
    h: jax.Array, y: jax.Array, loc: jax.Array, sd: jax.Array, noise_sd: float
) -> jax.Array:
    """log E_q[N(y; h^T w + b, s^2)] = log N(y; h^T mu + mu_b, s^2 + sum_k h_k^2 sd_k^2 + sd_b^2), (n, m):
    the exact predictive of a linear-Gaussian head, the L -> infinity limit of ML-PIP's estimator."""
    mean = head_outputs(loc, h)
    var = head_outputs(jnp.square(sd).at[..., -1].set(0.0), jnp.square(h)) + jnp.square(sd[..., -1])
    return dist.Normal(mean, jnp.sqrt(noise_sd**2 + var)).log_prob(y)


@dataclass(frozen=True)
class VERSA(Spec):
    """VERSA / ML-PIP (Gordon et al. 2019): an amortization network maps the support set to a Gaussian
    over a linear head on shared features; trained on the query predictive log-likelihood."""

    @dataclass(frozen=True)
    class Params:
        head_samples: int = opt(10, ge=1, doc="L, head draws per task in the ML-PIP objective")
        amort_hidden: tuple[int, ...] = opt(
            (64,), ge=1, doc="hidden widths of the amortization networks (and of regression's embedding)"
        )
        r_dim: int = opt(64, ge=1, doc="regression: dimension of the pooled embedding of [h(x), y]")
        rho_init: float = opt(
            -3.0, doc="offset of the head's sd: sd = eps + softplus(network output + rho_init)"
        )

    # the head is a Bayesian linear map to the mean, under one noise sd
    requires: ClassVar[Requires] = {"noise": ("fixed", "learned")}

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        classify = cfg.likelihood == "categorical"
        body_init, d = embedding(net, x_dim)
        act = cfg.net.activation
        amort = MLP(d, 2 * (d + 1), p.amort_hidden, act)  # per class: class mean -> (mu_c, rho_c)
        embed = MLP(d + y_dim, p.r_dim, p.amort_hidden, act)  # regression: [h(x), y] -> e
        pooled = MLP(p.r_dim, 2 * y_dim * (d + 1), p.amort_hidden, act)  # mean e -> (mu, rho) rows

        def init(key: jax.Array) -> dict:
            k1, k2, k3 = jax.random.split(key, 3)
            body = body_init(k1)
            if classify:
                return {"body": body, "amort": amort.init(k2)}
            return {"body": body, "embed": embed.init(k2), "amort": pooled.init(k3)}

        def features(theta: dict, x: jax.Array) -> jax.Array:
            """h(x) for T sets (T, n, d), one set at a time (Conv4's batch norm is per set)."""
            return task_vmap(net, net.features, theta["body"], x)

        def posterior(theta: dict, h_s: jax.Array, y_s: jax.Array) -> tuple[jax.Array, jax.Array]:
            """q's (loc, sd), each (T, m, d + 1), from the support features and labels."""
            if classify:
                s = jax.vmap(class_means, (0, 0, None))(h_s, y_s, y_dim)
                out = amort.apply(theta["amort"], s)  # (T, ways, 2 (d + 1)), each class on its own
            else:
                e = embed.apply(theta["embed"], jnp.concatenate([h_s, y_s], -1))
                out = pooled.apply(theta["amort"], jnp.mean(e, 1)).reshape(-1, y_dim, 2 * (d + 1))
            loc, rho = out[..., : d + 1], out[..., d + 1 :]
            return loc, SD_FLOOR + jax.nn.softplus(rho + p.rho_init)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            h_s, h_q = features(theta, batch.x_support), features(theta, batch.x_query)
            loc, sd = posterior(theta, h_s, batch.y_support)
            numpyro.deterministic("q_loc", loc)
            numpyro.deterministic("q_sd", sd)
            y = batch.y_query
            if training and y is not None:
                key = numpyro.prng_key()
                if key is None:
                    raise ValueError("versa: the model must run under numpyro.handlers.seed")
                eps = jax.random.normal(key, (p.head_samples, *loc.shape))
                out = jax.vmap(head_outputs, (1, 0), 1)(loc + sd * eps, h_q)  # (L, T, n, m)
                out_lik = lik.in_model()  # a learned noise sd is registered here (observe does it below)
                logp = out_lik.dist(out).log_prob(y)  # (L, T, n)
                numpyro.deterministic("f", jnp.mean(out_lik.mean(out), 0))
                numpyro.factor("ml_pip", jnp.mean(ml_pip(logp)))
                return
            with numpyro.plate("head_tasks", batch.n_tasks):
                eps = numpyro.sample("head_eps", dist.Normal(0.0, 1.0).expand(loc.shape[1:]).to_event(2))
            observe(lik, jax.vmap(head_outputs)(loc + sd * eps, h_q), y)

        return Method("versa", model, no_guide, likelihood=lik, inner_loop=False)
