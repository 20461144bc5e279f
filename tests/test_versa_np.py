"""VERSA (ML-PIP) and the neural process with a latent path: the linear-Gaussian head's closed forms
against Monte Carlo, the model's objective against the exact predictive, permutation equivariance of
the per-class amortization, the NP's likelihood and KL weights, and short fits that must learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from bayesmeta import registry
from bayesmeta.fit import make_chunk, make_svi
from bayesmeta.models.versa import (
    gaussian_expected_loglik,
    gaussian_predictive_loglik,
    head_outputs,
    ml_pip,
)
from bayesmeta.nets import make_net
from bayesmeta.predict import predictive
from bayesmeta.run import Setup
from bayesmeta.tasks import TaskBatch

TINY = ["model.net.hidden=[3]", "model.net.activation='tanh'", "task.shots=4", "task.queries=3"]


def _init(method, batch, meanfield=False):
    """The method's initial parameters on `batch` (SVI.init jitted: one compilation, not one per op)."""
    elbo = TraceMeanField_ELBO() if meanfield else Trace_ELBO()
    svi = SVI(method.model, method.guide, optax.sgd(0.0), elbo)
    return svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(3), batch))


def _traced(fn, params, *args, key=0, **kwargs):
    """The trace of fn(*args, **kwargs) with `params` substituted, seeded by `key`."""
    seeded = handlers.seed(handlers.substitute(fn, data=params), key)
    return handlers.trace(seeded).get_trace(*args, **kwargs)


