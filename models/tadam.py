"""TADAM, task-dependent adaptive metric (Oreshkin, Rodriguez & Lacoste 2018; METHODS 9): prototypical
networks with a learned metric scale and task-conditioned (FiLM) features.

    c_k = mean of f(x; Gamma) over the support images of class k       (prototypes, as ProtoNet)
    p(y* = k | x*, D) = softmax_k(-alpha ||f(x*; Gamma) - c_k||^2)      metric scaling: alpha > 0 learned
    c_bar = (1/N) sum_k c_k^0, c_k^0 the prototypes of the unconditioned features f(x; identity)
    Gamma = {(gamma_l, beta_l)}_l = TEN(c_bar), for every block (or hidden layer) l of the net:
        gamma_l = 1 + gamma0_l h_l(c_bar),   beta_l = beta0_l b_l(c_bar)
    h_l, b_l: Linear(d, w_l) -> ReLU -> Linear(w_l, w_l); gamma0_l, beta0_l learned scalars
    training adds film_l2 * sum_l (gamma0_l^2 + beta0_l^2) to the loss (a numpyro.factor)

FiLM sits after each block's batch norm, before its ReLU (bayesmeta.nets). The scalar post-multipliers
start at 0, so TADAM starts as ProtoNet with distances scaled by alpha_init; with them at 0 (or film =
false) and alpha = 1 it is ProtoNet exactly. Predicting gamma as a deviation from 1 and penalising the
post-multipliers follow the paper's description of its task embedding network (TEN); the size of its
networks and the penalty's weight are ours (the source text is not in the seeds), as is leaving out
the paper's auxiliary co-training on a global classification task. Options switch each part off:
`metric_scale = false` fixes alpha at alpha_init, `film = false` drops the TEN. No inner loop:
`inner_steps` is accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro
from numpyro.distributions import constraints

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, no_guide
from bayesmeta.models.baselines import Classifier
from bayesmeta.models.protonet import prototype_logits
from bayesmeta.nets import Film, dense, dense_init, embedding, make_net, task_vmap
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def task_representation(z_s: jax.Array, y_s: jax.Array, ways: int) -> jax.Array:
    """c_bar = (1/N) sum_k c_k, the mean of the class prototypes of support embeddings z_s (n, d)."""
    onehot = jax.nn.one_hot(y_s, ways)
    protos = (onehot.T @ z_s) / jnp.maximum(onehot.sum(0), 1.0)[:, None]
    return jnp.mean(protos, 0)


def ten_init(key: jax.Array, d: int, widths: tuple[int, ...]) -> dict:
    """The TEN's per-layer networks h_l, b_l (Glorot weights, zero biases) and post-multipliers
    gamma0, beta0 (L,), started at 0 so that every FiLM layer starts as the identity."""
    keys = jax.random.split(key, 4 * len(widths)).reshape(len(widths), 4, -1)
    nets = {
        f"film_{i}": {
            part: {"layer_0": dense_init(k[2 * j], d, w), "head": dense_init(k[2 * j + 1], w, w)}
            for j, part in enumerate(("gamma", "beta"))
        }
        for i, (w, k) in enumerate(zip(widths, keys, strict=True))
    }
    zeros = jnp.zeros((len(widths),), jnp.float32)
    return {**nets, "scale": {"gamma0": zeros, "beta0": zeros}}


def ten(p: dict, c_bar: jax.Array) -> Film:
    """Gamma = ((1 + gamma0_l h_l(c_bar), beta0_l b_l(c_bar)))_l, the FiLM pairs of one task."""
    mlp = lambda q: dense(q["head"], jax.nn.relu(dense(q["layer_0"], c_bar)))  # noqa: E731
    n = len(p) - 1
    g0, b0 = p["scale"]["gamma0"], p["scale"]["beta0"]
    return tuple(
        (1.0 + g0[i] * mlp(p[f"film_{i}"]["gamma"]), b0[i] * mlp(p[f"film_{i}"]["beta"])) for i in range(n)
    )


def film_penalty(p: dict) -> jax.Array:
    """sum_l gamma0_l^2 + beta0_l^2, the L2 penalty on the TEN's post-multipliers."""
    return jnp.sum(jnp.square(p["scale"]["gamma0"])) + jnp.sum(jnp.square(p["scale"]["beta0"]))


class TADAM(Classifier):
    """ProtoNet with a learned metric scale alpha and task-conditioned FiLM features (module docstring)."""

    @dataclass(frozen=True)
    class Params:
        metric_scale: bool = opt(
            True, doc="learn alpha (a positive numpyro.param); false: alpha = alpha_init"
        )
        alpha_init: float = opt(1.0, gt=0, doc="alpha's start (or its fixed value)")
        film: bool = opt(True, doc="task conditioning: FiLM on every block from the TEN of c_bar")
        film_l2: float = opt(0.01, ge=0, doc="weight of the L2 penalty on the TEN's gamma0, beta0")

    @staticmethod
    def build(cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        p = params

        init, d = embedding(net, x_dim)

        def logits(theta: dict, tenp: dict | None, x_s: jax.Array, y_s: jax.Array, x_q: jax.Array):
            """-||f(x*; Gamma) - c_k||^2 for one task, Gamma = TEN(c_bar) (or none without film)."""
            gamma = None
            if tenp is not None:
                gamma = ten(tenp, task_representation(net.features(theta, x_s), y_s, y_dim))
            z_s, z_q = net.features(theta, x_s, gamma), net.features(theta, x_q, gamma)
            return prototype_logits(z_s, y_s, z_q, y_dim)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            tenp = param_tree("ten", lambda key: ten_init(key, d, net.film_widths)) if p.film else None
            alpha = (
                numpyro.param("alpha", jnp.asarray(p.alpha_init), constraint=constraints.positive)
                if p.metric_scale
                else p.alpha_init
            )
            out = task_vmap(
                net,
                lambda th, xs, ys, xq: logits(th, tenp, xs, ys, xq),
                theta,
                batch.x_support,
                batch.y_support,
                batch.x_query,
            )
            if training and tenp is not None and p.film_l2 > 0:
                numpyro.factor("film_l2", -p.film_l2 * film_penalty(tenp))
            observe(lik, alpha * out, batch.y_query)

        return Method(name="tadam", model=model, guide=no_guide, likelihood=lik, inner_loop=False)
