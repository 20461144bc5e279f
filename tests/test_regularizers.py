"""MAML's regularizers: the Hutchinson Hessian penalty (METHODS 7), the trajectory correction (METHODS 6)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.util import log_density

from bayesmeta.adapt import adapt_tasks, split, trajectory_correction, unit
from bayesmeta.curvature import hessian_frobenius_sq, hvp
from bayesmeta.nets import MLP, make_net
from tests.helpers import elbo, tiny_setup, to64


def hand_net(cfg, params):
    net = make_net(cfg.model.net, 1, 1)
    theta = {lay: {w: params[f"theta.{lay}.{w}"] for w in "wb"} for lay in net.layer_names}

    def loss(p, x, y):
        return jnp.mean((net.apply(p, x) - y) ** 2)

    return net, theta, loss


# ---------------------------------------------------------------------------------------------- #
# Hutchinson estimate of ||H||_F^2 from Hessian-vector products


def tiny_problem():
    net = MLP(1, 1, (3,), "tanh")
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 1))
    y = jnp.sin(2 * x)

    def loss(p):
        return jnp.mean((net.apply(p, x) - y) ** 2)

    flat, unravel = ravel_pytree(params)
    hess = jax.hessian(lambda v: loss(unravel(v)))(flat)
    return loss, params, hess


def test_hvp_is_the_hessian_times_the_vector():
    with jax.enable_x64(True):
        loss, params, hess = tiny_problem()
        params = to64(params)
        hess = to64(jax.hessian(lambda v: loss(ravel_pytree(params)[1](v)))(ravel_pytree(params)[0]))
        v = jax.random.normal(jax.random.PRNGKey(2), (hess.shape[0],), jnp.float64)
        got = ravel_pytree(hvp(loss, params, ravel_pytree(params)[1](v)))[0]
        np.testing.assert_allclose(got, hess @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_estimate_matches_the_exact_frobenius_norm(kind):
    """The mean of n = 20,000 probes of ||H v||^2 lies within 4 standard errors of ||H||_F^2, where the
    standard error is the exact one: sqrt(2 ||H^2||_F^2 / n) for N(0, I) probes and
    sqrt(2 (||H^2||_F^2 - sum_i (H^2)_ii^2) / n) for Rademacher probes (quadratic forms v^T A v)."""
    with jax.enable_x64(True):
        loss, params, _ = tiny_problem()
        params = to64(params)
        flat, unravel = ravel_pytree(params)
        hess = np.asarray(jax.hessian(lambda v: loss(unravel(v)))(flat))
        exact = np.sum(hess**2)
        a = hess @ hess
        var = 2 * np.sum(a**2) - (2 * np.sum(np.diag(a) ** 2) if kind == "rademacher" else 0.0)
        n = 20000
        se = np.sqrt(var / n)
        est = float(hessian_frobenius_sq(loss, params, jax.random.PRNGKey(7), n, kind))
        assert se < 0.05 * exact  # the test has power: a 5% bias would be seen
        assert abs(est - exact) < 4 * se, (est, exact, se)
        # one probe is a single draw: finite, non-negative, and not the exact value
        one = float(hessian_frobenius_sq(loss, params, jax.random.PRNGKey(8), 1, kind))
        assert 0 <= one and one != pytest.approx(exact, rel=1e-6)


def test_hessian_reg_zero_is_plain_maml_exactly():
    _, plain, batch, params = tiny_setup()
    _, reg0, _, _ = tiny_setup("model.params.hessian_reg=0.0", "model.params.hessian_probes=3")
    np.testing.assert_array_equal(elbo(plain, params, batch), elbo(reg0, params, batch))


class KeySpy(numpyro.primitives.Messenger):
    """Records the keys handed out by numpyro.prng_key()."""

    def __init__(self, fn=None):
        self.keys = []
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] == "prng_key":
            self.keys.append(msg["value"])


def test_hessian_reg_adds_lambda_times_the_same_key_estimate_to_the_elbo():
    """loss(lambda) - loss(0) = lambda * mean_i est_i, where est_i is the Hutchinson estimate at the
    adapted phi_i on task i's support set, with the probes of the model's own PRNG stream. Trace_ELBO
    seeds the model with the first half of split(key) (numpyro's convention), which the test replays."""
    lam, probes = 0.05, 2
    cfg, plain, batch, params = tiny_setup()
    _, reg, _, _ = tiny_setup(f"model.params.hessian_reg={lam}", f"model.params.hessian_probes={probes}")
    key = jax.random.PRNGKey(11)
    with jax.enable_x64(True):
        params, batch = to64(params), to64(batch)
        diff = float(elbo(reg, params, batch, key) - elbo(plain, params, batch, key))
        spy = KeySpy(reg.model)

        @jax.jit
        def site(params, batch):
            _, tr = log_density(numpyro.handlers.seed(spy, jax.random.split(key)[0]), (batch,), {}, params)
            return tr["hessian_fro2"]["value"], spy.keys[-1]

        est, model_key = site(params, batch)
        est = np.asarray(est)
        assert est.shape == (3,) and np.all(est > 0)
        np.testing.assert_allclose(diff, lam * est.mean(), rtol=1e-10)
        # the site is the estimator on the hand-adapted phi_i with the key the model drew
        _, theta, loss = hand_net(cfg, params)
        phi, _ = adapt_tasks(loss, theta, batch.x_support, batch.y_support, steps=2, lr=0.3)
        hand = jax.jit(
            jax.vmap(lambda p, x, y, k: hessian_frobenius_sq(lambda q: loss(q, x, y), p, k, probes))
        )(phi, batch.x_support, batch.y_support, jax.random.split(model_key, 3))
        np.testing.assert_allclose(est, hand, rtol=1e-10)
        # a different ELBO key draws different probes
        other = float(elbo(reg, params, batch, jax.random.PRNGKey(12)) - elbo(plain, params, batch, key))
        assert abs(other - diff) > 1e-8 * abs(diff)


def test_hessian_reg_trains_under_svi_and_leaves_predictive_unchanged():
    """It is a training objective: the gradient SVI follows carries the penalty's own gradient (through
    phi_i and its second-order adaptation, not a stop-gradient), so the autodiff derivative of
    loss(lambda) - loss(0) along each layer equals its central finite difference (the probes are fixed
    by the key); jit-compiled SVI steps run and lower the penalised loss; Predictive (query labels
    withheld) never computes it and predicts as MAML with the same parameters."""
    _, plain, batch, init = tiny_setup(tasks=8)
    _, reg, _, _ = tiny_setup("model.params.hessian_reg=0.01", tasks=8)
    key, eps = jax.random.PRNGKey(5), 1e-6  # truncation error ~1e-8 relative here
    with jax.enable_x64(True):
        p64, b64 = to64(init), to64(batch)
        pen = jax.jit(jax.value_and_grad(lambda p: elbo(reg, p, b64, key) - elbo(plain, p, b64, key)))
        value, grad = pen(p64)
        assert float(value) > 0 and set(grad) == set(p64)
        rng = np.random.default_rng(0)
        for k in sorted(p64):  # one direction per layer leaf: the penalty reaches every one
            v = rng.standard_normal(p64[k].shape)
            fd = (pen({**p64, k: p64[k] + eps * v})[0] - pen({**p64, k: p64[k] - eps * v})[0]) / (2 * eps)
            ad = float(jnp.sum(grad[k] * v))
            assert abs(ad) > 1e-4 * float(value), (k, ad)
            np.testing.assert_allclose(ad, float(fd), rtol=1e-6, err_msg=k)
    svi = SVI(reg.model, reg.guide, optax.adam(1e-2), Trace_ELBO())
    state = jax.jit(svi.init)(jax.random.PRNGKey(3), batch)
    state, losses = jax.jit(lambda s: jax.lax.scan(lambda s, _: svi.update(s, batch), s, None, length=40))(
        state
    )
    assert np.all(np.isfinite(losses)) and losses[-5:].mean() < losses[:5].mean()
    params = svi.get_params(state)

    def f(method):
        pred = Predictive(
            lambda b: method.model(b, inner_steps=3, training=False), params=params, num_samples=2
        )
        return pred(jax.random.PRNGKey(0), batch._replace(y_query=None))

    a, b = f(plain), f(reg)
    np.testing.assert_array_equal(a["f"], b["f"])
    np.testing.assert_array_equal(a["y"], b["y"])
    with pytest.raises(ValueError, match="seed"):
        numpyro.infer.util.log_density(reg.model, (batch,), {}, params)


# ---------------------------------------------------------------------------------------------- #
# Trajectory regularizer


def test_identical_trajectories_get_no_correction():
    theta = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}
    step = {"a": jnp.array([0.3, -0.1]), "b": jnp.array([0.2])}
    phi = jax.tree.map(lambda t, s: jnp.stack([t + s, t + s, t + s]), theta, step)
    out = trajectory_correction(theta, phi, 0.5)
    for k in theta:
        np.testing.assert_allclose(out[k], phi[k], atol=1e-6)


