"""Matching networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016; METHODS 9) as a NumPyro
model. Survey 002, lines 430-439 and 470-479:

    a(x*, x_i) = exp(s c(f(x*), g(x_i))) / sum_j exp(s c(f(x*), g(x_j)))     attention over the support set
    p(y* = k | x*, S) = sum_i a(x*, x_i) onehot(y_i)_k                         (the paper's y^ = sum_i a y_i)

with c the cosine similarity and f = g = the configured net's features (its head is not used). The
paper's softmax has no temperature (s = 1, the default); `scale` sets s, `learn_scale` learns it.
The logits handed to the categorical likelihood are log p(y* = k), so its softmax is exactly p.

Full-context embeddings (`fce`; survey 002, lines 443-453 and 455-468), with f' = g' = the features:

    g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)           a bidirectional LSTM over the support set (its order)
    f(x*, S) = h_K, with for k = 1..K:                 an LSTM with read-attention over g(S)
        h^_k, c_k = LSTM(f'(x*), [h_{k-1}, r_{k-1}], c_{k-1}),   h_k = h^_k + f'(x*)
        r_{k-1} = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i)
    starting from h_0 = f'(x*), c_0 = 0 (the paper leaves the start open).

theta (and the LSTMs) are point estimates (numpyro.param); the ELBO with the empty guide is the mean
query NLL, the episode loss of the paper. No inner loop: `inner_steps` is accepted and ignored.
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
from bayesmeta.nets import embedding, lstm_cell, lstm_init, make_net, task_vmap
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch

EPS = 1e-8


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """c(a_q, b_i) = a_q . b_i / (|a_q| |b_i|) for a (q, d), b (n, d): (q, n); a zero vector has c = 0."""
    unit = lambda v: v * jax.lax.rsqrt(jnp.sum(jnp.square(v), -1, keepdims=True) + EPS)  # noqa: E731
    return unit(a) @ unit(b).T


def attention_logits(sim: jax.Array, y_s: jax.Array, ways: int, scale: jax.Array) -> jax.Array:
    """log p(y* = k) = log sum_{i: y_i = k} softmax_i(s sim_i) for similarities sim (q, n) to the support
    items labelled y_s (n,): (q, ways); exactly the log of the attention-weighted label sum."""
    e = scale * sim
    same = jax.nn.one_hot(y_s, ways, dtype=bool)  # (n, ways)
    per_class = jax.nn.logsumexp(jnp.where(same[None], e[:, :, None], -jnp.inf), axis=1)
    return per_class - jax.nn.logsumexp(e, axis=1, keepdims=True)


def fce_init(key: jax.Array, d: int) -> dict:
    """The full-context LSTMs for embeddings of width d: forward and backward over the support set, and
    the query's attention LSTM (input f'(x*), state [h, r] of width 2 d)."""
    kf, kb, ka = jax.random.split(key, 3)
    return {"fwd": lstm_init(kf, d, d, d), "bwd": lstm_init(kb, d, d, d), "att": lstm_init(ka, d, 2 * d, d)}


def support_context(p: dict, g: jax.Array) -> jax.Array:
    """g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i) for one support set's features g' (n, d) in its order."""

    def run(cell: dict, seq: jax.Array) -> jax.Array:
        zero = jnp.zeros(seq.shape[-1:], seq.dtype)

        def step(carry: tuple, x: jax.Array) -> tuple:
            h, c = lstm_cell(cell, x, *carry)
            return (h, c), h

        return jax.lax.scan(step, (zero, zero), seq)[1]

    return run(p["fwd"], g) + run(p["bwd"], g[::-1])[::-1] + g


def query_context(p: dict, f: jax.Array, g: jax.Array, steps: int) -> jax.Array:
    """f(x*, S) = attLSTM(f'(x*), g(S), K) for query features f' (q, d) and context embeddings g (n, d)."""

    def step(carry: tuple, _: None) -> tuple:
        h, c = carry
        r = jax.nn.softmax(h @ g.T, axis=-1) @ g  # read r_{k-1} with h_{k-1}
        h_hat, c = lstm_cell(p["att"], f, jnp.concatenate([h, r], -1), c)
        return (h_hat + f, c), None

    return jax.lax.scan(step, (f, jnp.zeros_like(f)), None, length=steps)[0][0]


class MatchingNetworks(Classifier):
    """Matching networks on the configured net's features (conv4 with downsample = "maxpool" is the
    paper's embedding); cosine attention over the support set, optionally with full-context embeddings."""

    @dataclass(frozen=True)
    class Params:
        scale: float = opt(1.0, gt=0, doc="s in softmax_i(s cos(f(x*), g(x_i))); 1 is the paper's")
        learn_scale: bool = opt(False, doc="learn s (a positive numpyro.param started at scale)")
        fce: bool = opt(False, doc="full-context embeddings: bidirectional LSTM g, attention LSTM f")
        fce_steps: int = opt(5, ge=1, doc="K, the unrolling steps of the attention LSTM (fce)")

    @staticmethod
    def build(cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        p = params

        init, d = embedding(net, x_dim)

        def logits(theta: dict, fce: dict | None, x_s: jax.Array, y_s: jax.Array, x_q: jax.Array, s):
            """log p(y* | x*, S) for one task (batch norm per set, as ProtoNet's)."""
            g, f = net.features(theta, x_s), net.features(theta, x_q)
            if fce is not None:
                g = support_context(fce, g)
                f = query_context(fce, f, g, p.fce_steps)
            return attention_logits(cosine(f, g), y_s, y_dim, s)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            theta = param_tree("theta", init)
            fce = param_tree("fce", lambda key: fce_init(key, d)) if p.fce else None
            s = (
                numpyro.param("scale", jnp.asarray(p.scale), constraint=constraints.positive)
                if p.learn_scale
                else p.scale
            )
            out = task_vmap(
                net,
                lambda th, xs, ys, xq: logits(th, fce, xs, ys, xq, s),
                theta,
                batch.x_support,
                batch.y_support,
                batch.x_query,
            )
            observe(lik, out, batch.y_query)

        return Method(name="matching", model=model, guide=no_guide, likelihood=lik, inner_loop=False)
