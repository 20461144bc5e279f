"""TAML: the inequality measures and the entropy on hand-computed cases and against finite differences,
lambda = 0 is MAML, the regularizer enters the objective as lambda R of the initial support losses, and
a tiny fit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from bayesmeta.config import ConfigError
from bayesmeta.models.taml import TAML, entropy, inequality
from bayesmeta.nets import make_net
from bayesmeta.registry import load_config
from bayesmeta.sites import tree_from_params
from bayesmeta.tasks import TaskBatch
from tests.helpers import elbo, fit_lowers_loss, tiny_setup

TA = "model.method='taml'"
INEQUALITIES = ["theil", "generalized_entropy", "atkinson", "gini", "variance_of_logs"]


def test_inequality_measures_on_a_hand_computed_case():
    """Losses (1, 3), mean 2: Theil (0.5 ln 0.5 + 1.5 ln 1.5) / 2; GE(2) = CV^2 / 2 = 1/8; Atkinson(1/2)
    = 1 - ((1 + sqrt 3) / 2)^2 / 2; Gini = 4 / (2 * 4 * 2) = 1/4; variance of logs (ln 3 / 2)^2.
    Equal losses have no inequality."""
    l = jnp.array([1.0, 3.0])
    expected = {
        "theil": (0.5 * math.log(0.5) + 1.5 * math.log(1.5)) / 2,
        "generalized_entropy": 0.125,
        "atkinson": 1 - ((1 + math.sqrt(3)) / 2) ** 2 / 2,
        "gini": 0.25,
        "variance_of_logs": (math.log(3) / 2) ** 2,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(inequality(l, name, 2.0, 0.5), value, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(inequality(jnp.full(4, 2.5), name, 2.0, 0.5), 0.0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(entropy(jnp.zeros((2, 5, 4))), math.log(4), rtol=1e-6)
    np.testing.assert_allclose(entropy(jnp.array([[50.0, 0.0, 0.0]])), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", INEQUALITIES)
def test_inequality_gradients_against_finite_differences(name):
    with jax.enable_x64(True):
        l = jnp.array([0.7, 1.9, 3.1, 0.4, 2.2], jnp.float64)
        f = lambda v: inequality(v, name, 1.5, 0.3)  # noqa: E731
        g = jax.grad(f)(l)
        eps = 1e-6
        fd = jnp.array([(f(l.at[i].add(eps)) - f(l.at[i].add(-eps))) / (2 * eps) for i in range(5)])
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
        assert float(jnp.abs(g).max()) > 1e-3


def test_entropy_gradient_against_finite_differences():
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4), jnp.float64)
        g = jax.grad(entropy)(z)
        eps = 1e-6
        flat = z.ravel()
        fd = [
            (entropy(flat.at[i].add(eps).reshape(z.shape)) - entropy(flat.at[i].add(-eps).reshape(z.shape)))
            / (2 * eps)
            for i in range(flat.size)
        ]
        np.testing.assert_allclose(g.ravel(), np.array(fd), rtol=1e-6, atol=1e-9)


def test_lambda_zero_is_maml_and_the_factor_is_lambda_times_the_theil_index():
    """lam = 0: MAML's ELBO and gradient. lam = 0.3: the ELBO grows by 0.3 x the Theil index of the
    initial network's support MSEs, computed here by hand."""
    cfg, taml0, batch, params = tiny_setup(TA, "model.params.lam=0.0")
    _, maml, _, _ = tiny_setup("model.method='maml'")
    v0, g0 = jax.value_and_grad(lambda p: elbo(taml0, p, batch))(params)
    vm, gm = jax.value_and_grad(lambda p: elbo(maml, p, batch))(params)
    np.testing.assert_allclose(v0, vm, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(g0[k], gm[k], rtol=1e-6, atol=1e-8)
    _, taml, _, _ = tiny_setup(TA, "model.params.lam=0.3")
    net = make_net(cfg.model.net, 1, 1)
    theta = tree_from_params("theta", net.init, params)
    mse = np.array(
        [
            np.mean((net.apply(theta, x) - y) ** 2)
            for x, y in zip(batch.x_support, batch.y_support, strict=True)
        ]
    )
    r = mse / mse.mean()
    np.testing.assert_allclose(elbo(taml, params, batch) - vm, 0.3 * np.mean(r * np.log(r)), rtol=1e-4)
    g = jax.grad(lambda p: elbo(taml, p, batch))(params)
    assert float(jnp.abs(g["theta.head.b"] - gm["theta.head.b"]).max()) > 1e-6  # it changes the gradient


def _classification_trace(reduction: bool, inner_steps: int | None = None):
    """The trace of TAML's entropy variant on a synthetic 3-way batch of 2 tasks (MLP 2-4-3)."""
    cfg = load_config(None, ["model.likelihood='categorical'", "model.net.hidden=[4]", "model.inner_steps=1"])
    p = TAML.Params(lam=0.5, measure="entropy", entropy_reduction=reduction)
    assert TAML.check(cfg.model, p) is None
    method = TAML.build(cfg.model, p, 2, 3)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    batch = TaskBatch(
        jax.random.normal(k[0], (2, 6, 2)),
        jax.random.randint(k[1], (2, 6), 0, 3),
        jax.random.normal(k[2], (2, 5, 2)),
        jax.random.randint(k[3], (2, 5), 0, 3),
        {},
    )
    tr = handlers.trace(handlers.seed(method.model, 0)).get_trace(batch, inner_steps=inner_steps)
    params = {s: v["value"] for s, v in tr.items() if v["type"] == "param"}
    theta = tree_from_params("theta", make_net(cfg.model.net, 2, 3).init, params)
    return tr, theta, batch, make_net(cfg.model.net, 2, 3)


def test_entropy_variant_by_hand_and_config_errors():
    """Without reduction R = -H(initial model's class probabilities on the query inputs), by hand, and
    the factor is -lam R; with reduction and no inner step the two entropies cancel."""
    tr, theta, batch, net = _classification_trace(False)
    before = entropy(jax.vmap(net.apply, (None, 0))(theta, batch.x_query))
    assert 0.0 < float(before) <= math.log(3)
    np.testing.assert_allclose(tr["taml_regularizer"]["value"], -before, rtol=1e-6)
    np.testing.assert_allclose(tr["taml"]["fn"].log_factor, 0.5 * before, rtol=1e-6)
    tr0, *_ = _classification_trace(True, inner_steps=0)
    np.testing.assert_allclose(tr0["taml_regularizer"]["value"], 0.0, atol=1e-6)
    tr1, *_ = _classification_trace(True)
    assert float(tr1["taml_regularizer"]["value"]) != float(tr["taml_regularizer"]["value"])
    with pytest.raises(ConfigError, match="categorical"):
        tiny_setup(TA, "model.params.measure='entropy'")
    with pytest.raises(ConfigError, match="alpha"):
        tiny_setup(TA, "model.params.measure='generalized_entropy'", "model.params.alpha=1.0")


def test_a_tiny_fit_on_the_sinusoid_lowers_the_loss(small_cfg):
    """200 meta-steps with the Theil regularizer (lam 0.1), MLP 16-16: the training loss falls by 30%."""
    cfg = small_cfg(TA, "model.inner_steps=2", "train.lr=5e-3", "train.meta_batch=16")
    fit_lowers_loss(cfg)
