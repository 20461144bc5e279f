"""L2F (Baik et al. 2020): task-conditioned attenuation gamma_i * theta of the initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Predictive

from bayesmeta.config import ConfigError
from bayesmeta.fit import fit
from bayesmeta.nets import make_net
from bayesmeta.registry import build_method, make_family
from tests.helpers import elbo, tiny_setup

L2F = "model.method='l2f'"
L = 4  # parameter tensors of the 1-3-1 network: layer_0.w, layer_0.b, head.w, head.b


def predict(method, params, batch, steps=None):
    pred = Predictive(lambda b: method.model(b, inner_steps=steps), params=params, num_samples=1)
    return jax.jit(lambda p, b: pred(jax.random.PRNGKey(0), b._replace(y_query=None)))(params, batch)


def extra(params):
    """The meta-parameters beyond the network's theta."""
    return {k: v for k, v in params.items() if not k.startswith("theta.")}


def perturbed(params, scale=1.0, seed=0):
    """The attenuator's weights drawn at random, so that gamma varies across tasks and layers."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + scale * rng.normal(size=v.shape) if k.startswith("l2f.") else v).astype(np.float32)
        for k, v in params.items()
    }


def test_gamma_has_one_entry_per_layer_in_the_unit_interval():
    _, method, batch, params = tiny_setup(
        L2F,
    )
    gamma0 = predict(method, params, batch)["gamma"][0]
    assert gamma0.shape == (3, L)
    np.testing.assert_allclose(gamma0, 0.9, rtol=1e-6)  # gamma_init: every task and layer
    gamma = predict(method, perturbed(params), batch)["gamma"][0]
    assert np.all((gamma > 0) & (gamma < 1))
    assert np.std(gamma) > 0.05  # it varies across tasks and layers
    assert np.std(gamma, axis=0).max() > 1e-3  # task conditioning: tasks differ


def test_task_init_is_gamma_times_theta_by_hand():
    """With no inner steps the prediction is f(x*; gamma_i * theta), where gamma_i = sigmoid(W2 relu(W1
    e_i + b1) + b2) and e_i the per-tensor means of grad L(theta, D_i), all computed here by hand."""
    cfg, method, batch, params = tiny_setup(
        L2F,
    )
    params = perturbed(params)
    out = predict(method, params, batch, steps=0)
    net = make_net(cfg.model.net, 1, 1)
    names = [("head", "b"), ("head", "w"), ("layer_0", "b"), ("layer_0", "w")]  # tree (sorted) order
    theta = {lay: {w: params[f"theta.{lay}.{w}"] for w in "wb"} for lay in net.layer_names}
    w1, b1 = np.asarray(params["l2f.attenuator.layer_0.w"]), np.asarray(params["l2f.attenuator.layer_0.b"])
    w2, b2 = np.asarray(params["l2f.attenuator.head.w"]), np.asarray(params["l2f.attenuator.head.b"])
    for i in range(3):
        x, y = batch.x_support[i], batch.y_support[i]
        grads = jax.grad(lambda p, x=x, y=y: jnp.mean((net.apply(p, x) - y) ** 2))(theta)
        e = np.array([np.mean(np.asarray(grads[lay][w])) for lay, w in names])
        gamma = 1 / (1 + np.exp(-(np.maximum(e @ w1 + b1, 0) @ w2 + b2)))
        np.testing.assert_allclose(out["gamma"][0, i], gamma, rtol=1e-5)
        init = {lay: dict(theta[lay]) for lay in theta}
        for (lay, w), g in zip(names, gamma, strict=True):
            init[lay][w] = g * np.asarray(theta[lay][w])
        np.testing.assert_allclose(out["f"][0, i], net.apply(init, batch.x_query[i]), rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_attenuator():
    """At init (zero last-layer weights) the last layer gets a gradient; once it is non-zero, the first
    layer does too."""
    _, method, batch, params = tiny_setup(
        L2F,
    )
    g0 = jax.grad(lambda p: elbo(method, p, batch))(params)
    assert float(jnp.max(jnp.abs(g0["l2f.attenuator.head.b"]))) > 1e-6
    assert float(jnp.max(jnp.abs(g0["l2f.attenuator.head.w"]))) > 1e-8
    g = jax.grad(lambda p: elbo(method, p, batch))(perturbed(params))
    for k, v in extra(g).items():
        assert float(jnp.max(jnp.abs(v))) > 1e-8, k


@pytest.mark.parametrize(
    ("attenuation", "n_params"), [("task", 2 * L * L + 2 * L), ("layer", L), ("network", 1)]
)
def test_ablations_have_the_documented_number_of_parameters(attenuation, n_params):
    _, _, _, params = tiny_setup(L2F, f"model.params.attenuation='{attenuation}'")
    assert sum(int(np.size(v)) for v in extra(params).values()) == n_params


def test_unsigmoided_gamma_and_the_maml_limit():
    """sigmoid = false: gamma is the raw output (here gamma_init = 1 for every task); a network-wise
    gamma fixed at 1 is MAML exactly (same theta, same loss)."""
    _, method, batch, params = tiny_setup(L2F, "model.params.sigmoid=false", "model.params.gamma_init=1.0")
    np.testing.assert_array_equal(predict(method, params, batch)["gamma"][0], np.ones((3, L)))
    _, net1, _, p1 = tiny_setup(
        L2F, "model.params.attenuation='network'", "model.params.sigmoid=false", "model.params.gamma_init=1.0"
    )
    _, maml, _, pm = tiny_setup(L2F, "model.method='maml'")
    np.testing.assert_allclose(elbo(net1, p1, batch), elbo(maml, pm, batch), rtol=1e-6)
    with pytest.raises(ConfigError, match="gamma_init"):
        tiny_setup(L2F, "model.params.gamma_init=1.0")


def test_works_with_learned_rates():
    _, method, batch, params = tiny_setup(L2F, "model.params.learned_lr='per_layer_step'")
    assert {k for k in extra(params) if k.startswith("inner_lr.")} == {
        f"inner_lr.{lay}.{w}" for lay in ("head", "layer_0") for w in "wb"
    }
    g = jax.grad(lambda p: elbo(method, p, batch))(params)
    assert float(jnp.max(jnp.abs(g["inner_lr.head.w"]))) > 1e-8


def test_a_tiny_fit_on_the_sinusoid_lowers_the_loss(small_cfg):
    cfg = small_cfg("model.method='l2f'", "model.inner_steps=2", "train.lr=5e-3", "train.meta_batch=16")
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    result = fit(method, fam, cfg.train, seed=0, progress=False)
    loss = np.asarray(result.trace.loss)
    assert np.all(np.isfinite(loss)) and loss[-50:].mean() < 0.8 * loss[:50].mean()
    assert np.any(np.asarray(result.params["l2f.attenuator.head.b"]) != np.float32(np.log(9)))
