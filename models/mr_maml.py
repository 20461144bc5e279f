"""Meta-regularized MAML against memorization (Yin et al. 2020, METHODS 4): MR-MAML(W) and MR-MAML(A).

The network is an encoder that is not adapted followed by a head that is (the "head" subtree):

  MR(W)  encoder kernels W ~ q(W) = N(mu, softplus(rho)^2), prior N(0, I), KL weighted by beta;
         minimises E_q[mean query NLL of the adapted head] + beta KL(q || p)       (their eq. 4)
  MR(A)  per-point bottleneck z* ~ q(z* | x*) = N(mu(x*), sigma(x*)^2), prior N(0, I);
         minimises E_q[mean query NLL] + beta * mean over query points of KL        (their eq. 3)

With the default Gaussian likelihood (sd sqrt(1/2)) the NLL is the MSE + const, so the reference's
beta = 5e-5 for MR(W) carries over unchanged. The reference MR(A) averages its KL over the 5 latent
dimensions, so its beta = 5 is beta = 1 here, where the KL is summed over dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpyro

from bayesmeta.adapt import InnerLoop
from bayesmeta.bounds import implied_beta
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Probe, Spec
from bayesmeta.nets import MLP, Conv4, make_net, task_vmap
from bayesmeta.sites import (
    bayesian_layers,
    bottleneck,
    gaussian_weights_guide,
    gaussian_weights_kl,
    kernel_shapes,
    observe,
    param_tree,
    posterior_mean_layers,
    tree_from_params,
)
from bayesmeta.tasks import TaskBatch


def _adapted_head(
    cfg: ModelConfig,
    lik: Any,
    head_net: MLP,
    head: dict,
    z_s: jax.Array,
    y_s: jax.Array,
    inner_steps: int | None,
) -> dict:
    """phi_i: the head after the inner loop on the encoded support set (the encoder is not adapted)."""

    def loss(p: dict, z: jax.Array, y: jax.Array) -> jax.Array:
        return lik.loss(head_net.apply(p, z), y)

    return InnerLoop.from_config(cfg, adapt="all")(loss, head, z_s, y_s, inner_steps)[0]


@dataclass(frozen=True)
class ConvEncoder:
    """The conv blocks of a Conv4 as an encoder of task batches: x (T, n, d) -> (T, n, filters), batch
    norm with each task's own set statistics."""

    conv: Conv4

    def init(self, key: jax.Array) -> dict:
        return {k: v for k, v in self.conv.init(key).items() if k != "head"}

    def apply(self, params: dict, x: jax.Array) -> jax.Array:
        return task_vmap(self.conv, self.apply_set, params, x)

    def apply_set(self, params: dict, x: jax.Array) -> jax.Array:
        """One task's set x (n, d) -> (n, filters), batch norm with the set's statistics."""
        return self.conv.features(params, x)


def _networks(cfg: ModelConfig, p: Any, x_dim: int, out_dim: int) -> tuple[Any, MLP]:
    """(encoder, adapted head to out_dim outputs): an MLP encoder to encoder_dim and an MLP head with
    [model.net] hidden layers, or with [model.net] kind = "conv4" the conv blocks and a linear head on
    their features."""
    if cfg.net.kind == "conv4":
        conv = make_net(cfg.net, x_dim, out_dim)
        return ConvEncoder(conv), MLP(cfg.net.filters, out_dim, ())
    enc = MLP(x_dim, p.encoder_dim, p.encoder_hidden, cfg.net.activation)
    return enc, MLP(p.encoder_dim, out_dim, cfg.net.hidden, cfg.net.activation)


