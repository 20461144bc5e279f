"""BMAML: SVGD against a Gaussian target, numpyro's RBF kernel and gradient descent; the chaser loss and
where its gradient flows; the particle sampler (regression and a conv net); a short fit that learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from numpyro.contrib.einstein import RBFKernel
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import registry, run
from bayesmeta.adapt import gradient_descent
from bayesmeta.fit import fit, initial_state, make_svi
from bayesmeta.method import no_guide
from bayesmeta.models.bmaml import chaser_loss, median_bandwidth, rbf_gram, svgd, svgd_direction
from bayesmeta.nets import make_net
from bayesmeta.predict import eval_tasks, evaluate
from bayesmeta.sites import tree_from_params
from bayesmeta.tasks import TaskBatch

TINY = [
    "model.method='bmaml'",
    "model.net.hidden=[5]",
    "model.net.activation='tanh'",
    "model.inner_steps=2",
    "model.inner_lr=0.1",
    "model.params.particles=3",
    "task.shots=4",
    "task.queries=3",
]


def _setup(*extra: str, tasks: int = 3):
    """(setup, a batch of sinusoid tasks, the method's initial parameters) for TINY + extra."""
    setup = run.Setup.from_config(registry.load_config(None, [*TINY, *extra]))
    batch = setup.family.sample(jax.random.PRNGKey(4), tasks)
    svi = SVI(setup.method.model, setup.method.guide, optax.sgd(0.0), Trace_ELBO())
    return setup, batch, svi.get_params(svi.init(jax.random.PRNGKey(3), batch))


def _particles(setup, params):
    """The initial particles as a net params tree with a leading particle axis, and as (M, D)."""
    net = make_net(setup.cfg.model.net, 1, 1)
    tree = tree_from_params("particles", lambda k: jax.vmap(net.init)(jax.random.split(k, 3)), params)
    return net, tree, jax.vmap(lambda t: ravel_pytree(t)[0])(tree)


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
    k_np = RBFKernel().compute(jax.random.PRNGKey(2), x, None, None)
    gram = jax.vmap(lambda a: jax.vmap(lambda b: k_np(a, b))(x))(x)
    np.testing.assert_allclose(rbf_gram(x, h), gram, rtol=1e-6)

    def k(a, b):
        return jnp.exp(-jnp.sum((a - b) ** 2) / h)

    def phi(i):  # 1/M sum_j [k(x_j, x_i) g_j + grad_{x_j} k(x_j, x_i)] by autodiff
        terms = [k(x[j], x[i]) * g[j] + jax.grad(k)(x[j], x[i]) for j in range(5)]
        return sum(terms) / 5

    np.testing.assert_allclose(
        svgd_direction(x, g), jnp.stack([phi(i) for i in range(5)]), rtol=1e-5, atol=1e-6
    )


def test_one_particle_is_mamls_gradient_descent():
    """M = 1: no repulsion, k = 1, so `inner_steps` SVGD steps on -L are MAML's steps on L, and the
    sampler predicts with MAML's adapted parameters."""
    x = jnp.array([[0.3, -1.2]])
    log_p = lambda z: -jnp.sum(jnp.sin(z) ** 2) - z[0] * z[1]  # noqa: E731
    np.testing.assert_allclose(svgd(log_p, x, 1, 0.1), x + 0.1 * jax.grad(log_p)(x[0]), rtol=1e-6)

    setup, batch, params = _setup("model.params.particles=1")
    net = make_net(setup.cfg.model.net, 1, 1)
    theta = jax.tree.map(
        lambda a: a[0], tree_from_params("particles", lambda k: jax.vmap(net.init)(k[None]), params)
    )
    lik = setup.likelihood

    def adapted(xs, ys):
        return gradient_descent(lambda p, a, b: lik.loss(net.apply(p, a), b), theta, xs, ys, steps=3, lr=0.1)[
            0
        ]

    maml = jax.vmap(lambda xs, ys, xq: net.apply(adapted(xs, ys), xq))(
        batch.x_support, batch.y_support, batch.x_query
    )
    f = setup.method.sampler(params, batch._replace(y_query=None), jax.random.PRNGKey(0), 3, 2)["f"]
    np.testing.assert_allclose(f[0], maml, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f[1], maml, rtol=1e-4, atol=1e-5)


def test_chaser_loss_gradient_flows_through_the_chaser_only():
    c = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
    leader = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4))
    np.testing.assert_allclose(chaser_loss(c, leader), jnp.sum((c - leader) ** 2) / 2, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(chaser_loss)(c, leader), (c - leader), rtol=1e-6)  # 2 (c - l) / T
    assert not jnp.any(jax.grad(chaser_loss, 1)(c, leader))

    # s = 0: the leader is the chaser, the SVI loss is exactly 0
    setup, batch, params = _setup("model.params.leader_steps=0")
    assert float(Trace_ELBO().loss(jax.random.PRNGKey(0), params, setup.method.model, no_guide, batch)) == 0.0

    # first order, s = 2: chaser and leader both move Theta_0 by constants, so only the stop-gradient
    # on the leader leaves a gradient, 2/T sum_i (chaser_i - leader_i); without it the gradient is 0
    setup, batch, params = _setup("model.first_order=true", "model.params.leader_steps=2")
    net, tree, x0 = _particles(setup, params)
    _, unravel = ravel_pytree(jax.tree.map(lambda a: a[0], tree))
    lik = setup.likelihood

    def target(xs, ys):
        return lambda t: -lik.loss(net.apply(unravel(t), xs), ys)

    chaser = jax.vmap(lambda xs, ys: svgd(target(xs, ys), x0, 2, 0.1))(batch.x_support, batch.y_support)
    both = [
        jnp.concatenate([a, b], 1)
        for a, b in ((batch.x_support, batch.x_query), (batch.y_support, batch.y_query))
    ]
    leader = jax.vmap(lambda c, xs, ys: svgd(target(xs, ys), c, 2, 0.1))(chaser, *both)
    expected = 2 * jnp.mean(chaser - leader, 0)

    def loss(p):
        return Trace_ELBO().loss(jax.random.PRNGKey(0), p, setup.method.model, no_guide, batch)

    grads = jax.grad(loss)(params)
    got = jax.vmap(lambda t: ravel_pytree(t)[0])(
        tree_from_params("particles", lambda k: jax.vmap(net.init)(jax.random.split(k, 3)), grads)
    )
    assert float(jnp.abs(expected).max()) > 1e-4
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_sampler_cycles_through_the_particles():
    setup, batch, params = _setup()
    out = setup.method.sampler(params, batch._replace(y_query=None), jax.random.PRNGKey(0), 2, 7)
    assert out["f"].shape == out["y"].shape == (7, 3, 3, 1)
    np.testing.assert_array_equal(out["f"][:4], out["f"][3:])  # draw s is particle s mod 3
    assert float(jnp.std(out["f"][:3], 0).min()) > 1e-3  # the particles differ
    sd = setup.likelihood.sd
    resid = (out["y"] - out["f"]) / sd
    assert 0.5 < float(jnp.std(resid)) < 1.5  # y adds the observation noise


