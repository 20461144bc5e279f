"""BMAML: SVGD against a Gaussian target, numpyro's RBF kernel and MAML's gradient descent; the chaser
loss and where its gradient flows; the particle sampler; a short fit that learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.contrib.einstein import RBFKernel
from numpyro.infer import Trace_ELBO

from bayesmeta import registry, run
from bayesmeta.adapt import gradient_descent
from bayesmeta.fit import fit, run_keys, step_tasks
from bayesmeta.likelihoods import Gaussian
from bayesmeta.models.bmaml import chaser_loss, median_bandwidth, rbf_gram, svgd, svgd_direction
from bayesmeta.nets import MLP, make_net
from bayesmeta.sites import tree_from_params

CFG = [
    "model.method='bmaml'",
    "model.net.hidden=[16, 16]",
    "model.params.particles=3",
    "model.inner_steps=2",
    "model.inner_lr=0.02",
    "train.steps=1000",
    "train.meta_batch=8",
    "train.lr=3e-3",
    "train.log_every=500",
    "train.eval_every=500",
    "train.checkpoint_every=500",
]


def test_svgd_recovers_a_gaussian():
    """50 particles, 500 steps on N(mu, Sigma) in 2-D. SVGD's finite-particle fixed point under-spreads
    (variance collapse, Ba et al. 2021): here by 13%; the variance scales about linearly with the
    repulsion (x0.5 halves it, x1.5 adds 50%), so 20% catches a wrong repulsion, and the mean's 0.05
    (the draws' own error would be ~0.15) a wrong driving term."""
    mu = jnp.array([1.0, -2.0])
    cov = jnp.array([[1.0, 0.6], [0.6, 2.0]])
    prec = jnp.linalg.inv(cov)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (50, 2))
    x = jax.jit(lambda x0: svgd(lambda z: -0.5 * (z - mu) @ prec @ (z - mu), x0, 500, 0.2))(x0)
    np.testing.assert_allclose(x.mean(0), mu, atol=0.05)
    np.testing.assert_allclose(jnp.cov(x.T, ddof=0), cov, rtol=0.2, atol=0.05)


def test_kernel_is_numpyros_rbf_and_the_repulsion_is_its_gradient():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    g = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    h = median_bandwidth(x)

    def k(a, b):
        return jnp.exp(-jnp.sum((a - b) ** 2) / h)

    @jax.jit
    def check(x, g):
        k_np = RBFKernel().compute(jax.random.PRNGKey(2), x, None, None)
        gram = jax.vmap(jax.vmap(k_np, (None, 0)), (0, None))(x, x)
        # phi(x_i) = 1/M sum_j [k(x_j, x_i) g_j + grad_{x_j} k(x_j, x_i)], the gradient by autodiff
        pair = jax.vmap(lambda xj, gj, xi: k(xj, xi) * gj + jax.grad(k)(xj, xi), (0, 0, None))
        phi = jax.vmap(lambda xi: pair(x, g, xi).mean(0))(x)
        return rbf_gram(x, h), gram, svgd_direction(x, g), phi

    mine, theirs, direction, autodiff = check(x, g)
    np.testing.assert_allclose(mine, theirs, rtol=1e-6)
    np.testing.assert_allclose(direction, autodiff, rtol=1e-5, atol=1e-6)


def test_one_particle_is_mamls_gradient_descent_and_no_leader_steps_no_loss():
    """M = 1: k = 1 and no repulsion, so SVGD on -L is MAML's inner loop on L; s = 0: the leader is
    SVGD_0(chaser) = chaser and the chaser loss is 0."""
    net, lik = MLP(1, 1, (4,)), Gaussian(0.5)
    theta = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 1))
    y = jnp.sin(3 * x)
    flat, unravel = ravel_pytree(theta)

    @jax.jit
    def both(flat, theta):
        phi = svgd(lambda t: -lik.loss(net.apply(unravel(t), x), y), flat[None], 3, 0.1)
        maml = gradient_descent(lambda p, a, b: lik.loss(net.apply(p, a), b), theta, x, y, steps=3, lr=0.1)[0]
        return phi, maml

    phi, maml = both(flat, theta)
    np.testing.assert_allclose(phi[0], ravel_pytree(maml)[0], rtol=1e-5, atol=1e-6)
    c = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4))
    leader = jax.vmap(lambda ci: svgd(lambda t: -jnp.sum(t**2), ci, 0, 0.1))(c)
    assert float(chaser_loss(c, leader)) == 0.0


