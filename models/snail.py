"""SNAIL, a simple neural attentive meta-learner (Mishra, Rohaninejad, Chen & Abbeel 2018; METHODS 9) as
a NumPyro model: temporal convolutions and causal attention over the episode as a sequence.

The sequence of one query: the support items [f(x_i), onehot(y_i)] in a random order per task
(numpyro.prng_key; the engine's sampler lays them out class by class), then [f(x*), 0], so T = N K + 1;
the class scores are the output at the last step (the paper evaluates the (NK+1)-th step). f is the
configured net's features (conv4 with max pooling: the paper's Omniglot embedding). The blocks (the
paper's appendix):

    causal conv of dilation r, kernel 2:  out_t = W_0 x_{t-r} + W_1 x_t + b     (x_{t-r} = 0 for t < r)
    DenseBlock(r, D):  a = tanh(conv_f(x)) * sigmoid(conv_g(x)),  return [x, a]            (D filters)
    TCBlock(T, D):     DenseBlock(2^i, D) for i = 1 .. ceil(log2 T)
    AttentionBlock(K, V): q, k = x W_q, x W_k (key size K), v = x W_v (V),
                       read_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(K)) v_s,  return [x, read]
    Omniglot: Attention(64, 32), TC(T, 128), Attention(256, 128), TC(T, 128), Attention(512, 256),
              then a 1x1 convolution to N class scores.

`keys` and `values` give the attention blocks (a TC block of `filters` between consecutive ones);
`length` fixes the T the TC blocks are sized for, so one model can be tested on longer episodes (a
1-shot-trained model on 5-shot tasks).
Every output at step t depends on steps <= t only (tested). Each query is its own sequence after the
same support sequence, so queries never see one another. The likelihood is over the query labels; no
inner loop: `inner_steps` is accepted and ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro

from bayesmeta.config import ModelConfig, opt
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Context, Method, no_guide
from bayesmeta.models.baselines import Classifier
from bayesmeta.models.mann import shuffle, take
from bayesmeta.nets import dense, dense_init, embedding, make_net, task_vmap
from bayesmeta.sites import observe, param_tree
from bayesmeta.tasks import TaskBatch


def causal_conv(p: dict, x: jax.Array, rate: int) -> jax.Array:
    """out_t = W_0 x_{t-rate} + W_1 x_t + b on a sequence x (T, c), zeros before its start (w: (2, c, D))."""
    past = jnp.concatenate([jnp.zeros((rate, x.shape[1]), x.dtype), x[:-rate]])[: x.shape[0]]
    return past @ p["w"][0] + x @ p["w"][1] + p["b"]


def conv_init(key: jax.Array, c: int, filters: int) -> dict:
    w = jax.nn.initializers.glorot_normal(in_axis=(0, 1), out_axis=2)(key, (2, c, filters))
    return {"w": w, "b": jnp.zeros((filters,))}


def dense_block(p: dict, x: jax.Array, rate: int) -> jax.Array:
    """[x, tanh(conv_f(x)) * sigmoid(conv_g(x))]: a gated causal convolution appended to its input."""
    return jnp.concatenate(
        [x, jnp.tanh(causal_conv(p["f"], x, rate)) * jax.nn.sigmoid(causal_conv(p["g"], x, rate))], -1
    )


def tc_rates(length: int) -> tuple[int, ...]:
    """The dilations 2^i, i = 1 .. ceil(log2 T), of a TC block over T steps."""
    return tuple(2**i for i in range(1, max(1, math.ceil(math.log2(length))) + 1))


def attention_block(p: dict, x: jax.Array) -> jax.Array:
    """[x, causal softmax attention read]: step t attends to steps s <= t only."""
    q, k, v = dense(p["q"], x), dense(p["k"], x), dense(p["v"], x)
    logits = q @ k.T / jnp.sqrt(q.shape[-1])
    t = x.shape[0]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return jnp.concatenate([x, jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), -1) @ v], -1)


def snail_init(
    key: jax.Array, c: int, length: int, keys: tuple, values: tuple, filters: int, ways: int
) -> dict:
    """Parameters of Attention(keys[0], values[0]), then [TC(T, filters), Attention(keys[i], values[i])]
    for each further block, and the 1x1 output layer, for inputs of c channels."""
    params: dict = {}
    rates = tc_rates(length)
    for i, (kk, vv) in enumerate(zip(keys, values, strict=True)):
        if i > 0:
            for j, _ in enumerate(rates):
                key, kf, kg = jax.random.split(key, 3)
                params[f"tc_{i}_{j}"] = {"f": conv_init(kf, c, filters), "g": conv_init(kg, c, filters)}
                c += filters
        key, kq, kk_, kv = jax.random.split(key, 4)
        params[f"att_{i}"] = {
            "q": dense_init(kq, c, kk),
            "k": dense_init(kk_, c, kk),
            "v": dense_init(kv, c, vv),
        }
        c += vv
    key, ko = jax.random.split(key)
    params["out"] = dense_init(ko, c, ways)
    return params


def snail_outputs(p: dict, x: jax.Array, n_blocks: int, length: int = 0) -> jax.Array:
    """The class scores at every step (T, ways) of a sequence x (T, c), the TC blocks sized for `length`
    steps (0: T)."""
    rates = tc_rates(length or x.shape[0])
    for i in range(n_blocks):
        if i > 0:
            for j, r in enumerate(rates):
                x = dense_block(p[f"tc_{i}_{j}"], x, r)
        x = attention_block(p[f"att_{i}"], x)
    return dense(p["out"], x)


def query_sequences(z_s: jax.Array, y_s: jax.Array, z_q: jax.Array, ways: int) -> jax.Array:
    """One task's sequences (n_q, n_s + 1, d + ways): the labelled support items, then one query."""
    support = jnp.concatenate([z_s, jax.nn.one_hot(y_s, ways)], -1)
    queries = jnp.concatenate([z_q, jnp.zeros((z_q.shape[0], ways))], -1)
    return jnp.concatenate([jnp.broadcast_to(support, (z_q.shape[0], *support.shape)), queries[:, None]], 1)