def test_linear_gaussian_head_closed_forms_against_monte_carlo():
    """E_q[log N(y; h^T w, s^2)] (squared residual plus trace term) and log E_q[N(...)] (the ML-PIP
    estimator's limit) against 50,000 draws; ml_pip against log(mean(exp)) in float64."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    n, d, m, s = 5, 3, 2, 0.5
    h = jax.random.normal(k[0], (n, d))
    loc = jax.random.normal(k[2], (m, d + 1))
    sd = 0.1 + 0.3 * jax.random.uniform(k[3], (m, d + 1))
    y = head_outputs(loc, h) + jax.random.normal(k[1], (n, m))  # within a few predictive sd
    w = loc + sd * jax.random.normal(k[4], (50_000, m, d + 1))
    logp = dist.Normal(head_outputs(w, h), s).log_prob(y)  # (L, n, m)
    expected = gaussian_expected_loglik(h, y, loc, sd, s)
    predictive_ll = gaussian_predictive_loglik(h, y, loc, sd, s)
    se = jnp.std(logp, 0) / np.sqrt(w.shape[0])
    np.testing.assert_array_less(jnp.abs(jnp.mean(logp, 0) - expected), 5 * se + 1e-4)
    np.testing.assert_allclose(ml_pip(logp), predictive_ll, atol=0.02)
    assert float(jnp.min(predictive_ll - expected)) > 0.05  # Jensen: the two are told apart
    # head_outputs is h w + b row by row
    np.testing.assert_allclose(head_outputs(loc, h), h @ loc[:, :d].T + loc[:, d], rtol=1e-6)
    few = np.asarray(logp[:7, 0, 0], np.float64)
    np.testing.assert_allclose(ml_pip(jnp.asarray(few)), np.log(np.mean(np.exp(few))), rtol=1e-6)


def test_versa_loss_is_the_mean_query_predictive_loglik_of_the_amortized_head():
    """With many head draws, the SVI loss equals minus the exact predictive log-likelihood of the
    Gaussian head q(w | D) the amortization network outputs, averaged over tasks and query points (the
    mean of log N(y; h^T w, s^2) over draws, an ELBO-like objective, would be lower)."""
    cfg = registry.load_config(None, [*TINY, "model.method='versa'", "model.params.head_samples=5000"])
    setup = Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(1), 3)
    method, s = setup.method, cfg.model.noise_sd
    net = make_net(cfg.model.net, 1, 1)

    @jax.jit
    def check(params):
        tr = _traced(method.model, params, batch)
        loc, sd = tr["q_loc"]["value"], tr["q_sd"]["value"]
        body = {layer: {k: params[f"theta.body.{layer}.{k}"] for k in "wb"} for layer in net.layer_names[:-1]}
        h_q = jax.vmap(lambda x: net.features(body, x))(batch.x_query)
        exact = jax.vmap(gaussian_predictive_loglik, (0, 0, 0, 0, None))(h_q, batch.y_query, loc, sd, s)
        lower = jax.vmap(gaussian_expected_loglik, (0, 0, 0, 0, None))(h_q, batch.y_query, loc, sd, s)
        loss = Trace_ELBO().loss(jax.random.PRNGKey(2), params, method.model, method.guide, batch)
        return loss, jnp.mean(exact), jnp.mean(lower)

    loss, exact, lower = check(_init(method, batch))
    np.testing.assert_allclose(float(loss), -float(exact), rtol=2e-3)
    assert float(exact - lower) > 0.02


def _classes(key, n_tasks=2, ways=3, shots=2, queries=2, x_dim=4):
    """Gaussian blobs: each task draws its own class means; shots + queries points per class."""
    km, kx = jax.random.split(key)
    means = 2.0 * jax.random.normal(km, (n_tasks, ways, 1, x_dim))
    x = means + 0.5 * jax.random.normal(kx, (n_tasks, ways, shots + queries, x_dim))
    y = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32)[None, :, None], x.shape[:3])

    def split(a):
        return a[:, :, :shots].reshape(n_tasks, -1, *a.shape[3:]), a[:, :, shots:].reshape(
            n_tasks, -1, *a.shape[3:]
        )

    (xs, xq), (ys, yq) = split(x), split(y)
    return TaskBatch(xs, ys, xq, yq, {})


def test_versa_classification_is_permutation_equivariant():
    """Relabelling the classes permutes q's rows and the predicted probabilities (given the same head
    noise per class) and leaves the ML-PIP loss unchanged (up to Monte Carlo error with 4,000 head
    draws); reordering the support examples changes nothing."""
    cfg = registry.load_config(
        None,
        [
            "model.method='versa'",
            "model.likelihood='categorical'",
            "model.net.hidden=[16]",
            "model.params.head_samples=4000",
        ],
    )
    method = registry.build_method(cfg.model, 4, 3)
    batch = _classes(jax.random.PRNGKey(0))
    params = _init(method, batch)
    eps = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 17))

    @jax.jit
    def run(b, e):
        tr = _traced(method.model, {**params, "head_eps": e}, b._replace(y_query=None), training=False)
        loss = Trace_ELBO().loss(jax.random.PRNGKey(1), params, method.model, method.guide, b)
        return tr["q_loc"]["value"], tr["q_sd"]["value"], tr["f"]["value"], loss

    loc, sd, f, loss = run(batch, eps)
    perm = jnp.array([2, 0, 1])  # class c is renamed perm[c]
    relabelled = batch._replace(y_support=perm[batch.y_support], y_query=perm[batch.y_query])
    loc2, sd2, f2, loss2 = run(relabelled, eps[:, jnp.argsort(perm)])  # class perm[c] gets c's noise
    np.testing.assert_allclose(loc2[:, perm], loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd2[:, perm], sd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f2[..., perm], f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=5e-3)
    order = jax.random.permutation(jax.random.PRNGKey(7), batch.x_support.shape[1])
    shuffled = batch._replace(x_support=batch.x_support[:, order], y_support=batch.y_support[:, order])
    loc3, _, f3, _ = run(shuffled, eps)
    np.testing.assert_allclose(loc3, loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f3, f, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(loc[:, 0] - loc[:, 1]))) > 1e-3  # the classes do get different heads
    assert float(jnp.max(jnp.abs(f2 - f))) > 1e-3  # the relabelling did move the probabilities


NP_OPTIONS = (
    "model.params.kl_weight=0.3",
    "model.params.learn_sd=true",
    "model.params.deterministic_path=true",
)


@pytest.mark.parametrize(("extra", "lam"), [((), None), (NP_OPTIONS, 0.3)])
def test_np_loss_is_the_mean_nll_plus_weighted_kl_between_the_encoders(extra, lam):
    """loss = mean over tasks and query points of -log p(y* | z, x*) at z ~ q(z | C u T), plus lambda
    times the mean over tasks of KL(q(z | C u T) || q(z | C)) (unset: lambda = 1/K, K = 3 query points:
    K * loss is the per-task negative ELBO). The guide's q is the model's encoder on support + query."""
    cfg = registry.load_config(None, [*TINY, "model.method='np'", "model.params.z_dim=3", *extra])
    setup = Setup.from_config(cfg)
    lam = 1 / 3 if lam is None else lam
    method = setup.method
    batch = setup.family.sample(jax.random.PRNGKey(1), 4)
    union = batch._replace(
        x_support=jnp.concatenate([batch.x_support, batch.x_query], 1),
        y_support=jnp.concatenate([batch.y_support, batch.y_query], 1),
    )
    other = batch._replace(y_query=batch.y_query + 1.0)

    @jax.jit
    def check(params):
        key = jax.random.PRNGKey(2)
        loss = TraceMeanField_ELBO().loss(key, params, method.model, method.guide, batch)
        g = _traced(method.guide, params, batch, key=jax.random.split(key)[1])  # the ELBO's guide seed
        m = handlers.trace(handlers.replay(handlers.substitute(method.model, data=params), g)).get_trace(
            batch
        )
        q, p, out = g["z"]["fn"].base_dist, m["z"]["fn"].base_dist, m["y"]["fn"].base_dist
        return {
            "loss": loss,
            "q": (q.loc, q.scale),
            "p": (p.loc, p.scale),
            "y": (out.loc, out.scale),
            "f": m["f"]["value"],
            "on_union": _traced(method.model, params, union)["z"]["fn"].base_dist.loc,
            "moved": _traced(method.model, params, other)["z"]["fn"].base_dist.loc,
        }

    r = check(_init(method, batch, meanfield=True))
    (q_loc, q_sd), (p_loc, p_sd), (mean, sd) = r["q"], r["p"], r["y"]
    kl = jnp.sum(jnp.log(p_sd / q_sd) + (q_sd**2 + (q_loc - p_loc) ** 2) / (2 * p_sd**2) - 0.5, -1)
    np.testing.assert_allclose(mean, r["f"])
    if extra:  # learn_sd: the decoder's sd, above its floor of 0.1
        assert float(jnp.std(sd)) > 1e-4 and float(jnp.min(sd)) >= 0.1
    else:
        np.testing.assert_allclose(sd, cfg.model.noise_sd)
    nll = -jnp.mean(dist.Normal(mean, sd).log_prob(batch.y_query))
    assert float(jnp.mean(kl)) > 1e-3
    np.testing.assert_allclose(float(r["loss"]), float(nll + lam * jnp.mean(kl)), rtol=1e-5)
    # the prior is the encoder on the context alone; the guide is the same encoder on C u T
    np.testing.assert_allclose(r["on_union"], q_loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["moved"], p_loc)  # p(z | C) does not read the query labels


def _fit(method_overrides, steps=300):
    """(method, chunk losses, mse of the predictive mean: untrained, trained, predicting 0, and the
    trained predictive draws) after `steps` SVI steps of the engine's scanned chunk, 8 tasks a step."""
    cfg = registry.load_config(None, ["model.net.hidden=[32, 32]", "train.meta_batch=8", *method_overrides])
    setup = Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    state = jax.jit(svi.init)(jax.random.PRNGKey(0), setup.family.sample(jax.random.PRNGKey(1), 8))
    chunk = make_chunk(svi, setup.family, 8, jax.random.PRNGKey(2))
    trained, losses, finite = chunk(state, jnp.asarray(0), steps)
    assert bool(finite)
    test = setup.family.sample(jax.random.PRNGKey(9), 50)
    run = predictive(setup.method, 0, 16, ("f",))  # one compilation for both parameter sets

    def mse(params):
        f = run(params, test, jax.random.PRNGKey(5))["f"]
        return float(jnp.mean((jnp.mean(f, 0) - test.y_query) ** 2)), f

    zero = float(jnp.mean(test.y_query**2))
    (before, _), (after, f) = mse(svi.get_params(state)), mse(svi.get_params(trained))
    return np.asarray(losses), before, after, zero, f


def test_versa_learns_sinusoids():
    """300 steps (each on new tasks): the ML-PIP loss drops by more than a nat, and the predictive
    mean's MSE falls below 85% of predicting 0 and of the untrained model's."""
    losses, before, after, zero, _ = _fit(["model.method='versa'", "train.lr=1e-2"])
    assert losses[-50:].mean() < losses[:50].mean() - 1.0
    assert after < 0.85 * zero and after < 0.85 * before


def test_np_learns_sinusoids_and_samples_functions_from_the_context_prior():
    """300 steps: the loss (negative ELBO per point) drops, the predictive mean's MSE falls below 60% of
    the untrained model's and of predicting 0; each draw is a z ~ p(z | C), so the draws differ."""
    losses, before, after, zero, f = _fit(["model.method='np'", "train.lr=3e-3"])
    assert losses[-50:].mean() < losses[:50].mean() - 1.0
    assert after < 0.6 * before and after < 0.6 * zero
    assert f.shape == (16, 50, 10, 1) and float(jnp.std(f, 0).mean()) > 0.01