def test_inner_clip_bounds_each_particles_gradient_before_the_kernel_averages_them():
    """svgd(clip=c) is the SVGD step with every grad log p(x_j) scaled to norm at most c (model.inner_clip,
    which BMAML's multimodal row needs): a particle whose gradient is within c steps as without the clip."""
    x = jnp.array([[3.0, -4.0], [0.1, 0.2], [-20.0, 5.0]])  # grad log p = -x: norms 5, 0.22, 20.6
    log_p = lambda t: -0.5 * jnp.sum(t**2)  # noqa: E731
    grads = -x
    norms = jnp.linalg.norm(grads, axis=1, keepdims=True)
    clipped = grads * jnp.minimum(1.0, 1.0 / norms)
    np.testing.assert_allclose(
        svgd(log_p, x, 1, 0.1, clip=1.0), x + 0.1 * svgd_direction(x, clipped), rtol=1e-6
    )
    np.testing.assert_allclose(svgd(log_p, x, 1, 0.1, clip=50.0), svgd(log_p, x, 1, 0.1), rtol=1e-6)
    one = svgd(log_p, x[2:], 1, 0.1, clip=1.0)  # M = 1: the step is lr * c along the gradient
    np.testing.assert_allclose(jnp.linalg.norm(one - x[2:]), 0.1, rtol=1e-5)


def test_chaser_loss_value_and_gradients():
    c = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
    leader = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4))
    np.testing.assert_allclose(chaser_loss(c, leader), jnp.sum((c - leader) ** 2) / 2, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(chaser_loss)(c, leader), c - leader, rtol=1e-6)  # 2 (c - l) / T
    assert not jnp.any(jax.grad(chaser_loss, 1)(c, leader))


def mixture_mse(setup, params, batch) -> float:
    """Mean test MSE over `batch`'s tasks of the 3-particle mixture's predictive mean (3 draws, one per
    particle) after 2 SVGD steps on each support set."""
    f = jax.jit(setup.method.sampler, static_argnums=(3, 4))(
        params, batch._replace(y_query=None), jax.random.PRNGKey(0), 2, 3
    )["f"]
    return float(jnp.mean(setup.likelihood.task_metrics(f.mean(0), batch.y_query)["mse"]))


@pytest.fixture(scope="module")
def bmaml():
    """(setup, initial params, params after 1000 meta-steps, a held-out batch) for CFG on the sinusoid."""
    cfg = registry.load_config(None, CFG)
    setup = run.Setup.from_config(cfg)
    init = fit(setup.method, setup.family, cfg.train, seed=cfg.seed, until=0, progress=False).params
    trained = fit(setup.method, setup.family, cfg.train, seed=cfg.seed, progress=False).params
    return setup, init, trained, setup.eval_family.sample(jax.random.PRNGKey(99), 100)


def _particles(setup, params):
    """The particles as (M, D) and the unravel of one, from the params sites `particles.*`."""
    net = make_net(setup.cfg.model.net, 1, 1)
    tree = tree_from_params("particles", lambda k: jax.vmap(net.init)(jax.random.split(k, 3)), params)
    return (
        net,
        jax.vmap(lambda t: ravel_pytree(t)[0])(tree),
        ravel_pytree(jax.tree.map(lambda a: a[0], tree))[1],
    )