class SNAIL(Classifier):
    """Dense blocks of causal dilated convolutions and causal attention over the episode sequence."""

    @dataclass(frozen=True)
    class Params:
        keys: tuple[int, ...] = opt(
            (64, 256, 512), ge=1, doc="key sizes of the attention blocks (the paper's)"
        )
        values: tuple[int, ...] = opt((32, 128, 256), ge=1, doc="value sizes of the attention blocks")
        filters: int = opt(128, ge=1, doc="filters D of each dense block of the TC blocks (the paper: 128)")
        length: int = opt(
            0, ge=0, doc="T the TC blocks are sized for (ceil(log2 T) dense blocks); 0: the episode's N K + 1"
        )
        shuffle: bool = opt(True, doc="present the support items in a random order per task")

    @staticmethod
    def check(cfg: ModelConfig, params: Params) -> str | None:
        if len(params.keys) != len(params.values) or not params.keys:
            return "model.params.values: one value size per key size (at least one)"
        return None

    @staticmethod
    def build(cfg: ModelConfig, params: Params, x_dim: int, y_dim: int, context: Context) -> Method:
        net = make_net(cfg.net, x_dim, y_dim)
        lik = make_likelihood(cfg)
        p = params
        body, d = embedding(net, x_dim)

        def init_for(length: int):
            def init(key: jax.Array) -> dict:
                kb, ks = jax.random.split(key)
                return {
                    "embed": body(kb),
                    "snail": snail_init(ks, d + y_dim, length, p.keys, p.values, p.filters, y_dim),
                }

            return init

        def embed(theta: dict, x: jax.Array) -> jax.Array:
            return task_vmap(net, net.features, theta["embed"], x)

        def model(batch: TaskBatch, inner_steps: int | None = None, training: bool = True) -> None:
            n_tasks, n_s = batch.y_support.shape[:2]
            theta = param_tree("theta", init_for(p.length or n_s + 1))
            z_s, y_s = embed(theta, batch.x_support), batch.y_support
            if p.shuffle:
                key = numpyro.prng_key()
                order = shuffle(jax.random.PRNGKey(0) if key is None else key, n_tasks, n_s)
                z_s, y_s = take(z_s, order), take(y_s, order)
            seqs = jax.vmap(query_sequences, (0, 0, 0, None))(z_s, y_s, embed(theta, batch.x_query), y_dim)
            out = jax.vmap(jax.vmap(lambda s: snail_outputs(theta["snail"], s, len(p.keys), p.length)[-1]))(
                seqs
            )
            observe(lik, out, batch.y_query)

        return Method(name="snail", model=model, guide=no_guide, likelihood=lik, inner_loop=False)
