"""SNAIL: the causal convolution and attention by hand, causality of the whole network (perturbing a
later item never changes an earlier output), and a short fit on hidden clusters that learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.models.snail import attention_block, causal_conv, snail_init, snail_outputs, tc_rates
from tests.clusters import fit_accuracy
from tests.helpers import random_params

TINY = (
    "model.method='snail'",
    "model.params.keys=[8,8]",
    "model.params.values=[8,8]",
    "model.params.filters=8",
)


def test_causal_convolution_and_attention_by_hand():
    """out_t = W_0 x_{t-r} + W_1 x_t + b with zeros before the start; attention at step t averages the
    values of steps <= t with softmax(q.k / sqrt(K)) weights; TC dilations 2, 4, ..., 2^ceil(log2 T)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    p = {"w": jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4)), "b": jnp.arange(4.0)}
    xs, w = np.asarray(x), np.asarray(p["w"])
    past = np.concatenate([np.zeros((2, 3)), xs[:-2]])
    np.testing.assert_allclose(causal_conv(p, x, 2), past @ w[0] + xs @ w[1] + np.arange(4.0), rtol=1e-5)
    assert tc_rates(6) == (2, 4, 8) and tc_rates(21) == (2, 4, 8, 16, 32) and tc_rates(2) == (2,)
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    att = {n: {"w": jax.random.normal(kk, (3, 2)), "b": jnp.zeros(2)} for n, kk in zip("qkv", k, strict=True)}
    q, kk_, v = (xs @ np.asarray(att[n]["w"]) for n in "qkv")
    out = np.asarray(attention_block(att, x))
    np.testing.assert_allclose(out[:, :3], xs)
    for t in range(6):
        e = q[t] @ kk_[: t + 1].T / np.sqrt(2)
        a = np.exp(e - e.max())
        np.testing.assert_allclose(out[t, 3:], (a / a.sum()) @ v[: t + 1], rtol=1e-4, atol=1e-6)


def test_every_output_depends_on_earlier_items_only():
    """The full network (3 attention blocks, 2 TC blocks) on a sequence of 9 items: changing item j
    leaves the outputs at steps < j exactly as they were and changes the output at step j."""
    c, ways, length = 7, 3, 9
    p = random_params(lambda: snail_init(jax.random.PRNGKey(0), c, length, (4, 6, 5), (3, 4, 2), 5, ways))
    run = jax.jit(lambda s: snail_outputs(p, s, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (length, c))
    base = np.asarray(run(x))
    for j in (0, 3, 8):
        moved = np.asarray(run(x.at[j].add(jax.random.normal(jax.random.PRNGKey(j), (c,)))))
        np.testing.assert_array_equal(moved[:j], base[:j])
        assert not np.allclose(moved[j], base[j])


def test_snail_learns_hidden_clusters():
    """1200 steps (lr 1e-2) on 5-way 1-shot clusters (nuisance sd 1): held-out accuracy rises from near
    chance (0.2) by at least 0.3."""
    before, after, _ = fit_accuracy(*TINY, "train.lr=1e-2", "task.params.nuisance=1.0", steps=1200)
    assert before < 0.3 and after > before + 0.3, (before, after)
