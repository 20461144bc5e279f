"""Matching networks: the attention read-out by hand, one-shot matching as 1-NN under cosine similarity
(exactly one-hot with a sharp softmax), full-context embeddings that reduce to the plain embeddings when
their LSTMs are zero, and a short fit on hidden clusters that must learn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Predictive, Trace_ELBO

from bayesmeta import registry
from bayesmeta.models.matching import attention_logits, cosine, fce_init, query_context, support_context
from bayesmeta.nets import make_net
from bayesmeta.registry import build_method, make_family
from bayesmeta.sites import tree_from_params
from tests.clusters import BASE, fit_accuracy


def test_cosine_and_attention_read_out_by_hand():
    """p(y* = k) = sum_{i: y_i = k} softmax_i(s cos_i), for two shots per class (s = 2)."""
    a = jnp.array([[1.0, 0.0], [3.0, 4.0]])
    b = jnp.array([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0], [0.0, 0.0]])
    r2 = 1 / np.sqrt(2)
    np.testing.assert_allclose(cosine(a, b), [[1, 0, r2, 0], [0.6, 0.8, 1.4 * r2, 0]], atol=1e-6)
    sim = np.array([[0.9, 0.1, 0.5, -0.2]])
    y = jnp.array([0, 1, 1, 0])
    w = np.exp(2 * sim[0]) / np.exp(2 * sim[0]).sum()
    expect = [w[0] + w[3], w[1] + w[2]]
    np.testing.assert_allclose(np.exp(attention_logits(jnp.asarray(sim), y, 2, 2.0)), [expect], rtol=1e-6)


@functools.cache
def one_shot(*overrides: str) -> tuple:
    """(net, method, 20 one-shot 5-way tasks, the method's initial parameters, jitted params -> "f")
    for matching networks with a learned scale (so tests substitute s) and the given options."""
    cfg = registry.load_config(
        None, [*BASE, "model.method='matching'", "model.params.learn_scale=true", *overrides]
    )
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    batch = jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(0), 20)
    svi = SVI(method.model, method.guide, optax.sgd(0.0), Trace_ELBO())
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(3), batch))
    withheld = batch._replace(y_query=None)
    f = jax.jit(
        lambda p: Predictive(method.model, params=p, num_samples=1, return_sites=["f"])(
            jax.random.PRNGKey(0), withheld
        )["f"][0]
    )
    return make_net(cfg.model.net, fam.x_dim, fam.y_dim), method, batch, params, f


def cosines(net, theta: dict, batch) -> np.ndarray:
    """cos(f'(x*), g'(x_i)) by hand from the net's features at the parameters theta: (T, n_q, n_s)."""
    body = tree_from_params("theta", lambda k: {n: v for n, v in net.init(k).items() if n != "head"}, theta)
    z_s, z_q = (
        np.asarray(jax.vmap(lambda x: net.features(body, x))(x)) for x in (batch.x_support, batch.x_query)
    )
    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
    return np.einsum("tqd,tnd->tqn", unit(z_q), unit(z_s))


def test_one_shot_matching_is_cosine_nearest_neighbour_and_sharp_softmax_is_one_hot():
    """One support example per class: p = softmax(s cos(f(x*), g(x_k))) over the classes, so its argmax
    is 1-NN under cosine similarity of the embeddings; at s = 1000 p is the one-hot 1-NN decision."""
    net, _, batch, params, predict = one_shot()
    cos = cosines(net, params, batch)  # support item k is class k (one shot)
    assert np.asarray(batch.y_support).tolist() == [list(range(5))] * 20
    f = np.asarray(predict({**params, "scale": jnp.asarray(1000.0)}))
    np.testing.assert_array_equal(np.argmax(f, -1), np.argmax(cos, -1))
    top2 = np.sort(cos, -1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) * 1000 > 30  # a margin that makes the softmax one-hot
    assert clear.mean() > 0.8
    np.testing.assert_allclose(f[clear], np.eye(5)[np.argmax(cos, -1)][clear], atol=1e-6)
    # at s = 1 the probabilities are softmax(cos) itself
    f1 = predict({**params, "scale": jnp.asarray(1.0)})
    np.testing.assert_allclose(f1, jax.nn.softmax(cos, -1), rtol=1e-4, atol=1e-6)


def test_full_context_embeddings_with_zero_lstms_are_the_plain_embeddings():
    """With every LSTM weight and bias at zero the cells output h = 0 (c stays 0), so g(x_i, S) = g'(x_i)
    and f(x*, S) = f'(x*): FCE matching equals plain matching (softmax(s cos) for one shot); with the
    initial weights it differs."""
    net, _, batch, params, predict = one_shot("model.params.fce=true", "model.params.fce_steps=3")
    assert params["fce.att.wh"].shape[0] == 2 * params["fce.att.wx"].shape[0]  # state [h, r]
    plain = jax.nn.softmax(cosines(net, params, batch), -1)  # s = 1
    zeroed = {k: (jnp.zeros_like(v) if k.startswith("fce.") else v) for k, v in params.items()}
    np.testing.assert_allclose(predict(zeroed), plain, rtol=1e-4, atol=1e-6)
    assert not np.allclose(predict(params), plain, atol=1e-4)
    # the pieces by hand: zero LSTMs leave the embeddings as they are
    g = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    zero = jax.tree.map(jnp.zeros_like, fce_init(jax.random.PRNGKey(0), 3))
    np.testing.assert_allclose(support_context(zero, g), g)
    np.testing.assert_allclose(query_context(zero, g[:2], g, 4), g[:2])


def test_matching_networks_learn_hidden_clusters():
    """300 steps on 5-way 1-shot clusters hidden among 10 noisy dimensions: held-out accuracy rises from
    near chance (0.2) by at least 0.3."""
    before, after, _ = fit_accuracy("model.method='matching'", "model.params.learn_scale=true")
    assert before < 0.3 and after > before + 0.3, (before, after)
