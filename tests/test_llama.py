"""LLAMA's Laplace approximation: the determinant lemma, exact posterior samples, the approximations
against the exact Hessian on a tiny network, and the objective's Laplace term."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.infer import SVI, Trace_ELBO

from bayesmeta import registry, run
from bayesmeta.models.llama import jacobian, laplace_logdet, laplace_sample
from bayesmeta.nets import MLP, make_net
from bayesmeta.sites import tree_from_params

SD, TAU = 0.3, 2.0


def _tiny(seed=0, k=4):
    net = MLP(1, 1, (3,), "tanh")
    params = net.init(jax.random.PRNGKey(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (k, 1))
    flat, unravel = ravel_pytree(params)
    return net, params, flat, unravel, x


def _nll(net, unravel, x, y):
    return lambda v: jnp.sum(jnp.square(net.apply(unravel(v), x) - y)) / (2 * SD**2)


def test_ggn_logdet_and_samples_are_exact():
    with jax.enable_x64(True):
        net, _, flat, unravel, x = _tiny()
        flat = flat.astype(jnp.float64)
        jac = jacobian(lambda v, xx: net.apply(unravel(v), xx), flat, x.astype(jnp.float64))
        h = TAU * jnp.eye(flat.size) + jac.T @ jac / SD**2
        np.testing.assert_allclose(laplace_logdet(jac, SD, TAU, "ggn"), jnp.linalg.slogdet(h)[1], rtol=1e-10)
        # the sampling map T = H^{-1/2}: T T^T = H^{-1}
        t = jax.vmap(lambda e: laplace_sample(jac, SD, TAU, "ggn", e), in_axes=1, out_axes=1)(
            jnp.eye(flat.size)
        )
        np.testing.assert_allclose(t @ t.T, jnp.linalg.inv(h), atol=1e-10)
        d = jax.vmap(lambda e: laplace_sample(jac, SD, TAU, "diagonal", e), in_axes=1, out_axes=1)(
            jnp.eye(flat.size)
        )
        np.testing.assert_allclose(jnp.diag(d @ d.T), 1 / jnp.diag(h), rtol=1e-10)


def test_curvatures_against_the_exact_hessian_on_a_tiny_network():
    """At zero residual the Gauss-Newton matrix is the exact Hessian of the NLL; the diagonal option is
    its diagonal; the last-layer block is exact at any residual (outputs are linear in the head)."""
    with jax.enable_x64(True):
        net, params, flat, unravel, x = _tiny()
        flat, x = flat.astype(jnp.float64), x.astype(jnp.float64)
        y_fit = net.apply(unravel(flat), x)  # zero residual
        exact = jax.hessian(_nll(net, unravel, x, y_fit))(flat) + TAU * jnp.eye(flat.size)
        jac = jacobian(lambda v, xx: net.apply(unravel(v), xx), flat, x)
        np.testing.assert_allclose(
            laplace_logdet(jac, SD, TAU, "ggn"), jnp.linalg.slogdet(exact)[1], rtol=1e-9
        )
        np.testing.assert_allclose(
            laplace_logdet(jac, SD, TAU, "diagonal"), jnp.sum(jnp.log(jnp.diag(exact))), rtol=1e-9
        )
        # away from zero residual the full GGN differs from the Hessian, the head block does not
        y_far = y_fit + 1.0
        exact_far = jax.hessian(_nll(net, unravel, x, y_far))(flat) + TAU * jnp.eye(flat.size)
        assert abs(laplace_logdet(jac, SD, TAU, "ggn") - jnp.linalg.slogdet(exact_far)[1]) > 1e-3
        head, head_unravel = ravel_pytree(params["head"])
        rest = {k: v for k, v in params.items() if k != "head"}
        head = head.astype(jnp.float64)

        def apply_head(v, xx):
            return net.apply({**rest, "head": head_unravel(v)}, xx)

        exact_head = jax.hessian(lambda v: jnp.sum(jnp.square(apply_head(v, x) - y_far)) / (2 * SD**2))(head)
        jac_head = jacobian(apply_head, head, x)
        np.testing.assert_allclose(
            laplace_logdet(jac_head, SD, TAU, "last_layer"),
            jnp.linalg.slogdet(exact_head + TAU * jnp.eye(head.size))[1],
            rtol=1e-9,
        )


SMALL = [
    "task.family='sine_line'",
    "task.shots=4",
    "task.queries=3",
    "model.method='llama'",
    "model.net.hidden=[5]",
    "model.noise_sd=0.3",
    "model.inner_steps=2",
]


def _small(curvature: str, *extra: str, tasks: int = 3) -> tuple:
    """(setup, batch, initial params) of a tiny LLAMA on sine/line tasks with the given curvature."""
    setup = run.Setup.from_config(
        registry.load_config(None, [*SMALL, f"model.params.curvature='{curvature}'", *extra])
    )
    batch = setup.family.sample(jax.random.PRNGKey(0), tasks)
    svi = SVI(setup.method.model, setup.method.guide, optax.sgd(0.0), Trace_ELBO())
    return setup, batch, svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(1), batch))


def _adapted_by_hand(setup: run.Setup, params: dict, x: jax.Array, y: jax.Array) -> tuple:
    """(net, theta, phi): phi = theta after the configured gradient steps on the support MSE (the
    Gaussian likelihood's inner loss), written out."""
    cfg = setup.cfg.model
    net = make_net(cfg.net, 1, 1)
    theta = tree_from_params("theta", net.init, params)
    phi = theta
    for _ in range(cfg.inner_steps):
        g = jax.grad(lambda q: jnp.mean(jnp.square(net.apply(q, x) - y)))(phi)
        phi = jax.tree.map(lambda a, b: a - cfg.inner_lr * b, phi, g)
    return net, theta, phi


@pytest.mark.parametrize("curvature", ["ggn", "last_layer", "diagonal"])
def test_llama_objective_adds_the_laplace_term(curvature):
    """loss(eta=1) - loss(eta=0) = 0.5 * sum_i log det H_i / (T Q), with H_i from the adapted phi_i."""
    on, batch, params = _small(curvature, "model.params.eta=1.0")
    off = run.Setup.from_config(
        registry.load_config(None, [*SMALL, f"model.params.curvature='{curvature}'", "model.params.eta=0.0"])
    )

    def loss(m):
        return float(Trace_ELBO().loss(jax.random.PRNGKey(2), params, m.model, m.guide, batch))

    from numpyro.handlers import seed, substitute, trace

    tr = trace(substitute(seed(on.method.model, 0), params)).get_trace(batch)
    logdet = tr["laplace_logdet"]["value"]
    assert logdet.shape == (3,) and bool(jnp.all(jnp.isfinite(logdet)))
    np.testing.assert_allclose(
        loss(on.method) - loss(off.method), 0.5 * float(jnp.sum(logdet)) / 9, rtol=1e-4
    )
    # the traced log det is the curvature's at each task's adapted phi_i (2 gradient steps on the support
    # MSE, the Gaussian inner loss, written out here), on its support set and over the curvature's
    # block: tau I + J^T J / sd^2, or its diagonal

    def by_hand(start: dict, net, x: jax.Array) -> jax.Array:
        block, rest = (
            ({"head": start["head"]}, {k: v for k, v in start.items() if k != "head"})
            if curvature == "last_layer"
            else (start, {})
        )
        flat, unravel = ravel_pytree(block)
        jac = jax.jacrev(lambda v: net.apply({**rest, **unravel(v)}, x).ravel())(flat)
        h = jnp.eye(flat.size) + jac.T @ jac / 0.3**2  # tau = model.params.prior_precision = 1
        return jnp.sum(jnp.log(jnp.diag(h))) if curvature == "diagonal" else jnp.linalg.slogdet(h)[1]

    at_phi, at_theta = [], []
    for x, y in zip(batch.x_support, batch.y_support, strict=True):
        net, theta, phi = _adapted_by_hand(on, params, x, y)
        at_phi.append(by_hand(phi, net, x))
        at_theta.append(by_hand(theta, net, x))
    at_phi, at_theta = np.array(at_phi), np.array(at_theta)
    np.testing.assert_allclose(logdet, at_phi, rtol=1e-4)
    assert np.abs(at_theta - at_phi).max() > 1e-2  # theta's curvature would not pass the check above


def test_llama_predictions_sample_the_laplace_posterior(small_cfg):
    """After 200 steps of meta-training, LLAMA's predictive draws at the queries spread (the Laplace
    posterior is sampled), and with model.params.sample_posterior false every draw is the mode."""
    settings = ("task.family='sine_line'", "task.shots=5", "model.method='llama'", "model.noise_sd=0.3")
    cfg = small_cfg(*settings, "train.steps=200")
    setup = run.Setup.from_config(cfg)
    from bayesmeta.fit import fit
    from bayesmeta.predict import predictive

    result = fit(setup.method, setup.family, cfg.train, seed=cfg.seed, progress=False, save=False)
    batch = setup.eval_family.sample(jax.random.PRNGKey(0), 4)
    f = predictive(setup.method, 2, 5, ("f",))(result.params, batch, jax.random.PRNGKey(1))["f"]
    assert float(jnp.std(f, 0).mean()) > 1e-3
    mode = run.Setup.from_config(small_cfg(*settings, "model.params.sample_posterior=false"))
    f0 = predictive(mode.method, 2, 3, ("f",))(result.params, batch, jax.random.PRNGKey(1))["f"]
    np.testing.assert_allclose(f0[0], f0[1])  # the mode is deterministic


def test_last_layer_draws_are_the_laplace_posterior_pushed_through_the_linear_head():
    """Outputs are linear in the head, so with the last-layer curvature LLAMA's predictive draws at the
    queries are exactly N(f(x_q; phi_i), J_q H^-1 J_q^T), H = tau I + J_s^T J_s / sd^2, J the head's
    Jacobians at the adapted phi_i (computed here by hand): 4,000 draws match that mean and covariance
    within Monte Carlo error."""
    setup, batch, params = _small("last_layer", tasks=2)
    from bayesmeta.predict import predictive

    draws = 4000
    f = np.asarray(predictive(setup.method, 2, draws, ("f",))(params, batch, jax.random.PRNGKey(2))["f"])
    for t in range(2):
        x_s, y_s, x_q = batch.x_support[t], batch.y_support[t], batch.x_query[t]
        net, _, phi = _adapted_by_hand(setup, params, x_s, y_s)
        head, unravel = ravel_pytree(phi["head"])
        body = {k: v for k, v in phi.items() if k != "head"}

        def out(v, x, net=net, body=body, unravel=unravel):
            return net.apply({**body, "head": unravel(v)}, x).ravel()

        j_s, j_q = jax.jacrev(out)(head, x_s), jax.jacrev(out)(head, x_q)
        h = jnp.eye(head.size) + j_s.T @ j_s / 0.3**2  # tau = 1
        mean, cov = np.asarray(out(head, x_q)), np.asarray(j_q @ jnp.linalg.solve(h, j_q.T))
        got = f[:, t, :, 0]
        sd = np.sqrt(np.diag(cov))
        assert np.all(np.abs(got.mean(0) - mean) < 4.5 * sd / np.sqrt(draws))
        np.testing.assert_allclose(got.var(0), np.diag(cov), rtol=0.12)  # sd of the estimate: 2.2%
        np.testing.assert_allclose(np.corrcoef(got.T), cov / np.outer(sd, sd), atol=0.08)
