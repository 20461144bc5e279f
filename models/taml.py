"""TAML, task-agnostic meta-learning (Jamal & Qi 2019, METHODS 9): MAML with a regularizer that keeps
the initial model from favouring some tasks, as empirical Bayes.

    phi_i = GD_s(theta; D_i)                                    MAML's inner loop
    inequality:  R = I(l_1, ..., l_T),   l_i = L(theta; D_i)     the initial model's support losses
    entropy:     R = mean_i [-H(f_theta(x*_i)) + H(f_phi_i(x*_i))]   (classification; the second term
                 only with `entropy_reduction`)
    objective    mean query NLL after adaptation + lambda R       (numpyro.factor, training only)

The inequality measures I of the paper's inequality-minimization TAML, over the T losses of a
meta-batch with mean mu:
    theil                 1/T sum_i (l_i/mu) ln(l_i/mu)
    generalized_entropy   1/(T a (a - 1)) sum_i [(l_i/mu)^a - 1]          (a = `alpha`)
    atkinson              1 - (1/mu) (1/T sum_i l_i^(1-e))^(1/(1-e))     (e = `epsilon`)
    gini                  sum_i sum_j |l_i - l_j| / (2 T^2 mu)
    variance_of_logs      1/T sum_i (ln l_i - mean_j ln l_j)^2
The entropy-maximization TAML maximizes the entropy of the initial model's class probabilities on each
task's query inputs (unbiased before adaptation) and, with `entropy_reduction`, minimizes it after
adaptation (confident after); H is the mean over query points of -sum_k p_k ln p_k. The initial losses
l_i are on the support set (what the inner loop starts from). lambda = 0 is MAML
(tests/test_taml.py). The paper's lambda and which of its measures it reports per table were not
recovered here; the defaults are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro
from jax.scipy.special import xlogy

from bayesmeta.adapt import InnerLoop
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Spec, no_guide
from bayesmeta.nets import make_net
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch

MEASURES = ["theil", "generalized_entropy", "atkinson", "gini", "variance_of_logs", "entropy"]


def theil(losses: jax.Array) -> jax.Array:
    """Theil index 1/T sum_i r_i ln r_i, r_i = l_i / mean(l) (0 when all losses are equal)."""
    r = losses / jnp.mean(losses)
    return jnp.mean(xlogy(r, r))


def generalized_entropy(losses: jax.Array, alpha: float) -> jax.Array:
    """GE(alpha) = 1/(T alpha (alpha - 1)) sum_i (r_i^alpha - 1), r_i = l_i / mean(l); GE(2) is half the
    squared coefficient of variation."""
    r = losses / jnp.mean(losses)
    return jnp.mean(r**alpha - 1.0) / (alpha * (alpha - 1.0))


def atkinson(losses: jax.Array, epsilon: float) -> jax.Array:
    """Atkinson index 1 - (mean_i l_i^(1 - e))^(1 / (1 - e)) / mean(l)."""
    return 1.0 - jnp.mean(losses ** (1.0 - epsilon)) ** (1.0 / (1.0 - epsilon)) / jnp.mean(losses)


def gini(losses: jax.Array) -> jax.Array:
    """Gini coefficient sum_ij |l_i - l_j| / (2 T^2 mean(l))."""
    return jnp.mean(jnp.abs(losses[:, None] - losses[None, :])) / (2.0 * jnp.mean(losses))


def variance_of_logs(losses: jax.Array) -> jax.Array:
    """Variance of the logarithms 1/T sum_i (ln l_i - mean_j ln l_j)^2."""
    return jnp.var(jnp.log(losses))


def inequality(losses: jax.Array, measure: str, alpha: float = 2.0, epsilon: float = 0.5) -> jax.Array:
    """The named inequality measure of the losses (T,)."""
    if measure == "theil":
        return theil(losses)
    if measure == "generalized_entropy":
        return generalized_entropy(losses, alpha)
    if measure == "atkinson":
        return atkinson(losses, epsilon)
    if measure == "gini":
        return gini(losses)
    if measure == "variance_of_logs":
        return variance_of_logs(losses)
    raise ValueError(f"taml: unknown inequality measure {measure!r}")


def entropy(logits: jax.Array) -> jax.Array:
    """Mean over points (and tasks) of the entropy -sum_k p_k ln p_k of softmax(logits) (..., K)."""
    logp = jax.nn.log_softmax(logits)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))


@dataclass(frozen=True)
class TAML(Spec):
    """MAML plus lambda times an inequality (or entropy) regularizer on the initial model."""

    @dataclass(frozen=True)
    class Params:
        lam: float = opt(0.1, ge=0, doc="lambda, the weight of the regularizer (0: MAML)")
        measure: str = opt(
            "theil",
            choices=MEASURES,
            doc="inequality of the initial model's support losses across the meta-batch, or 'entropy' "
            "(classification): the initial model's predictive entropy on the query inputs, maximized",
        )
        alpha: float = opt(2.0, doc="alpha of generalized_entropy (not 0 or 1)")
        epsilon: float = opt(0.5, ge=0, doc="epsilon of atkinson (not 1)")
        entropy_reduction: bool = opt(
            True, doc="entropy: also minimize the entropy after adaptation (the paper's entropy reduction)"
        )

    @staticmethod
    def check(cfg: ModelConfig, params: Params) -> str | None:
        if params.measure == "entropy" and cfg.likelihood != "categorical":
            return (
                "model.params.measure: 'entropy' needs class probabilities (model.likelihood = 'categorical')"
            )
        if params.measure == "generalized_entropy" and params.alpha in (0.0, 1.0):
            return "model.params.alpha: generalized entropy needs alpha other than 0 and 1"
        if params.measure == "atkinson" and params.epsilon == 1.0:
            return "model.params.epsilon: the Atkinson index needs epsilon other than 1"
        return None

    @staticmethod
    def build(
        cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context | None = None
    ) -> Method:
        lik = make_likelihood(cfg)
        net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
        inner = InnerLoop.from_config(cfg)
        p = params

        def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
            return lik.loss(net.apply(params, x), y)

        def regularizer(theta: dict, phi: dict, batch: TaskBatch) -> jax.Array:
            if p.measure == "entropy":
                before = entropy(jax.vmap(net.apply, (None, 0))(theta, batch.x_query))
                after = entropy(jax.vmap(net.apply)(phi, batch.x_query)) if p.entropy_reduction else 0.0
                return -before + after
            losses = jax.vmap(task_loss, (None, 0, 0))(theta, batch.x_support, batch.y_support)
            return inequality(losses, p.measure, p.alpha, p.epsilon)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", net.init)
            phi, _ = inner(task_loss, theta, batch.x_support, batch.y_support, inner_steps)
            if training:
                reg = regularizer(theta, phi, batch)
                numpyro.deterministic("taml_regularizer", reg)
                numpyro.factor("taml", -p.lam * reg)
            observe(lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

        return Method(name="taml", model=model, guide=no_guide, likelihood=lik)
