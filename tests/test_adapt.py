"""The inner loop's maths: Grant et al.'s identity, meta-gradients, first- vs second-order."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer import Trace_ELBO

from bayesmeta import registry
from bayesmeta.adapt import adapt_tasks, gradient_descent, split
from bayesmeta.likelihoods import Gaussian
from bayesmeta.registry import build_method, make_family
from tests.helpers import TINY


def _linear_problem(seed=0, n=12, d=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, 1))
    theta = rng.normal(size=(d, 1))
    return x, y, theta


@pytest.mark.parametrize("k", [1, 3, 10])
def test_grant_identity_k_steps_equal_map_under_implicit_gaussian_prior(k):
    """k GD steps from theta with B = alpha I on linear regression equal the MAP estimate under
    N(phi; theta, Q), Q = O L^-1 ((I - alpha L)^-k - I) O^T (Grant et al. 2018, METHODS 1)."""
    with jax.enable_x64(True):
        x, y, theta = _linear_problem()
        lik = Gaussian(sd=0.8)
        n = x.shape[0]
        alpha = 0.05

        def loss(p, xx, yy):
            return lik.loss(xx @ p["w"], yy)

        phi, _ = gradient_descent(
            loss, {"w": jnp.asarray(theta)}, jnp.asarray(x), jnp.asarray(y), steps=k, lr=alpha
        )
        h = 2 * x.T @ x / n  # Hessian of the inner loss, the MSE
        lam, o = np.linalg.eigh(h)
        assert np.all(alpha * lam < 1) and np.all(lam > 0)
        q = o @ np.diag(((1 - alpha * lam) ** (-k) - 1) / lam) @ o.T
        q_inv = np.linalg.inv(q)
        b = 2 * x.T @ y / n
        phi_map = np.linalg.solve(h + q_inv, b + q_inv @ theta)
        np.testing.assert_allclose(np.asarray(phi["w"]), phi_map, rtol=1e-10, atol=1e-12)
        # and the identity is not vacuous: the adapted parameters moved away from theta
        assert np.linalg.norm(phi_map - theta) > 1e-2


def _tiny(first_order=False, steps=2, adapt="all"):
    cfg = registry.load_config(
        None,
        [
            "model.net.hidden=[3]",
            "model.net.activation='tanh'",
            f"model.inner_steps={steps}",
            "model.inner_lr=0.3",
            f"model.first_order={str(first_order).lower()}",
            f"model.adapt='{adapt}'",
            "task.shots=4",
            "task.queries=3",
        ],
    )
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    net_init = jax.random.PRNGKey(3)
    batch = fam.sample(jax.random.PRNGKey(4), 2)
    return cfg, method, batch, net_init


def _svi_loss_and_params(method, batch, key):
    import optax
    from numpyro.infer import SVI

    svi = SVI(method.model, method.guide, optax.sgd(0.0), Trace_ELBO())
    state = svi.init(key, batch)
    params = svi.get_params(state)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), batch)

        def loss(p):
            return Trace_ELBO().loss(jax.random.PRNGKey(0), p, method.model, method.guide, batch)

        return loss, params, batch


def _hand_maml(params):
    """The tiny network of `_tiny` written by hand: (net, likelihood, theta pytree, task loss)."""
    from bayesmeta.nets import make_net

    cfg = registry.load_config(None, ["model.net.hidden=[3]", "model.net.activation='tanh'"])
    net = make_net(cfg.model.net, 1, 1)
    lik = Gaussian(cfg.model.noise_sd)
    theta = {
        layer: {leaf: params[f"theta.{layer}.{leaf}"] for leaf in ("w", "b")} for layer in net.layer_names
    }

    def task_loss(p, xx, yy):
        return lik.loss(net.apply(p, xx), yy)

    return net, lik, theta, task_loss


def test_svi_loss_is_the_mean_query_loss_of_the_adapted_networks():
    """The engine's objective for MAML is mean_i L(phi_i, D*_i) + log(sd sqrt(2 pi)) per point."""
    _, method, batch, key = _tiny()
    loss, params, batch = _svi_loss_and_params(method, batch, key)
    with jax.enable_x64(True):
        net, lik, theta, task_loss = _hand_maml(params)
        phi, _ = adapt_tasks(task_loss, theta, batch.x_support, batch.y_support, steps=2, lr=0.3)
        pred = jax.vmap(net.apply)(phi, batch.x_query)
        mse = jnp.mean((pred - batch.y_query) ** 2)
        const = np.log(lik.sd * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(float(loss(params)), float(mse) + const, rtol=1e-12)


def test_second_order_meta_gradient_matches_finite_differences():
    _, method, batch, key = _tiny()
    loss, params, _ = _svi_loss_and_params(method, batch, key)
    with jax.enable_x64(True):
        grads = jax.grad(loss)(params)
        rng = np.random.default_rng(0)
        eps = 1e-6
        for name in sorted(params):
            flat = np.asarray(params[name]).ravel()
            for i in rng.choice(flat.size, size=min(3, flat.size), replace=False):

                def shifted(delta, name=name, i=i, flat=flat):
                    v = flat.copy()
                    v[i] += delta
                    return float(loss({**params, name: jnp.asarray(v.reshape(params[name].shape))}))

                fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
                np.testing.assert_allclose(np.asarray(grads[name]).ravel()[i], fd, rtol=1e-5, atol=1e-9)


def test_first_order_drops_second_derivatives():
    """FOMAML's meta-gradient is mean_i grad_phi L(phi_i, D*_i); it differs from MAML's, and equals it
    when there are no inner steps."""
    _, so, batch, key = _tiny(first_order=False)
    _, fo, _, _ = _tiny(first_order=True)
    loss_so, params, batch64 = _svi_loss_and_params(so, batch, key)
    loss_fo, _, _ = _svi_loss_and_params(fo, batch, key)
    with jax.enable_x64(True):
        g_so, g_fo = jax.grad(loss_so)(params), jax.grad(loss_fo)(params)
        np.testing.assert_allclose(float(loss_so(params)), float(loss_fo(params)), rtol=1e-12)
        diff = max(float(jnp.max(jnp.abs(g_so[k] - g_fo[k]))) for k in params)
        scale = max(float(jnp.max(jnp.abs(g_so[k]))) for k in params)
        assert diff > 1e-2 * scale

        # FO gradient == the query-loss gradient at the adapted parameters, averaged over tasks
        net, _, theta, task_loss = _hand_maml(params)
        phi, _ = adapt_tasks(task_loss, theta, batch64.x_support, batch64.y_support, steps=2, lr=0.3)
        g_phi = jax.vmap(jax.grad(task_loss))(phi, batch64.x_query, batch64.y_query)
        for layer in net.layer_names:
            for leaf in ("w", "b"):
                np.testing.assert_allclose(
                    g_fo[f"theta.{layer}.{leaf}"], jnp.mean(g_phi[layer][leaf], 0), rtol=1e-9, atol=1e-12
                )

    _, so0, _, _ = _tiny(first_order=False, steps=0)
    _, fo0, _, _ = _tiny(first_order=True, steps=0)
    l0, p0, _ = _svi_loss_and_params(so0, batch, key)
    l1, _, _ = _svi_loss_and_params(fo0, batch, key)
    with jax.enable_x64(True):
        for k, v in jax.grad(l0)(p0).items():
            np.testing.assert_allclose(v, jax.grad(l1)(p0)[k], rtol=1e-12)


def test_head_only_adaptation_leaves_the_body_untouched():
    key = jax.random.PRNGKey(0)
    from bayesmeta.nets import MLP

    net = MLP(1, 1, (5,))
    theta = net.init(key)
    x = jax.random.normal(key, (6, 1))
    y = jnp.sin(x)

    def loss(p, xx, yy):
        return Gaussian(0.5**0.5).loss(net.apply(p, xx), yy)

    phi, losses = gradient_descent(loss, theta, x, y, steps=3, lr=0.1, adapt="head")
    np.testing.assert_array_equal(phi["layer_0"]["w"], theta["layer_0"]["w"])
    assert not np.allclose(phi["head"]["w"], theta["head"]["w"])
    assert losses.shape == (3,) and losses[-1] < losses[0]
    fast, slow = split(theta, "head")
    assert set(fast) == {"head"} and set(slow) == {"layer_0"}
    with pytest.raises(ValueError, match="adapt"):
        split(theta, "body")


def test_per_step_rates_as_a_pytree():
    """A rate pytree with a leading steps axis (learned per-layer, per-step rates) is honoured."""
    theta = {"w": jnp.array([1.0])}

    def loss(p, x, y):
        return 0.5 * jnp.sum(p["w"] ** 2)

    rates = {"w": jnp.array([0.5, 0.0, 0.25])}
    phi, _ = gradient_descent(loss, theta, None, None, steps=3, lr=rates)
    # w <- w (1 - a_t) each step: 1 * 0.5 * 1.0 * 0.75
    np.testing.assert_allclose(phi["w"], [0.375], rtol=1e-6)


def test_gaussian_prior_adds_the_scaled_l2_penalty():
    """model.prior_scale = s adds -log N(theta; 0, s^2) / (T Q) to the loss: MAP instead of ML-II."""
    _, method, batch, key = _tiny()
    cfg = registry.load_config(
        None,
        [*TINY, "model.prior_scale=0.5"],
    )
    fam = make_family(cfg.task)
    with_prior = build_method(cfg.model, fam.x_dim, fam.y_dim)
    loss, params, _ = _svi_loss_and_params(method, batch, key)
    loss_p, _, _ = _svi_loss_and_params(with_prior, batch, key)
    with jax.enable_x64(True):
        sq = sum(float(jnp.sum(v**2)) for v in params.values())
        n = batch.x_query.shape[0] * batch.x_query.shape[1]
        np.testing.assert_allclose(
            float(loss_p(params)) - float(loss(params)), 0.5 * sq / 0.25 / n, rtol=1e-10
        )


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "sqrt"])
def test_rematerialised_inner_loop_gives_the_same_meta_gradient(policy):
    """model.remat changes memory, not maths: loss and second-order meta-gradient are unchanged."""
    base = ["model.net.hidden=[8, 8]", "model.inner_steps=6", "model.inner_lr=0.05", "task.shots=5"]
    plain = run_setup(base)
    remat = run_setup([*base, f"model.remat='{policy}'"])
    batch = plain.family.sample(jax.random.PRNGKey(0), 4)
    loss_plain, params, _ = _svi_loss_and_params(plain.method, batch, jax.random.PRNGKey(1))
    loss_remat, _, _ = _svi_loss_and_params(remat.method, batch, jax.random.PRNGKey(1))
    with jax.enable_x64(True):
        np.testing.assert_allclose(float(loss_plain(params)), float(loss_remat(params)), rtol=1e-12)
        g0, g1 = jax.grad(loss_plain)(params), jax.grad(loss_remat)(params)
        for k in g0:
            np.testing.assert_allclose(g0[k], g1[k], rtol=1e-10, atol=1e-14)
    # and the compiled backward pass keeps less: XLA's temporary buffers shrink
    step = partial(_temp_bytes, batch=batch)
    assert step(remat) < step(plain)


