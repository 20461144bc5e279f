"""MT-Net (Lee & Choi 2018, METHODS 9): a meta-learned transform after each layer and learned masks
choosing which weights the inner loop updates, as empirical Bayes.

    h_l = act((h_{l-1} W_l + b_l) T_l)         T_l (width x width): meta-learned, started at I, not adapted
    m_lj ~ Bernoulli(sigmoid(zeta_lj))          one mask per unit j of layer l (and task), zeta meta-learned
    phi_i = theta - sum_t alpha m (.) grad L(phi_t, D_i)   only the W_l, b_l of units with m_lj = 1 move
    y*_i ~ p(y | f(x*_i; phi_i, T))

theta = (W, b), T and zeta are numpyro.param sites (prefixes `theta`, `transform`, `mask_logit`); the
ELBO with the empty guide is the query log-likelihood, as for MAML. With T = I and every m = 1 the
model is MAML (tests/test_mtnet.py checks loss and gradient).

Masks, as the reference code does them (github.com/yoonholee/MT-net, maml.py with share_M): one
logit per output unit of each layer, the head included, shared by that unit's incoming weights and
bias; a binary mask drawn per task from a two-class Gumbel-softmax over (zeta, 0) at temperature
`temperature`, hard in the forward pass with the relaxed sample's gradient (straight-through); the
same mask serves every inner step of the task. Here the draw is a logistic sample, the same
distribution as the difference of the two Gumbel draws, and the keys come from the model's PRNG
stream (seeded under SVI and Predictive). At prediction masks are drawn likewise (`test_masks =
"sample"`, as the reference) or set to their mode 1[zeta > 0] (`"mode"`). The masked update is the
inner loop's step size per entry: alpha m_lj for W_l's column j and b_lj (InnerLoop with task_lr).
The reference transforms after the bias, (h W + b) T, without a bias after T; so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpyro
from jax import lax

from bayesmeta.adapt import InnerLoop, split
from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, Requires, Spec, no_guide
from bayesmeta.nets import ACTIVATIONS, MLP, dense, make_net
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def transformed_apply(net: MLP, params: dict, transform: dict | None, x: jax.Array) -> jax.Array:
    """The MLP with T after every layer: h_l = act((h W_l + b_l) T_l), the head without act (one task)."""
    act = ACTIVATIONS[net.activation]
    h = x
    for name in net.layer_names:
        h = dense(params[name], h)
        if transform is not None:
            h = h @ transform[name]
        if name != "head":
            h = act(h)
    return h


def relaxed_masks(logits: dict, key: jax.Array, n_tasks: int, temperature: float) -> dict:
    """Per task and unit, m = hard + soft - stop_gradient(soft): hard = 1[zeta + l > 0], soft =
    sigmoid((zeta + l) / tau), l ~ Logistic(0, 1) (the two-class Gumbel-softmax of the reference,
    straight-through); (T, width) per layer."""
    keys = jax.random.split(key, len(logits))
    out = {}
    for k, (name, zeta) in zip(keys, sorted(logits.items()), strict=True):
        noise = jax.random.logistic(k, (n_tasks, *zeta.shape), zeta.dtype)
        z = zeta + noise
        soft = jax.nn.sigmoid(z / temperature)
        out[name] = lax.stop_gradient((z > 0).astype(soft.dtype) - soft) + soft
    return out


def mask_rates(masks: dict, fast: dict, alpha: float) -> dict:
    """Inner step sizes with a task axis from unit masks (T, width): alpha m_j for every weight into unit
    j and its bias, as (T, 1, *leaf shape) rates (one learned-rate step reused at every step)."""

    def rate(layer: str, leaf: str, p: jax.Array) -> jax.Array:
        m = masks[layer]  # (T, width); the unit is the last axis of w (in, out) and of b (out,)
        return alpha * jnp.broadcast_to(
            m.reshape(m.shape[0], 1, *[1] * (p.ndim - 1), -1), (m.shape[0], 1, *p.shape)
        )

    return {
        layer: {leaf: rate(layer, leaf, p) for leaf, p in leaves.items()} for layer, leaves in fast.items()
    }


@dataclass(frozen=True)
class MTNet(Spec):
    """MT-Net: per-layer transforms T (meta-learned) and per-unit update masks (learned Bernoulli)."""

    @dataclass(frozen=True)
    class Params:
        transform: bool = opt(True, doc="a meta-learned T after each layer (false: no T, an M-net)")
        masks: bool = opt(True, doc="learned per-unit update masks (false: every weight adapts, a T-net)")
        temperature: float = opt(
            1.0, gt=0, doc="Gumbel-softmax temperature of the relaxed masks (1 in the reference)"
        )
        logit_init: float = opt(0.0, doc="initial mask logit zeta (sigmoid(0) = 1/2 as in the reference)")
        test_masks: str = opt(
            "sample",
            choices=["sample", "mode"],
            doc="masks at prediction: drawn (the reference) or 1[zeta > 0]",
        )

    requires: ClassVar[Requires] = {"net.kind": ("mlp",)}  # T and the masks act on an MLP's layers

    @staticmethod
    def build(
        cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context | None = None
    ) -> Method:
        lik = make_likelihood(cfg)
        net = make_net(cfg.net, x_dim, lik.out_dim(y_dim))
        inner = InnerLoop.from_config(cfg)
        p = params
        widths = {name: (*net.hidden, net.out_dim)[i] for i, name in enumerate(net.layer_names)}

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", net.init)
            transform = (
                param_tree("transform", lambda _: {k: jnp.eye(w) for k, w in widths.items()})
                if p.transform
                else None
            )

            def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
                return lik.loss(transformed_apply(net, params, transform, x), y)

            fast = split(theta, cfg.adapt)[0]
            if p.masks:
                logits = param_tree(
                    "mask_logit", lambda _: {k: jnp.full((widths[k],), p.logit_init) for k in fast}
                )
                n_tasks = batch.x_support.shape[0]
                if training or p.test_masks == "sample":
                    key = numpyro.prng_key()
                    if key is None:
                        raise ValueError("mtnet: the model must run under numpyro.handlers.seed (mask draws)")
                    masks = relaxed_masks(logits, key, n_tasks, p.temperature)
                else:
                    masks = {
                        k: jnp.broadcast_to((z > 0).astype(z.dtype), (n_tasks, *z.shape))
                        for k, z in logits.items()
                    }
                lr = mask_rates(masks, fast, cfg.inner_lr)
                phi, _ = inner(
                    task_loss, theta, batch.x_support, batch.y_support, inner_steps, lr=lr, task_lr=True
                )
            else:
                phi, _ = inner(task_loss, theta, batch.x_support, batch.y_support, inner_steps)
            out = jax.vmap(lambda ph, x: transformed_apply(net, ph, transform, x))(phi, batch.x_query)
            observe(lik, out, batch.y_query)

        return Method(name="mtnet", model=model, guide=no_guide, likelihood=lik)