def test_orthogonal_trajectories_move_towards_the_mean_direction():
    """theta = 0, phi_1 = 2 e_1, phi_2 = e_2: theta_mu = (e_1 + e_2) / 2; each corrected phi_i has a
    larger cosine to theta_mu, by the closed form phi_i + gamma (theta_mu - (d_i.theta_mu) d_i) / |u_i|."""
    theta = {"w": jnp.zeros(3)}
    phi = {"w": jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    gamma = 0.5
    out = trajectory_correction(theta, phi, gamma)["w"]
    mu = np.array([0.5, 0.5, 0.0])

    def cos(v):
        return v @ mu / np.linalg.norm(v) / np.linalg.norm(mu)

    for i in range(2):
        assert cos(np.asarray(out[i])) > cos(np.asarray(phi["w"][i])) + 0.01
        u = np.asarray(phi["w"][i])
        d = u / np.linalg.norm(u)
        np.testing.assert_allclose(out[i], u + gamma * (mu - (d @ mu) * d) / np.linalg.norm(u), rtol=1e-6)


def test_holding_theta_mu_constant_in_grad_omega_changes_nothing():
    """We hold theta_mu fixed in grad_phi_i Omega_i. Differentiating it too (it contains d_i / T) gives
    the same gradient: that extra term is -J_i^T d_i / T with J_i the Jacobian of the unit vector d_i,
    and J_i^T d_i = grad (|d_i|^2 / 2) = 0. The test checks this on three generic trajectories."""
    theta = {"w": jnp.array([0.1, -0.2, 0.0])}
    phi = {"w": jnp.array([[2.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.3, 0.3, 1.0]])}
    gamma = 0.5
    out = trajectory_correction(theta, phi, gamma)["w"]
    u = phi["w"] - theta["w"]
    mu = jax.vmap(unit)(u).mean(0)

    def omega_full(u_i, i):
        return -unit(u_i) @ jax.vmap(unit)(u.at[i].set(u_i)).mean(0)

    def omega_fixed(u_i):
        return -unit(u_i) @ mu

    for i in range(3):
        full = phi["w"][i] - gamma * jax.grad(omega_full)(u[i], i)
        fixed = phi["w"][i] - gamma * jax.grad(omega_fixed)(u[i])
        np.testing.assert_allclose(out[i], fixed, rtol=1e-6)
        np.testing.assert_allclose(full, fixed, rtol=1e-6)
        assert float(jnp.max(jnp.abs(fixed - phi["w"][i]))) > 1e-2  # and the correction is not zero


def test_a_task_that_did_not_move_is_left_alone_and_gradients_stay_finite():
    theta = {"w": jnp.array([1.0, -1.0])}
    phi = {"w": jnp.array([[1.0, -1.0], [2.0, -1.0]])}  # task 0: phi = theta
    out = trajectory_correction(theta, phi, 0.5)
    np.testing.assert_array_equal(out["w"][0], phi["w"][0])
    g = jax.grad(lambda t: jnp.sum(trajectory_correction(t, phi, 0.5)["w"] ** 2))(theta)
    assert np.all(np.isfinite(g["w"]))


def test_trajectory_reg_zero_is_plain_maml_and_positive_uses_the_corrected_parameters():
    cfg, plain, batch, params = tiny_setup()
    _, zero, _, _ = tiny_setup("model.params.trajectory_reg=0.0")
    _, reg, _, _ = tiny_setup("model.params.trajectory_reg=0.5")
    np.testing.assert_array_equal(elbo(plain, params, batch), elbo(zero, params, batch))
    with jax.enable_x64(True):
        params, batch = to64(params), to64(batch)
        net, theta, loss = hand_net(cfg, params)
        phi, _ = adapt_tasks(loss, theta, batch.x_support, batch.y_support, steps=2, lr=0.3)
        phi_hat = trajectory_correction(theta, phi, 0.5)
        mse = jnp.mean((jax.vmap(net.apply)(phi_hat, batch.x_query) - batch.y_query) ** 2)
        const = np.log(np.sqrt(0.5) * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(float(elbo(reg, params, batch)), float(mse) + const, rtol=1e-10)
        assert abs(float(elbo(reg, params, batch)) - float(elbo(plain, params, batch))) > 1e-3
        # prediction is per task (no coupling of test tasks through theta_mu): MAML's prediction
        pred = [
            Predictive(partial(m.model, training=False), params=params, num_samples=1)(
                jax.random.PRNGKey(0), batch._replace(y_query=None)
            )
            for m in (plain, reg)
        ]
        np.testing.assert_array_equal(pred[0]["f"], pred[1]["f"])
    # head-only adaptation corrects the head only: by hand, the head adapts with the body held at theta
    # (a loss over the head alone, so split() is not used), the correction acts on the head subtree
    # (theta's head -> each task's adapted head), and the body enters the query likelihood unchanged
    hcfg, head, hbatch, hparams = tiny_setup("model.params.trajectory_reg=0.5", "model.adapt='head'")
    _, head0, _, _ = tiny_setup("model.adapt='head'")
    assert split({"layer_0": 0, "head": 1}, "head") == ({"head": 1}, {"layer_0": 0})
    with jax.enable_x64(True):
        hparams, hbatch = to64(hparams), to64(hbatch)
        net, theta, loss = hand_net(hcfg, hparams)
        body = {k: v for k, v in theta.items() if k != "head"}
        assert set(body) == {"layer_0"}

        def head_loss(h, x, y):
            return loss({**body, "head": h}, x, y)

        h_phi, _ = adapt_tasks(head_loss, theta["head"], hbatch.x_support, hbatch.y_support, steps=2, lr=0.3)
        h_hat = trajectory_correction(theta["head"], h_phi, 0.5)
        assert float(jnp.max(jnp.abs(h_hat["w"] - h_phi["w"]))) > 1e-3  # the correction is not zero

        def query_loss(heads):
            f = jax.vmap(lambda h, x: net.apply({**body, "head": h}, x))(heads, hbatch.x_query)
            return float(jnp.mean((f - hbatch.y_query) ** 2)) + const

        got = float(elbo(head, hparams, hbatch))
        np.testing.assert_allclose(got, query_loss(h_hat), rtol=1e-10)
        # and it is not the head-only loss without the correction (trajectory_reg = 0)
        np.testing.assert_allclose(float(elbo(head0, hparams, hbatch)), query_loss(h_phi), rtol=1e-10)
        assert abs(got - query_loss(h_phi)) > 1e-4
