"""MT-Net: with T = I and every mask 1 it is MAML (loss and gradient); masks of 0 freeze the network;
the straight-through masks' values and gradient; per-task step sizes in the inner loop; a tiny fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import Predictive

from bayesmeta.adapt import InnerLoop, gradient_descent
from bayesmeta.config import ConfigError
from bayesmeta.models.mtnet import mask_rates, relaxed_masks, transformed_apply
from bayesmeta.nets import make_net
from bayesmeta.sites import tree_from_params
from tests.helpers import elbo, fit_lowers_loss, tiny_setup

MT = "model.method='mtnet'"


def with_logits(params, value):
    return {k: (jnp.full_like(v, value) if k.startswith("mask_logit.") else v) for k, v in params.items()}


def test_identity_transform_and_all_ones_masks_is_maml():
    """T = I (its initial value) and mask logits of 50 (every unit updates: sigmoid(50) is 1 in float32):
    the ELBO and its gradient in theta are MAML's at the same theta (2 second-order inner steps)."""
    _, mt, batch, params = tiny_setup(MT)
    _, maml, _, _ = tiny_setup("model.method='maml'")
    params = with_logits(params, 50.0)
    theta = {k: v for k, v in params.items() if k.startswith("theta.")}
    for k in ("transform.layer_0", "transform.head"):
        np.testing.assert_array_equal(params[k], np.eye(params[k].shape[0]))
    v_mt, g_mt = jax.value_and_grad(lambda p: elbo(mt, p, batch))(params)
    v_maml, g_maml = jax.value_and_grad(lambda p: elbo(maml, p, batch))(theta)
    np.testing.assert_allclose(v_mt, v_maml, rtol=1e-6)
    for k in theta:
        assert float(jnp.abs(g_maml[k]).max()) > 1e-6, k
        np.testing.assert_allclose(g_mt[k], g_maml[k], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g_mt["transform.layer_0"]).max()) > 1e-6  # T is meta-learned


def test_zero_masks_freeze_the_network_and_t_transforms_each_layer():
    """Logits of -50: no unit updates, so the prediction is the initial network with T, computed here by
    hand as (relu((x W0 + b0) T0) W1 + b1) T1 with a random T."""
    cfg, mt, batch, params = tiny_setup(MT)
    rng = np.random.default_rng(0)
    params = with_logits(params, -50.0)
    params = {
        k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) if k.startswith("transform.") else v
        for k, v in params.items()
    }
    f = Predictive(mt.model, params=params, num_samples=1, return_sites=["f"])(
        jax.random.PRNGKey(0), batch._replace(y_query=None)
    )["f"][0]
    w0, b0 = params["theta.layer_0.w"], params["theta.layer_0.b"]
    w1, b1 = params["theta.head.w"], params["theta.head.b"]
    by_hand = (np.tanh((batch.x_query @ w0 + b0) @ params["transform.layer_0"]) @ w1 + b1) @ params[
        "transform.head"
    ]
    np.testing.assert_allclose(f, by_hand, rtol=1e-5, atol=1e-6)
    net = make_net(cfg.model.net, 1, 1)
    theta = tree_from_params("theta", net.init, params)
    transform = {"layer_0": params["transform.layer_0"], "head": params["transform.head"]}
    np.testing.assert_allclose(
        transformed_apply(net, theta, transform, batch.x_query[0]), by_hand[0], rtol=1e-5
    )


def test_masks_are_binary_with_the_relaxed_samples_gradient():
    """m = 1[zeta + l > 0] in value, and dm/dzeta = sigmoid'((zeta + l)/tau)/tau (straight-through),
    l the logistic draw; the fraction of ones is sigmoid(zeta)."""
    zeta = {"a": jnp.array([-1.0, 0.0, 2.0])}
    key, tau = jax.random.PRNGKey(0), 0.7
    m = relaxed_masks(zeta, key, 4000, tau)["a"]
    assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
    np.testing.assert_allclose(m.mean(0), jax.nn.sigmoid(zeta["a"]), atol=0.03)
    noise = jax.random.logistic(jax.random.split(key, 1)[0], (4000, 3))
    np.testing.assert_array_equal(m, (zeta["a"] + noise > 0).astype(jnp.float32))
    grad = jax.grad(lambda z: relaxed_masks({"a": z}, key, 4000, tau)["a"].sum())(zeta["a"])
    s = jax.nn.sigmoid((zeta["a"] + noise) / tau)
    np.testing.assert_allclose(grad, (s * (1 - s) / tau).sum(0), rtol=1e-4)


def test_mask_rates_and_per_task_step_sizes():
    """alpha m_j on column j of w and entry j of b; InnerLoop with task_lr equals gradient descent per
    task with that task's rates."""
    fast = {"layer": {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}}
    masks = {"layer": jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    r = mask_rates(masks, fast, 0.5)
    assert r["layer"]["w"].shape == (2, 1, 2, 3) and r["layer"]["b"].shape == (2, 1, 3)
    np.testing.assert_array_equal(r["layer"]["w"][1, 0], [[0.0, 0.5, 0.0]] * 2)
    np.testing.assert_array_equal(r["layer"]["b"][0, 0], [0.5, 0.0, 0.5])

    def loss(p, x, y):
        return jnp.mean((x @ p["layer"]["w"] + p["layer"]["b"] - y) ** 2)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 2))
    y = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 3))
    theta = {"layer": {"w": jax.random.normal(jax.random.PRNGKey(3), (2, 3)), "b": jnp.zeros(3)}}
    phi, _ = InnerLoop(steps=3, lr=0.1)(loss, theta, x, y, lr=r, task_lr=True)
    for i in range(2):
        one = jax.tree.map(lambda a, i=i: a[i], r)
        ref, _ = gradient_descent(loss, theta, x[i], y[i], steps=3, lr=one)
        np.testing.assert_allclose(phi["layer"]["w"][i], ref["layer"]["w"], rtol=1e-6)
        frozen = np.asarray(masks["layer"][i]) == 0
        np.testing.assert_array_equal(phi["layer"]["w"][i][:, frozen], theta["layer"]["w"][:, frozen])


def test_options_and_config_errors():
    _, _, _, params = tiny_setup(MT, "model.params.masks=false", "model.params.transform=false")
    assert all(k.startswith("theta.") for k in params)  # plain MAML's parameters
    _, method, batch, params = tiny_setup(MT, "model.params.test_masks='mode'")
    pred = Predictive(
        handlers.substitute(method.model, {}),
        params=with_logits(params, -1.0),
        num_samples=2,
        return_sites=["f"],
    )
    f = pred(jax.random.PRNGKey(0), batch._replace(y_query=None), training=False)["f"]
    np.testing.assert_array_equal(f[0], f[1])  # the mode: no draw at prediction
    with pytest.raises(ConfigError, match="mtnet"):
        tiny_setup(MT, "model.net.kind='conv4'")


def test_a_tiny_fit_on_the_sinusoid_lowers_the_loss(small_cfg):
    """200 meta-steps, MLP 16-16: the training loss falls by 30% or more (to 0.58 of its start when
    written, as MAML's 0.57 under the same settings)."""
    cfg = small_cfg(MT, "model.inner_steps=2", "train.lr=5e-3", "train.meta_batch=16")
    result = fit_lowers_loss(cfg)
    assert np.any(np.asarray(result.params["mask_logit.layer_0"]) != 0.0)  # the masks were learned
