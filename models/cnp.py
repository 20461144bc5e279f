"""Conditional neural processes and their meta-regularized versions (Garnelo et al. 2018; Yin et al.
2020, METHODS 4). No inner loop: the support set is encoded and averaged, and a decoder predicts.

    r_i = mean_j h([w(x_j), y_j])             deterministic encoder of support pairs, mean aggregation
    y*  ~ N(g([A r_i, w(x*)]), sd^2)          Gaussian decoder, fixed sd (0.1 in the reference); with
                                              [model] noise = "heteroscedastic" g also outputs sd(x*)
                                              (Garnelo et al.'s decoder, 0.1 + 0.9 softplus)

    CNP       w(x) = x
    MR-CNP(W) w(x) = a Bayesian layer stack x -> 100 -> 5 (Gaussian kernels, prior N(0, I)), beta * KL
    MR-CNP(A) w(x) ~ q(w | x) = N(mu(x), sigma(x)^2) of dimension 5, KL to N(0, I) on the support points
              (the reference notebook), or with bottleneck = "query" on the query inputs x* (Yin et al.
              eq. 2-3: the information from x* to y-hat* is what is limited); the other set's codes are
              sampled from the same q and not regularised

Scales: the reference sums its NLL over the 10 target points; here the NLL is a mean over points, so
its betas are divided by 10 (MR-CNP(W) 0.15 -> 0.015, MR-CNP(A) 5 -> 0.5, whose KL is also summed
over dimensions in the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Spec
from bayesmeta.nets import MLP, dense, dense_init
from bayesmeta.sites import (
    bayesian_layers,
    bottleneck,
    gaussian_weights_guide,
    gaussian_weights_kl,
    kernel_shapes,
    observe,
    param_tree,
)
from bayesmeta.tasks import TaskBatch


@dataclass(frozen=True)
class CNPParams:
    variant: str = opt("none", choices=["none", "weights", "activations"], doc="meta-regularization")
    beta: float = opt(0.0, ge=0, doc="KL weight (mean-NLL scale; see the module docstring)")
    r_dim: int = opt(10, ge=1, doc="dimension of the per-point encoding")
    z_dim: int = opt(5, ge=1, doc="dimension of the linear map of the mean encoding")
    encoder_hidden: tuple[int, ...] = opt((100, 100), ge=1)
    w_hidden: tuple[int, ...] = opt((100,), ge=1, doc="hidden widths of the x-path w(x) (MR variants)")
    w_dim: int = opt(5, ge=1, doc="dimension of w(x) (MR variants)")
    rho_init: float = opt(-3.0, doc="initial posterior scale parameter of MR-CNP(W)")
    bottleneck: str = opt(
        "support",
        choices=["support", "query"],
        doc="MR-CNP(A): the codes that carry the KL: the support inputs' (reference notebook) or the query "
        "inputs' (Yin et al. eq. 2)",
    )
    loc_sd: float = opt(0.1, gt=0)


def build_cnp(cfg: ModelConfig, p: CNPParams, x_dim: int, y_dim: int, name: str) -> Method:
    lik = make_likelihood(cfg)
    w_out = x_dim if p.variant == "none" else p.w_dim
    xpath = MLP(x_dim, (2 if p.variant == "activations" else 1) * p.w_dim, p.w_hidden, cfg.net.activation)
    encoder = MLP(w_out + y_dim, p.r_dim, p.encoder_hidden, cfg.net.activation)
    decoder = MLP(p.z_dim + w_out, lik.out_dim(y_dim), cfg.net.hidden, cfg.net.activation)

    def init(key: jax.Array) -> dict:
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "encoder": encoder.init(k1),
            "to_z": dense_init(k2, p.r_dim, p.z_dim),
            "decoder": decoder.init(k3),
        }

    def predict(theta: dict, w_s: jax.Array, y_s: jax.Array, w_q: jax.Array) -> jax.Array:
        r = jnp.mean(encoder.apply(theta["encoder"], jnp.concatenate([w_s, y_s], -1)), axis=1)
        z = dense(theta["to_z"], r)[:, None, :]
        z = jnp.broadcast_to(z, (*w_q.shape[:2], p.z_dim))
        return decoder.apply(theta["decoder"], jnp.concatenate([z, w_q], -1))

    def xpath_stats(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = xpath.apply(params, x)
        return out[..., : p.w_dim], jax.nn.softplus(out[..., p.w_dim :])

    def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
        theta = param_tree("theta", init)
        x_s, x_q = batch.x_support, batch.x_query
        if p.variant == "weights":
            params = bayesian_layers("xpath", xpath, p.beta)
            w_s, w_q = xpath.apply(params, x_s), xpath.apply(params, x_q)
        elif p.variant == "activations":
            xp = param_tree("xpath", xpath.init)
            kept, free = (x_s, x_q) if p.bottleneck == "support" else (x_q, x_s)
            w_kept = bottleneck("w", jnp.zeros((*kept.shape[:2], p.w_dim)), None, p.beta)
            mu, sd = xpath_stats(xp, free)  # the other set's codes: sampled, not regularised
            w_free = mu + sd * jax.random.normal(numpyro.prng_key(), mu.shape)
            w_s, w_q = (w_kept, w_free) if p.bottleneck == "support" else (w_free, w_kept)
        else:
            w_s, w_q = x_s, x_q
        observe(lik, predict(theta, w_s, batch.y_support, w_q), batch.y_query)

    def guide(batch: TaskBatch, inner_steps: int | None = None) -> None:
        if p.variant == "weights":
            gaussian_weights_guide("xpath", kernel_shapes(xpath), p.beta, p.loc_sd, p.rho_init)
        elif p.variant == "activations":
            kept = batch.x_support if p.bottleneck == "support" else batch.x_query
            bottleneck("w", *xpath_stats(param_tree("xpath", xpath.init), kept), p.beta)

    if p.variant == "weights":
        return Method(
            name,
            model,
            guide,
            elbo="meanfield",
            global_latents=("xpath",),
            kl=lambda params: gaussian_weights_kl(params, "xpath"),
            kl_weight=p.beta,
            likelihood=lik,
            inner_loop=False,
        )
    return Method(name, model, guide, elbo="meanfield", likelihood=lik, inner_loop=False)


def _spec(name: str, **defaults: object) -> type:
    """A registry entry for one variant: its Params default to the reference settings."""
    from dataclasses import field, fields, make_dataclass

    params = make_dataclass(
        f"{name}_params",
        [
            (f.name, f.type, field(default=defaults.get(f.name, f.default), metadata=f.metadata))
            for f in fields(CNPParams)
        ],
        frozen=True,
    )

    def build(cfg: ModelConfig, p: object, x_dim: int, y_dim: int, context: Context) -> Method:
        return build_cnp(cfg, p, x_dim, y_dim, name)

    def check(cfg: ModelConfig, p: object) -> str | None:
        if p.variant != defaults["variant"]:
            return f"model.params.variant: {name} fixes it to {defaults['variant']!r}"
        if p.bottleneck != "support" and p.variant != "activations":
            return f"model.params.bottleneck: only mr_cnp_a has a bottleneck; {name} takes 'support' only"
        if p.variant != "none" and p.beta <= 0:
            return f"model.params.beta: expected a number > 0 for {name}, got {p.beta}"
        return None

    return type(name, (Spec,), {"Params": params, "build": staticmethod(build), "check": staticmethod(check)})


CNP = _spec("cnp", variant="none")
MRCNPW = _spec("mr_cnp_w", variant="weights", beta=0.015)
MRCNPA = _spec("mr_cnp_a", variant="activations", beta=0.5)
