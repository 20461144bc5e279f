"""Siamese networks for one-shot recognition (Koch, Zemel & Salakhutdinov 2015; METHODS 9): a
verification network trained on same/different pairs, used one-shot by the nearest match. Survey 002,
lines 736-750:

    p(same | x1, x2) = sigmoid(w . |f(x1) - f(x2)| + b)       twin embeddings f (shared weights),
                                                            the weighted L1 distance, a logistic unit
    training: y(x1, x2) = 1 for the same character, else 0;  binary cross-entropy over the pairs

f is the configured net's features (its head replaced by the unit (w, b)). The pairs come from the
engine's episodes, no second data path: every (query, support) pair of an N-way episode, labelled
same when their labels agree. `pairs = "balanced"` weights the same and the different pairs equally
(an N-way episode holds N - 1 different pairs for each same pair; Koch et al. trained on balanced
pairs), `"all"` weights every pair alike. Training observes the pair labels (site "pairs") and not
the query labels; Koch et al.'s L2 penalty on the weights is left out.

Prediction (query labels withheld, or training = false) is the one-shot rule, nearest match:

    logit_k(x*) = max_{i: y_i = k} (w . |f(x*) - f(x_i)| + b)        the best log-odds of class k
    p(y* = k | x*, D) = softmax_k(logit_k)                           so argmax_k = the nearest match

a categorical over the N classes (observed through the likelihood, so accuracy, ECE and reliability
are the engine's). With one shot this is the softmax of the log-odds over the support items. No inner
loop: `inner_steps` is accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import scale

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, no_guide
from bayesmeta.models.baselines import Classifier
from bayesmeta.nets import dense_init, embedding, make_net, task_vmap
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def pair_logits(unit: dict, z_a: jax.Array, z_b: jax.Array) -> jax.Array:
    """logit p(same | a_i, b_j) = w . |z_a_i - z_b_j| + b for embeddings z_a (m, d), z_b (n, d): (m, n)."""
    return jnp.abs(z_a[:, None, :] - z_b[None, :, :]) @ unit["w"][:, 0] + unit["b"][0]


def pair_labels(y_q: jax.Array, y_s: jax.Array) -> jax.Array:
    """1.0 where query j and support item i share a label, else 0.0: (n_q, n_s)."""
    return (y_q[:, None] == y_s[None, :]).astype(jnp.float32)


def pair_weights(same: jax.Array, balanced: bool) -> jax.Array:
    """Weights summing to 1 over one task's pairs (n_q, n_s): half on the same pairs and half on the
    different ones (balanced), or uniform."""
    if not balanced:
        return jnp.full(same.shape, 1.0 / same.size)
    n_same = jnp.maximum(jnp.sum(same), 1.0)
    n_diff = jnp.maximum(same.size - jnp.sum(same), 1.0)
    return jnp.where(same > 0, 0.5 / n_same, 0.5 / n_diff)


def nearest_match_logits(logit: jax.Array, y_s: jax.Array, ways: int) -> jax.Array:
    """max over the support items of class k of the pair log-odds (n_q, n_s): (n_q, ways)."""
    same = jax.nn.one_hot(y_s, ways, dtype=bool)
    return jnp.max(jnp.where(same[None], logit[:, :, None], -jnp.inf), axis=1)


class Siamese(Classifier):
    """A convolutional (or MLP) siamese verification network used one-shot by the nearest match."""

    @dataclass(frozen=True)
    class Params:
        pairs: str = opt(
            "balanced", choices=["balanced", "all"], doc="weights of same vs different pairs in training"
        )

    @staticmethod
    def build(cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        balanced = params.pairs == "balanced"

        body, d = embedding(net, x_dim)

        def init(key: jax.Array) -> dict:
            kb, ku = jax.random.split(key)
            return {**body(kb), "head": dense_init(ku, d, 1)}

        def logits(theta: dict, x_s: jax.Array, x_q: jax.Array) -> jax.Array:
            """Pair log-odds of one task's queries against its support items (n_q, n_s)."""
            return pair_logits(theta["head"], net.features(theta, x_q), net.features(theta, x_s))

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            logit = task_vmap(net, logits, theta, batch.x_support, batch.x_query)
            if training and batch.y_query is not None:
                same = jax.vmap(pair_labels)(batch.y_query, batch.y_support)
                w = jax.vmap(lambda s: pair_weights(s, balanced))(same) / same.shape[0]
                with (
                    numpyro.plate("tasks", same.shape[0], dim=-3),
                    numpyro.plate("queries", same.shape[1], dim=-2),
                    numpyro.plate("support", same.shape[2], dim=-1),
                    scale(scale=w),
                ):
                    numpyro.sample("pairs", dist.Bernoulli(logits=logit), obs=same)
                return
            out = jax.vmap(nearest_match_logits, (0, 0, None))(logit, batch.y_support, y_dim)
            observe(lik, out, batch.y_query)

        return Method(name="siamese", model=model, guide=no_guide, likelihood=lik, inner_loop=False)