def run_setup(overrides):
    from bayesmeta import run

    return run.Setup.from_config(registry.load_config(None, overrides))


def _temp_bytes(setup, batch):
    from numpyro.infer import SVI

    svi = SVI(setup.method.model, setup.method.guide, optax.adam(1e-3), Trace_ELBO())
    state = jax.jit(svi.init)(jax.random.PRNGKey(0), batch)
    compiled = jax.jit(svi.update).lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("steps", [0, 1, 7, 10])
def test_sqrt_segments_pad_without_changing_the_trajectory(steps):
    """The sqrt(n) segmented scan (with padding steps when n is not a multiple of the segment) gives
    the plain scan's adapted parameters and per-step losses, and the same gradient."""
    from bayesmeta.nets import MLP

    net = MLP(1, 1, (6,), "tanh")
    theta = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 1))
    y = jnp.sin(x)

    def loss(p, xx, yy):
        return Gaussian(0.5**0.5).loss(net.apply(p, xx), yy)

    def final(th, remat):
        phi, losses = gradient_descent(loss, th, x, y, steps=steps, lr=0.1, remat=remat)
        return jnp.sum(net.apply(phi, x) ** 2), (phi, losses)

    (_, (p0, l0)), g0 = jax.value_and_grad(final, has_aux=True)(theta, "none")
    (_, (p1, l1)), g1 = jax.value_and_grad(final, has_aux=True)(theta, "sqrt")
    assert l1.shape == (steps,)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((p0, g0)), jax.tree.leaves((p1, g1)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_inner_clip_scales_the_gradient_to_its_norm_and_bounds_every_inner_step():
    """clip_norm takes a gradient of norm 5 to norm c < 5 and leaves it for c = 0 or c >= 5; an inner loop
    with clip c moves at most lr * c per step where the unclipped one (lr x curvature 10 > 2) diverges;
    model.inner_clip reaches InnerLoop."""
    from bayesmeta.adapt import InnerLoop, clip_norm

    g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    np.testing.assert_allclose(jnp.concatenate(list(clip_norm(g, 1.0).values())), [0.6, 0.8], rtol=1e-6)
    for c in (0.0, 5.0, 50.0):
        np.testing.assert_allclose(jnp.concatenate(list(clip_norm(g, c).values())), [3.0, 4.0])

    def steep(p, x, y):  # curvature 10 per coordinate: GD at lr 0.3 multiplies the error by -2 per step
        return 5.0 * jnp.sum(jnp.square(p["w"] - y))

    theta, y = {"w": jnp.zeros(2)}, jnp.array([3.0, -4.0])
    clipped, _ = gradient_descent(steep, theta, None, y, steps=6, lr=0.3, clip=1.0)
    assert float(jnp.linalg.norm(clipped["w"])) <= 6 * 0.3 * 1.0 + 1e-5
    free, losses = gradient_descent(steep, theta, None, y, steps=6, lr=0.3)
    assert float(jnp.linalg.norm(free["w"] - y)) > 100 and losses[-1] > losses[0]
    cfg = registry.load_config(None, ["model.inner_clip=2.5"])
    assert InnerLoop.from_config(cfg.model).clip == 2.5


def test_inner_clip_reaches_svgd_particles_and_the_vi_steps():
    """BMAML's SVGD clips each particle's grad log p (one particle: the step is lr times the clipped
    gradient); the neural prior's VI steps move at most lr * clip per step."""
    from bayesmeta.models.bmaml import svgd
    from bayesmeta.models.neural_prior import vi_steps

    def log_p(z):  # grad log p = -100 z: norm 100 ||z||
        return -50.0 * jnp.sum(jnp.square(z))

    x0 = jnp.array([[3.0, 4.0]])  # one particle: SVGD is gradient ascent on log p
    np.testing.assert_allclose(svgd(log_p, x0, 1, 0.1, clip=2.0), x0 - 0.1 * 2.0 * x0 / 5.0, rtol=1e-5)
    np.testing.assert_allclose(svgd(log_p, x0, 1, 0.001), x0 - 0.001 * 100 * x0, rtol=1e-5)

    def objective(q, x, e, y):
        return 500.0 * jnp.sum(jnp.square(q["m"] - y))

    q = vi_steps(
        objective, {"m": jnp.zeros(3)}, None, jnp.array([1.0, -2.0, 3.0]), jnp.zeros((4, 1)), 0.01, clip=2.0
    )
    assert float(jnp.linalg.norm(q["m"])) <= 4 * 0.01 * 2.0 + 1e-6


@pytest.mark.parametrize("remat", ["none", "sqrt", "dots_saveable"])
def test_one_inner_step_is_the_hand_written_step_and_its_meta_gradient(remat):
    """steps = 1 runs without a scan: phi = theta - alpha grad L(theta), and d/dtheta of a loss at phi
    matches the same maths written by hand, under every remat setting."""
    w = {"w": jnp.array([0.3, -0.2]), "b": jnp.array(0.1)}
    x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.3]])
    y = jnp.array([1.0, 0.0, 2.0])

    def loss(p, a, b):
        return jnp.mean((a @ p["w"] + p["b"] - b) ** 2)

    def by_hand(p):
        return jax.tree.map(lambda t, g: t - 0.1 * g, p, jax.grad(loss)(p, x, y))

    phi, losses = gradient_descent(loss, w, x, y, steps=1, lr=0.1, remat=remat)
    np.testing.assert_allclose(losses, [loss(w, x, y)], rtol=1e-6)
    for k in w:
        np.testing.assert_allclose(phi[k], by_hand(w)[k], rtol=1e-6)
    meta = jax.grad(
        lambda p: loss(gradient_descent(loss, p, x, y, steps=1, lr=0.1, remat=remat)[0], y[:, None] * x, y)
    )(w)
    hand = jax.grad(lambda p: loss(by_hand(p), y[:, None] * x, y))(w)
    for k in w:
        np.testing.assert_allclose(meta[k], hand[k], rtol=1e-5)


def test_reference_init_is_a_normal_truncated_at_two_sd():
    """model.net.init_sd = 0.01: the reference code's tf.truncated_normal(stddev=0.01), every weight
    within 2 sd and the sd of a normal truncated there (0.880 sd); biases zero; 0 keeps Glorot."""
    cfg = registry.load_config(None, ["model.net.init_sd=0.01", "model.net.hidden=[200, 200]"])
    from bayesmeta.nets import make_net

    params = make_net(cfg.model.net, 1, 1).init(jax.random.PRNGKey(0))
    w = np.asarray(params["layer_1"]["w"])
    assert np.abs(w).max() <= 0.02 and abs(w.std() / 0.01 - 0.880) < 0.01
    assert not np.any(np.asarray(params["layer_1"]["b"]))
    glorot = make_net(registry.load_config(None, ["model.net.hidden=[200, 200]"]).model.net, 1, 1)
    glorot_sd = np.sqrt(2 / (200 + 200))
    assert abs(np.asarray(glorot.init(jax.random.PRNGKey(0))["layer_1"]["w"]).std() / glorot_sd - 1) < 0.02
