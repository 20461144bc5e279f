"""MAML and first-order MAML as empirical Bayes (Finn et al. 2017; Grant et al. 2018, METHODS 1-2).

    theta                                   meta-parameters: numpyro.param (MAP with a N(0, s^2) prior)
    phi_i = GD_s(theta; D_i)                truncated gradient descent = implicit posterior mode
    y*_i ~ p(y | f(x*_i; phi_i))            observed in training, sampled for prediction

With no latent variables the ELBO is the scaled log marginal likelihood sum_i log p(D*_i | phi_i), and
SVI with the empty guide maximises it over theta: type-II maximum likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro
from numpyro.distributions import constraints

from bayesmeta.adapt import inner_loop
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import Gaussian, make_likelihood
from bayesmeta.method import Method, Probe, no_guide
from bayesmeta.nets import make_net
from bayesmeta.sites import observe, param_tree, tree_from_params
from bayesmeta.tasks import TaskBatch


def gaussian_prior_logpdf(theta: dict, sd: float) -> jax.Array:
    """log N(theta; 0, sd^2 I) without its constant."""
    return -0.5 * sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(theta)) / sd**2


def build_maml(
    cfg: ModelConfig, x_dim: int, y_dim: int, *, first_order: bool, learn_noise: bool = False
) -> Method:
    net = make_net(cfg.net, x_dim, y_dim)
    lik = make_likelihood(cfg)

    def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return lik.loss(net.apply(params, x), y)

    def model(batch: TaskBatch, inner_steps: int | None = None) -> None:
        theta = param_tree("theta", net.init)
        if cfg.prior_scale > 0:
            # The prior enters like one batch of data: an L2 penalty of 1 / (2 s^2 T Q).
            n = batch.x_query.shape[0] * batch.x_query.shape[1]
            numpyro.factor("theta_prior", gaussian_prior_logpdf(theta, cfg.prior_scale) / n)
        phi, _ = inner_loop(
            cfg, task_loss, theta, batch.x_support, batch.y_support, inner_steps, first_order=first_order
        )
        out_lik = lik
        if learn_noise:  # "MAML with output noise": the observation sd is a learned meta-parameter
            sd = numpyro.param("noise_sd", jnp.asarray(cfg.noise_sd), constraint=constraints.positive)
            out_lik = Gaussian(sd)
        observe(out_lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

    def probe(params: dict) -> Probe:
        def adapt(th: dict, x: jax.Array, y: jax.Array) -> dict:
            return inner_loop(cfg, task_loss, th, x, y, first_order=first_order)[0]

        return Probe(tree_from_params("theta", net.init, params), adapt, task_loss, task_loss, net.features)

    name = "fomaml" if first_order else "maml"
    return Method(name=name, model=model, guide=no_guide, probe=probe)


@dataclass(frozen=True)
class MAML:
    """Second-order MAML, or first-order when [model] first_order = true."""

    @dataclass(frozen=True)
    class Params:
        learn_noise: bool = opt(False, doc="learn the Gaussian observation sd (MAML with output noise)")

    first_order: ClassVar[bool | None] = None

    @classmethod
    def build(
        cls, cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: object = None
    ) -> Method:
        fo = cfg.first_order if cls.first_order is None else cls.first_order
        return build_maml(cfg, x_dim, y_dim, first_order=fo, learn_noise=params.learn_noise)

    @staticmethod
    def check(cfg: ModelConfig, params: Params) -> str | None:
        if params.learn_noise and cfg.likelihood != "gaussian":
            return "model.params.learn_noise: needs model.likelihood = 'gaussian'"
        return None


class FOMAML(MAML):
    """First-order MAML: the inner gradients are treated as constants."""

    first_order = True
