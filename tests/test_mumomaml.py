"""MUMOMAML: zero modulation is MAML (loss and gradient); FiLM and the LSTM by hand; the bidirectional
embedding's symmetry and the mean encoder's permutation invariance; the modulation is held fixed in the
inner loop; a tiny fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Predictive

from bayesmeta.adapt import InnerLoop, gradient_descent
from bayesmeta.models.mumomaml import FILM, bilstm_embed, lstm_init, lstm_run, mean_embed, modulated_apply
from bayesmeta.nets import MLP, dense_init
from tests.helpers import elbo, fit_lowers_loss, tiny_setup

MU = "model.method='mumomaml'"


def test_zero_modulation_is_maml():
    """The FiLM heads start at zero (scale 1, shift 0): the ELBO and its gradient in theta are MAML's at
    the same theta, whatever the encoder's weights (here perturbed)."""
    _, mu, batch, params = tiny_setup(MU, "model.params.encoder_hidden=4")
    _, maml, _, _ = tiny_setup("model.method='maml'")
    assert all(not np.any(v) for k, v in params.items() if k.startswith(f"{FILM}."))
    rng = np.random.default_rng(0)
    params = {
        k: (v + rng.normal(size=v.shape)).astype(np.float32) if k.startswith("encoder.") else v
        for k, v in params.items()
    }
    theta = {k: v for k, v in params.items() if k.startswith("theta.")}
    v_mu, g_mu = jax.value_and_grad(lambda p: elbo(mu, p, batch))(params)
    v_maml, g_maml = jax.value_and_grad(lambda p: elbo(maml, p, batch))(theta)
    np.testing.assert_allclose(v_mu, v_maml, rtol=1e-6)
    for k in theta:
        np.testing.assert_allclose(g_mu[k], g_maml[k], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g_mu[f"{FILM}.layer_0.scale.w"]).max()) > 1e-6  # the heads learn from the start


def test_film_by_hand():
    net = MLP(2, 1, (3,), "relu")
    p = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    s, c = jnp.array([0.5, -1.0, 2.0]), jnp.array([0.1, 0.2, -0.3])
    out = modulated_apply(net, {**p, FILM: {"layer_0": {"scale": s, "shift": c}}}, x)
    h = np.maximum((x @ p["layer_0"]["w"] + p["layer_0"]["b"]) * s + c, 0)
    np.testing.assert_allclose(out, h @ p["head"]["w"] + p["head"]["b"], rtol=1e-6)
    np.testing.assert_allclose(modulated_apply(net, p, x), net.apply(p, x), rtol=1e-6)


def test_lstm_by_hand_and_the_bidirectional_symmetry():
    """lstm_run against the LSTM equations in numpy; with the same weights in both directions, the
    embedding of the reversed sequence is the embedding with its halves swapped."""
    p = lstm_init(jax.random.PRNGKey(0), 3, 4)
    xs = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    h, c, outs = np.zeros(4), np.zeros(4), []
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for x in np.asarray(xs):
        i, f, g, o = np.split(x @ p["wx"] + h @ p["wh"] + p["b"], 4)
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        outs.append(h)
    np.testing.assert_allclose(lstm_run(p, xs), np.stack(outs), rtol=1e-5, atol=1e-6)
    layers = {"layer_0": {"forward": p, "backward": p}}
    e, e_rev = bilstm_embed(layers, xs), bilstm_embed(layers, xs[::-1])
    np.testing.assert_allclose(e_rev, jnp.concatenate([e[4:], e[:4]]), rtol=1e-5)


def test_mean_encoder_is_permutation_invariant():
    layers = {
        "layer_0": dense_init(jax.random.PRNGKey(0), 3, 5),
        "layer_1": dense_init(jax.random.PRNGKey(1), 5, 5),
    }
    pairs = jax.random.normal(jax.random.PRNGKey(2), (7, 3))
    perm = jax.random.permutation(jax.random.PRNGKey(3), 7)
    np.testing.assert_allclose(mean_embed(layers, pairs), mean_embed(layers, pairs[perm]), rtol=1e-5)


def test_the_modulation_is_held_fixed_by_the_inner_loop():
    """InnerLoop with `fixed`: the loss reads the per-task constants, only theta moves, and the result
    is gradient descent on the loss with each task's constants closed over."""

    def loss(p, x, y):
        return jnp.mean((x * p["w"] * p["c"] - y) ** 2)

    theta = {"w": jnp.array(0.3)}
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    y = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    c = jnp.array([1.0, -2.0, 0.5])
    phi, _ = InnerLoop(steps=2, lr=0.1)(loss, theta, x, y, fixed={"c": c})
    assert set(phi) == {"w"}
    for i in range(3):
        ref, _ = gradient_descent(
            lambda p, a, b, i=i: loss({**p, "c": c[i]}, a, b), theta, x[i], y[i], steps=2, lr=0.1
        )
        np.testing.assert_allclose(phi["w"][i], ref["w"], rtol=1e-6)


def test_the_modulation_depends_on_the_support_set():
    """Nonzero heads: two tasks' predictions from the same theta differ by their support sets only
    through the modulation (no inner steps)."""
    _, mu, batch, params = tiny_setup(MU, "model.params.encoder='mean'")
    rng = np.random.default_rng(1)
    params = {
        k: (v + rng.normal(size=v.shape)).astype(np.float32) if k.startswith(f"{FILM}.") else v
        for k, v in params.items()
    }
    same_x = batch._replace(x_query=jnp.broadcast_to(batch.x_query[:1], batch.x_query.shape), y_query=None)
    f = Predictive(mu.model, params=params, num_samples=1, return_sites=["f"])(
        jax.random.PRNGKey(0), same_x, inner_steps=0
    )["f"][0]
    assert float(jnp.abs(f[0] - f[1]).max()) > 1e-3


def test_a_tiny_fit_on_the_sinusoid_lowers_the_loss(small_cfg):
    """200 meta-steps, MLP 16-16, a 1-layer LSTM of 8 units: the training loss falls by 30% or more."""
    cfg = small_cfg(
        MU,
        "model.inner_steps=2",
        "train.lr=5e-3",
        "train.meta_batch=16",
        "model.params.encoder_hidden=8",
        "model.params.encoder_layers=1",
    )
    result = fit_lowers_loss(cfg)
    assert np.any(np.asarray(result.params[f"{FILM}.layer_0.shift.w"]) != 0.0)