@dataclass(frozen=True)
class MRMAMLW(Spec):
    """MR-MAML(W): Gaussian encoder kernels (biases deterministic), deterministic adapted head; the
    encoder is an MLP (encoder_hidden, encoder_dim) or, with a conv4 net, its conv blocks."""

    @dataclass(frozen=True)
    class Params:
        beta: float = opt(5e-5, gt=0, doc="KL weight")
        beta_from_bound: bool = opt(False, doc="use the beta implied by the PAC-Bayes bound instead")
        delta: float = opt(0.05, gt=0, le=1, doc="confidence of the bound (for beta_from_bound)")
        encoder_hidden: tuple[int, ...] = opt((100,), ge=1)
        encoder_dim: int = opt(5, ge=1, doc="width of the encoder output the head reads")
        prior_sd: float = opt(1.0, gt=0)
        loc_sd: float = opt(0.1, gt=0, doc="sd of the initial posterior means")
        rho_init: float = opt(
            -3.0,
            doc="initial posterior scale parameter, sd = softplus(rho) (0.049 at -3: a posterior that is "
            "really random; the reference's -50 starts at the 1.2e-7 floor, a point estimate, and the NME "
            "Table 1 configs set it explicitly)",
        )

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        lik = make_likelihood(cfg)
        enc, head_net = _networks(cfg, p, x_dim, lik.out_dim(y_dim))
        beta = implied_beta(context.n_tasks, context.n_query, p.delta) if p.beta_from_bound else p.beta

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            encoder = bayesian_layers("encoder", enc, beta, p.prior_sd)
            head = param_tree("head", head_net.init)
            phi = _adapted_head(
                cfg,
                lik,
                head_net,
                head,
                enc.apply(encoder, batch.x_support),
                batch.y_support,
                inner_steps,
            )
            observe(lik, jax.vmap(head_net.apply)(phi, enc.apply(encoder, batch.x_query)), batch.y_query)

        def guide(batch: TaskBatch, inner_steps: int | None = None) -> None:
            gaussian_weights_guide("encoder", kernel_shapes(enc), beta, p.loc_sd, p.rho_init)

        def probe(params: dict) -> Probe:
            """At the posterior mean of the encoder kernels; theta is the head, the part the inner
            loop adapts (the encoder is not adapted, so its gradients are not in the diagnostics)."""
            encoder = posterior_mean_layers("encoder", enc, params)
            encode_set = enc.apply_set if isinstance(enc, ConvEncoder) else enc.apply  # one task's x

            def loss(head: dict, x: jax.Array, y: jax.Array) -> jax.Array:
                return lik.loss(head_net.apply(head, encode_set(encoder, x)), y)

            def adapt(head: dict, x: jax.Array, y: jax.Array) -> dict:
                return _adapted_head(cfg, lik, head_net, head, enc.apply(encoder, x), y, None)

            def features(head: dict, x: jax.Array) -> jax.Array:
                return head_net.features(head, encode_set(encoder, x))

            return Probe(tree_from_params("head", head_net.init, params), adapt, loss, loss, features)

        return Method(
            "mr_maml_w",
            model,
            guide,
            elbo="meanfield",
            global_latents=("encoder",),
            kl=lambda params: gaussian_weights_kl(params, "encoder", p.prior_sd),
            kl_weight=beta,
            probe=probe,
            likelihood=lik,
        )


@dataclass(frozen=True)
class MRMAMLA(Spec):
    """MR-MAML(A): a stochastic bottleneck between input and head, KL on the query points."""

    @dataclass(frozen=True)
    class Params:
        beta: float = opt(1.0, gt=0, doc="KL weight (per query point, KL summed over dimensions)")
        encoder_hidden: tuple[int, ...] = opt((80,), ge=1)
        encoder_dim: int = opt(5, ge=1, doc="bottleneck dimension")
        predict_mean: bool = opt(True, doc="predict with the bottleneck mean mu(x), as the reference does")

    @staticmethod
    def build(cfg: ModelConfig, p: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        lik = make_likelihood(cfg)
        enc = MLP(x_dim, 2 * p.encoder_dim, p.encoder_hidden, cfg.net.activation)
        head_net = MLP(p.encoder_dim, lik.out_dim(y_dim), cfg.net.hidden, cfg.net.activation)

        def stats(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            """q(z | x) = N(mu, softplus(s)^2) from the encoder's two halves."""
            out = enc.apply(params, x)
            return out[..., : p.encoder_dim], jax.nn.softplus(out[..., p.encoder_dim :])

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            encoder = param_tree("encoder", enc.init)
            head = param_tree("head", head_net.init)
            mu_s, sd_s = stats(encoder, batch.x_support)
            if not training and p.predict_mean:
                z_s, z_q = mu_s, stats(encoder, batch.x_query)[0]
            else:
                # support codes are sampled by reparameterization, without a KL term (as the reference)
                z_s = mu_s + sd_s * jax.random.normal(numpyro.prng_key(), mu_s.shape)
                z_q = bottleneck("z", jnp.zeros((*batch.x_query.shape[:2], p.encoder_dim)), None, p.beta)
            phi = _adapted_head(cfg, lik, head_net, head, z_s, batch.y_support, inner_steps)
            observe(lik, jax.vmap(head_net.apply)(phi, z_q), batch.y_query)

        def guide(batch: TaskBatch, inner_steps: int | None = None) -> None:
            encoder = param_tree("encoder", enc.init)
            bottleneck("z", *stats(encoder, batch.x_query), p.beta)

        return Method(
            "mr_maml_a",
            model,
            guide,
            elbo="meanfield",
            predict_with_guide=not p.predict_mean,
            likelihood=lik,
        )