def test_classification_with_a_conv_net():
    """Particles of a (tiny) conv4 on 8x8 images, 3-way: one meta-step, class probabilities as f."""
    cfg = registry.load_config(
        None,
        [
            "model.method='bmaml'",
            "model.likelihood='categorical'",
            "model.net.kind='conv4'",
            "model.net.filters=4",
            "model.params.particles=2",
            "model.inner_steps=1",
        ],
    )
    method = registry.build_method(cfg.model, 64, 3)
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    y_s, y_q = jnp.tile(jnp.arange(3), (2, 1)), jnp.tile(jnp.arange(3), (2, 2))
    batch = TaskBatch(jax.random.normal(k[0], (2, 3, 64)), y_s, jax.random.normal(k[1], (2, 6, 64)), y_q, {})
    svi = SVI(method.model, method.guide, optax.adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(1), batch)
    state, loss = svi.update(state, batch)
    assert np.isfinite(float(loss)) and float(loss) > 0
    out = method.sampler(svi.get_params(state), batch._replace(y_query=None), jax.random.PRNGKey(2), 1, 4)
    assert out["f"].shape == (4, 2, 6, 3) and out["y"].shape == (4, 2, 6)
    np.testing.assert_allclose(out["f"].sum(-1), 1.0, rtol=1e-5)
    assert bool(jnp.all((out["y"] >= 0) & (out["y"] < 3)))


def test_bmaml_learns_the_sinusoid(small_cfg):
    """1000 meta-steps (1 ms each) of the chaser loss: the 2-step test MSE of the 3-particle mixture
    falls well below that of the untrained initial particles (4.5 -> 1.1 when written)."""
    cfg = small_cfg(
        "model.method='bmaml'",
        "model.params.particles=3",
        "model.inner_steps=2",
        "model.inner_lr=0.02",
        "train.steps=1000",
        "train.lr=3e-3",
        "train.log_every=500",
        "train.eval_every=500",
        "train.checkpoint_every=500",
    )
    setup = run.Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    init = svi.get_params(initial_state(svi, setup.family, cfg.train, cfg.seed)[0])
    result = fit(setup.method, setup.family, cfg.train, seed=cfg.seed, progress=False)
    batches = eval_tasks(setup.eval_family, jax.random.PRNGKey(99), 100, 100)

    def mse(params):
        ev = evaluate(setup.method, setup.likelihood, params, batches, (2,), 3, jax.random.PRNGKey(0))
        return float(ev.per_task[2]["mse"].mean())

    before, after = mse(init), mse(result.params)
    assert after < 0.5 * before, (before, after)