def test_meta_gradient_flows_through_the_chaser_only(bmaml):
    """The SVI gradient equals J^T 2/T sum_i (chaser_i - leader_i), J = d chaser / d Theta_0 (vjp of a
    recomputation with -lik.loss as log p): the leader is a constant. Without the stop-gradient the
    gradient would also carry the leader's own Jacobian."""
    setup, params, _, _ = bmaml
    cfg = setup.cfg
    batch = step_tasks(setup.family, run_keys(cfg.seed)[1], 0, cfg.train.meta_batch)
    net, x0, unravel = _particles(setup, params)
    lik, n, s = setup.likelihood, cfg.model.inner_steps, 1

    def target(xs, ys):
        return lambda t: -lik.loss(net.apply(unravel(t), xs), ys)

    def loss(p):
        return Trace_ELBO().loss(jax.random.PRNGKey(0), p, setup.method.model, setup.method.guide, batch)

    @jax.jit
    def both(params, x0):
        def chase(x0):
            return jax.vmap(lambda xs, ys: svgd(target(xs, ys), x0, n, 0.02))(
                batch.x_support, batch.y_support
            )

        chaser, back = jax.vjp(chase, x0)
        xb, yb = (
            jnp.concatenate(p, 1)
            for p in ((batch.x_support, batch.x_query), (batch.y_support, batch.y_query))
        )
        leader = jax.vmap(lambda c, xs, ys: svgd(target(xs, ys), c, s, 0.02))(chaser, xb, yb)
        (expected,) = back(2 * (chaser - leader) / batch.n_tasks)
        return chaser_loss(chaser, leader), expected, *jax.value_and_grad(loss)(params)

    value, expected, svi_value, grads = both(params, x0)
    np.testing.assert_allclose(svi_value, value, rtol=1e-5)
    _, got, _ = _particles(setup, grads)
    assert float(jnp.abs(expected).max()) > 1e-5
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * float(jnp.abs(expected).max()))


def test_sampler_cycles_through_the_particles(bmaml):
    setup, _, params, batch = bmaml
    out = jax.jit(setup.method.sampler, static_argnums=(3, 4))(
        params, batch._replace(y_query=None), jax.random.PRNGKey(0), 2, 7
    )
    assert out["f"].shape == out["y"].shape == (7, *batch.y_query.shape)
    np.testing.assert_array_equal(out["f"][:4], out["f"][3:])  # draw s is particle s mod 3
    assert float(jnp.std(out["f"][:3], 0).mean()) > 1e-2  # the particles differ
    z = (out["y"] - out["f"]) / setup.likelihood.sd  # y adds the observation noise: z ~ N(0, 1)
    assert abs(float(jnp.std(z)) - 1.0) < 0.05


def test_bmaml_learns_the_sinusoid(bmaml):
    """1000 meta-steps of the chaser loss: the 2-step test MSE of the 3-particle mixture falls well
    below that of the untrained initial particles (3.9 -> 0.8 when written)."""
    setup, init, trained, batch = bmaml
    before, after = mixture_mse(setup, init, batch), mixture_mse(setup, trained, batch)
    assert after < 0.5 * before, (before, after)


def test_the_authors_target_is_their_gaussian_posterior_in_log_precisions():
    """authors_log_density = sum_n log N(y_n; f_n, 1/gamma) + log N(theta; 0, 1/lambda) + log Gamma(gamma;
    2, 0.2) + log Gamma(lambda; 2, 2) + log gamma + log lambda (the log-parameterisation's Jacobian), up
    to a constant: its differences between two points equal numpyro's densities' differences."""
    import numpyro.distributions as dist

    from bayesmeta.models.bmaml import authors_log_density

    def reference(err, theta, log_lam, log_gam):
        lam, gam = jnp.exp(log_lam), jnp.exp(log_gam)
        return (
            dist.Normal(0.0, gam**-0.5).log_prob(err).sum()
            + dist.Normal(0.0, lam**-0.5).log_prob(theta).sum()
            + dist.Gamma(2.0, 0.2).log_prob(gam)
            + log_gam
            + dist.Gamma(2.0, 2.0).log_prob(lam)
            + log_lam
        )

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    a = (jax.random.normal(keys[0], (10, 1)), jax.random.normal(keys[1], (30,)), 0.3, 4.6)
    b = (0.5 * jax.random.normal(keys[2], (10, 1)), jax.random.normal(keys[3], (30,)), -0.7, 2.0)
    np.testing.assert_allclose(
        authors_log_density(*a) - authors_log_density(*b), reference(*a) - reference(*b), rtol=1e-5
    )


