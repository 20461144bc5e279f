"""Learned inner learning rates (MAML++ per layer and step, Meta-SGD per entry) as numpyro.param sites."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer import SVI, Predictive, Trace_ELBO

from bayesmeta.adapt import adapt_tasks, extend_steps, gradient_descent
from bayesmeta.config import ConfigError
from bayesmeta.nets import make_net
from tests.helpers import elbo, tiny_setup, to64


def test_rates_beyond_the_learned_steps_reuse_the_last_step():
    """Step t uses rate min(t, n - 1): 4 steps with learned rates (a, b) run a, b, b, b; 1 step runs a."""
    np.testing.assert_array_equal(extend_steps(jnp.array([1.0, 2.0]), 4), [1.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(extend_steps(jnp.array([1.0, 2.0]), 1), [1.0])
    assert extend_steps(jnp.array([1.0, 2.0]), 0).shape == (0,)

    def loss(p, x, y):
        return 0.5 * jnp.sum(p["w"] ** 2)

    # w <- w (1 - r_t): 1 * (1 - 0.5) * (1 - 0.25)^3
    phi, _ = gradient_descent(
        loss, {"w": jnp.array([1.0])}, None, None, steps=4, lr={"w": jnp.array([0.5, 0.25])}
    )
    np.testing.assert_allclose(phi["w"], [0.5 * 0.75**3], rtol=1e-6)
    # Meta-SGD's single row serves every step
    phi, _ = gradient_descent(
        loss, {"w": jnp.array([1.0])}, None, None, steps=3, lr={"w": jnp.array([[0.5]])}
    )
    np.testing.assert_allclose(phi["w"], [0.125], rtol=1e-6)


@pytest.mark.parametrize("kind", ["per_layer_step", "meta_sgd"])
def test_learned_rates_at_their_init_give_fixed_rate_maml_exactly(kind):
    """Default lr_init = model.inner_lr: the same loss bit for bit, at training and at test-time steps."""
    _, plain, batch, params = tiny_setup()
    _, learned, _, lparams = tiny_setup(f"model.params.learned_lr='{kind}'")
    rates = {k: v for k, v in lparams.items() if k.startswith("inner_lr.")}
    assert rates and all(np.all(np.asarray(v) == np.float32(0.3)) for v in rates.values())
    assert {k: v for k, v in lparams.items() if k not in rates}.keys() == params.keys()
    np.testing.assert_array_equal(elbo(plain, params, batch), elbo(learned, {**params, **rates}, batch))
    for steps in (1, 5):  # test time: fewer and more steps than the 2 learned ones

        def f(method, p, steps=steps):
            pred = Predictive(lambda b: method.model(b, inner_steps=steps), params=p, num_samples=1)
            return pred(jax.random.PRNGKey(0), batch._replace(y_query=None))["f"]

        np.testing.assert_array_equal(f(plain, params), f(learned, {**params, **rates}))


def test_sites_have_the_documented_shapes_and_a_custom_init():
    _, _, _, p = tiny_setup("model.params.learned_lr='per_layer_step'", "model.params.lr_init=0.04")
    rates = {k: v for k, v in p.items() if k.startswith("inner_lr.")}
    assert sorted(rates) == [f"inner_lr.{layer}.{leaf}" for layer in ("head", "layer_0") for leaf in "bw"]
    assert all(v.shape == (2,) and np.allclose(v, 0.04) for v in rates.values())  # (inner steps,) per tensor
    _, _, _, p = tiny_setup("model.params.learned_lr='meta_sgd'", "model.adapt='head'")
    rates = {k: v.shape for k, v in p.items() if k.startswith("inner_lr.")}
    assert rates == {"inner_lr.head.w": (1, 3, 1), "inner_lr.head.b": (1, 1)}  # per entry, adapted part only


def test_test_time_steps_use_the_learned_rates_then_repeat_the_last():
    """With distinct learned per-step rates, 4 test-time steps equal GD with rates (r0, r1, r1, r1)."""
    cfg, method, batch, params = tiny_setup("model.params.learned_lr='per_layer_step'")
    rng = np.random.default_rng(0)
    params = {
        k: (rng.uniform(0.05, 0.4, v.shape) if k.startswith("inner_lr.") else v) for k, v in params.items()
    }
    with jax.enable_x64(True):
        params, batch = to64(params), to64(batch)
        pred = Predictive(lambda b: method.model(b, inner_steps=4), params=params, num_samples=1)
        f = pred(jax.random.PRNGKey(0), batch._replace(y_query=None))["f"][0]
        net = make_net(cfg.model.net, 1, 1)
        theta = {lay: {w: params[f"theta.{lay}.{w}"] for w in "wb"} for lay in net.layer_names}
        rates = {
            lay: {w: params[f"inner_lr.{lay}.{w}"][jnp.array([0, 1, 1, 1])] for w in "wb"} for lay in theta
        }

        def loss(p, x, y):
            return jnp.mean((net.apply(p, x) - y) ** 2)

        phi, _ = adapt_tasks(loss, theta, batch.x_support, batch.y_support, steps=4, lr=rates)
        np.testing.assert_allclose(f, jax.vmap(net.apply)(phi, batch.x_query), rtol=1e-12)


@pytest.mark.parametrize("kind", ["per_layer_step", "meta_sgd"])
def test_meta_gradient_with_respect_to_a_rate_matches_finite_differences(kind):
    _, method, batch, params = tiny_setup(f"model.params.learned_lr='{kind}'")
    with jax.enable_x64(True):
        params, batch = to64(params), to64(batch)
        grads = jax.grad(lambda p: elbo(method, p, batch))(params)
        eps = 1e-6
        for name in ("inner_lr.layer_0.w", "inner_lr.head.b"):
            flat = np.asarray(params[name]).ravel()
            for i in range(min(2, flat.size)):

                def shifted(delta, name=name, i=i, flat=flat):
                    v = flat.copy()
                    v[i] += delta
                    return float(
                        elbo(method, {**params, name: jnp.asarray(v.reshape(params[name].shape))}, batch)
                    )

                fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
                g = np.asarray(grads[name]).ravel()[i]
                assert abs(g) > 1e-6
                np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-10)


def test_a_short_fit_moves_the_rates_and_lowers_the_loss():
    """Unconstrained rates follow the meta-gradient: one SGD step of SVI moves every rate by exactly
    -lr times the ELBO's gradient in it (no constraining transform between the site and the optimizer,
    no stop-gradient), and after 60 Adam steps they differ from their init and the loss is lower."""
    _, method, batch, init = tiny_setup("model.params.learned_lr='per_layer_step'", tasks=8)
    names = [f"inner_lr.{layer}.{leaf}" for layer in ("head", "layer_0") for leaf in "bw"]
    lr = 0.05
    with jax.enable_x64(True):
        b64 = to64(batch)
        sgd = SVI(method.model, method.guide, optax.sgd(lr), Trace_ELBO())
        state = jax.jit(lambda b, p: sgd.init(jax.random.PRNGKey(3), b, init_params=p))(b64, to64(init))
        before = sgd.get_params(state)
        assert sorted(k for k in before if k.startswith("inner_lr.")) == names
        assert all(before[k].dtype == jnp.float64 for k in names)
        grads = jax.grad(lambda p: elbo(method, p, b64))(before)
        state, loss = jax.jit(sgd.update)(state, b64)
        after = sgd.get_params(state)
        np.testing.assert_allclose(loss, elbo(method, before, b64), rtol=1e-12)
        for k in names:
            assert float(jnp.max(jnp.abs(grads[k]))) > 1e-3, k
            np.testing.assert_allclose(after[k] - before[k], -lr * grads[k], rtol=1e-9, atol=1e-14, err_msg=k)
    svi = SVI(method.model, method.guide, optax.adam(1e-2), Trace_ELBO())
    state = jax.jit(svi.init)(jax.random.PRNGKey(3), batch)
    start = svi.evaluate(state, batch)
    state, _ = jax.lax.scan(lambda s, _: svi.update(s, batch), state, None, length=60)
    rates = {k: v for k, v in svi.get_params(state).items() if k.startswith("inner_lr.")}
    assert sorted(rates) == names
    assert all(float(jnp.max(jnp.abs(v - 0.3))) > 1e-3 for v in rates.values())
    assert float(svi.evaluate(state, batch)) < float(start)


def test_learned_rates_need_training_steps():
    with pytest.raises(ConfigError, match=r"learned_lr.*inner_steps >= 1"):
        tiny_setup("model.params.learned_lr='meta_sgd'", "model.inner_steps=0")
    with pytest.raises(ConfigError, match="learned_lr"):
        tiny_setup("model.params.learned_lr='per_tensor'")
