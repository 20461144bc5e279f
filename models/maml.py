"""MAML and first-order MAML as empirical Bayes (Finn et al. 2017; Grant et al. 2018, METHODS 1-2).

    theta                                   meta-parameters: numpyro.param (MAP with a N(0, s^2) prior)
    phi_i = GD_s(theta; D_i)                truncated gradient descent = implicit posterior mode
    y*_i ~ p(y | f(x*_i; phi_i))            observed in training, sampled for prediction

With no latent variables the ELBO is the scaled log marginal likelihood sum_i log p(D*_i | phi_i), and
SVI with the empty guide maximises it over theta: type-II maximum likelihood. With [model] noise =
"learned" the observation sd is a meta-parameter too ("MAML with output noise", as for every method).

Options in [model.params] (METHODS 6-7), each off by default so the plain model is unchanged:
  learned_lr        inner step sizes as meta-parameters: per layer and step (MAML++) or per entry (Meta-SGD)
  hessian_reg       + lambda mean_i ||Hessian of L(phi_i, D_i)||_F^2 (Hutchinson), a training-time factor
  trajectory_reg    the query likelihood uses phi_hat_i, the adapted parameters pulled towards the mean
                    adaptation direction of the meta-batch (training only)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers

from bayesmeta.adapt import InnerLoop, learned_rates, split, trajectory_correction
from bayesmeta.config import ModelConfig, opt
from bayesmeta.curvature import hessian_frobenius_sq
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Method, Probe, Spec, no_guide
from bayesmeta.nets import make_net
from bayesmeta.sites import observe, param_tree, tree_from_params
from bayesmeta.tasks import TaskBatch


def gaussian_prior_logpdf(theta: dict, sd: float) -> jax.Array:
    """log N(theta; 0, sd^2 I) without its constant."""
    return -0.5 * sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(theta)) / sd**2


def inner_rates(cfg: ModelConfig, kind: str, init: float | None, theta: dict) -> dict | None:
    """The learned inner rates of `kind` over the adapted layers (None for "none": cfg.inner_lr)."""
    if kind == "none":
        return None
    init = cfg.inner_lr if init is None else init
    return learned_rates(split(theta, cfg.adapt)[0], kind, cfg.inner_steps, init)


def support_curvature(
    cfg: ModelConfig, task_loss: object, phi: dict, x: jax.Array, y: jax.Array, n_probes: int
) -> jax.Array:
    """Per task, the Hutchinson estimate of ||d^2 L(phi_i, D_i) / d phi_fast^2||_F^2 (T,), with probes
    from the model's PRNG stream (numpyro.prng_key: seeded under SVI and Predictive)."""
    key = numpyro.prng_key()
    if key is None:
        raise ValueError("model.params.hessian_reg: the model must run under numpyro.handlers.seed")

    def one(phi_i: dict, x_i: jax.Array, y_i: jax.Array, k: jax.Array) -> jax.Array:
        fast, slow = split(phi_i, cfg.adapt)
        return hessian_frobenius_sq(lambda f: task_loss({**slow, **f}, x_i, y_i), fast, k, n_probes)

    return jax.vmap(one)(phi, x, y, jax.random.split(key, x.shape[0]))


def build_maml(
    cfg: ModelConfig,
    x_dim: int,
    y_dim: int,
    *,
    first_order: bool,
    params: MAML.Params,
) -> Method:
    lik = make_likelihood(cfg)
    net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
    p = params
    inner = InnerLoop.from_config(cfg, first_order=first_order)

    def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return lik.loss(net.apply(params, x), y)

    def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
        theta = param_tree("theta", net.init)
        if cfg.prior_scale > 0:
            # The prior enters like one batch of data: an L2 penalty of 1 / (2 s^2 T Q).
            n = batch.x_query.shape[0] * batch.x_query.shape[1]
            numpyro.factor("theta_prior", gaussian_prior_logpdf(theta, cfg.prior_scale) / n)
        lr = inner_rates(cfg, p.learned_lr, p.lr_init, theta)
        phi, _ = inner(task_loss, theta, batch.x_support, batch.y_support, inner_steps, lr=lr)
        if training and p.hessian_reg > 0:
            # lambda * mean over tasks, on the scale of the likelihood's mean over query points and tasks
            fro2 = support_curvature(cfg, task_loss, phi, batch.x_support, batch.y_support, p.hessian_probes)
            numpyro.deterministic("hessian_fro2", fro2)
            numpyro.factor("hessian_reg", -p.hessian_reg * jnp.mean(fro2))
        if training and p.trajectory_reg > 0:
            fast, slow = split(phi, cfg.adapt)
            phi = {**slow, **trajectory_correction(split(theta, cfg.adapt)[0], fast, p.trajectory_reg)}
        observe(lik, jax.vmap(net.apply)(phi, batch.x_query), batch.y_query)

    def probe(params: dict) -> Probe:
        theta = tree_from_params("theta", net.init, params)
        lr = handlers.substitute(inner_rates, data=params)(cfg, p.learned_lr, p.lr_init, theta)

        def adapt(th: dict, x: jax.Array, y: jax.Array) -> dict:
            return inner(task_loss, th, x, y, lr=lr)[0]

        return Probe(theta, adapt, task_loss, task_loss, net.features)

    name = "fomaml" if first_order else "maml"
    return Method(name=name, model=model, guide=no_guide, probe=probe, likelihood=lik)


LEARNED_LR = ["none", "per_layer_step", "meta_sgd"]
LEARNED_LR_DOC = (
    "learned inner rates (numpyro.param, unconstrained): one per parameter tensor and inner step "
    "(MAML++), or one per parameter entry (Meta-SGD); test-time steps beyond model.inner_steps reuse "
    "the last step's rates"
)


def check_rates(cfg: ModelConfig, learned_lr: str) -> str | None:
    if learned_lr != "none" and cfg.inner_steps < 1:
        return f"model.params.learned_lr: {learned_lr!r} needs model.inner_steps >= 1"
    return None


@dataclass(frozen=True)
class MAML(Spec):
    """Second-order MAML, or first-order when [model] first_order = true."""

    @dataclass(frozen=True)
    class Params:
        learned_lr: str = opt("none", choices=LEARNED_LR, doc=LEARNED_LR_DOC)
        lr_init: float | None = opt(None, gt=0, doc="initial learned inner rate; default model.inner_lr")
        hessian_reg: float = opt(
            0.0, ge=0, doc="lambda of lambda * mean_i ||Hessian of the support loss at phi_i||_F^2; 0 = off"
        )
        hessian_probes: int = opt(1, ge=1, doc="Gaussian Hutchinson probes per task for hessian_reg")
        trajectory_reg: float = opt(
            0.0, ge=0, doc="gamma of the trajectory regularizer (landscape paper, Alg. 1; 0.5 there); 0 = off"
        )

    first_order: ClassVar[bool | None] = None

    @classmethod
    def build(
        cls, cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: object = None
    ) -> Method:
        fo = cfg.first_order if cls.first_order is None else cls.first_order
        return build_maml(cfg, x_dim, y_dim, first_order=fo, params=params)

    @staticmethod
    def check(cfg: ModelConfig, params: Params) -> str | None:
        return check_rates(cfg, params.learned_lr)


class FOMAML(MAML):
    """First-order MAML: the inner gradients are treated as constants."""

    first_order = True