def test_the_authors_target_adds_learned_precisions_left_out_of_the_chaser_loss():
    """model.params.target = 'authors': every particle carries (log lambda, log gamma), started near
    (0, log 100); the SVI loss is the chaser loss over the weights alone, recomputed here by SVGD on
    authors_log_density; the precisions get a meta-gradient (through the weights' path); and 1,000
    meta-steps bring the 2-step test MSE of the particles' mixture well below the initial one's (4.2 ->
    1.6 when written)."""
    from bayesmeta.models.bmaml import authors_log_density

    cfg = registry.load_config(None, [*CFG, "model.params.target='authors'", "model.inner_lr=0.001"])
    setup = run.Setup.from_config(cfg)
    init = fit(setup.method, setup.family, cfg.train, seed=0, until=0, progress=False, save=False).params
    start = init["particles.log_precisions"]
    assert start.shape == (3, 2)
    np.testing.assert_allclose(start, np.log([[1.0, 100.0]] * 3), atol=0.01)
    net = make_net(cfg.model.net, 1, 1)
    layout = {"net": lambda k: jax.vmap(net.init)(jax.random.split(k, 3)), "log_precisions": lambda k: start}
    tree = tree_from_params("particles", lambda k: {name: f(k) for name, f in layout.items()}, init)["net"]
    weights = jax.vmap(lambda t: ravel_pytree(t)[0])(tree)
    unravel = ravel_pytree(jax.tree.map(lambda a: a[0], tree))[1]
    x0, d = jnp.concatenate([weights, start], 1), weights.shape[1]
    batch = step_tasks(setup.family, run_keys(0)[1], 0, cfg.train.meta_batch)

    def target(xs, ys):
        return lambda v: authors_log_density(ys - net.apply(unravel(v[:d]), xs), v[:d], v[d], v[d + 1])

    @jax.jit
    def by_hand_and_svi(params):
        chaser = jax.vmap(lambda xs, ys: svgd(target(xs, ys), x0, 2, 0.001))(batch.x_support, batch.y_support)
        xb, yb = (
            jnp.concatenate(p, 1)
            for p in ((batch.x_support, batch.x_query), (batch.y_support, batch.y_query))
        )
        leader = jax.vmap(lambda c, xs, ys: svgd(target(xs, ys), c, 1, 0.001))(chaser, xb, yb)
        elbo = Trace_ELBO()
        svi = jax.value_and_grad(
            lambda p: elbo.loss(jax.random.PRNGKey(0), p, setup.method.model, setup.method.guide, batch)
        )
        return chaser_loss(chaser[..., :d], leader[..., :d]), *svi(params)

    by_hand, svi_loss, grads = by_hand_and_svi(init)
    np.testing.assert_allclose(svi_loss, by_hand, rtol=1e-4)
    assert float(jnp.abs(grads["particles.log_precisions"]).max()) > 0

    trained = fit(setup.method, setup.family, cfg.train, seed=0, progress=False, save=False).params
    held_out = setup.eval_family.sample(jax.random.PRNGKey(99), 100)
    before, after = mixture_mse(setup, init, held_out), mixture_mse(setup, trained, held_out)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize(
    "extra, named",
    [(("model.likelihood='categorical'",), "got 'categorical'"), (("model.params.prior_sd=1.0",), "got 1.0")],
)
def test_the_authors_target_refuses_what_it_cannot_be(extra, named):
    from bayesmeta.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.params\.target") as err:
        run.Setup.from_config(registry.load_config(None, [*CFG, "model.params.target='authors'", *extra]))
    assert named in str(err.value)
