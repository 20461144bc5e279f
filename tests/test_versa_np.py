"""VERSA (ML-PIP) and the neural process with a latent path: the linear-Gaussian head's closed forms
against Monte Carlo, the model's objective against the exact predictive, permutation equivariance of
the per-class amortization, the NP's likelihood and KL weights, and short fits that must learn."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from bayesmeta import registry
from bayesmeta.config import ConfigError
from bayesmeta.fit import make_chunk, make_svi
from bayesmeta.models.neural_process import NP, kl_weight
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


def _sample(family, seed, n_tasks):
    """family.sample, jitted (one compilation instead of one per operation), as numpy arrays: the
    tests compute on the host with numpy, which compiles nothing."""
    return jax.tree.map(
        np.asarray, jax.jit(family.sample, static_argnums=1)(jax.random.PRNGKey(seed), n_tasks)
    )


def _init(method, batch, key, meanfield=False):
    """The method's initial parameters on `batch`, traceable: called inside each test's one jit, with
    the keys and batches as arguments (not constants, which XLA would fold at compile time)."""
    elbo = TraceMeanField_ELBO() if meanfield else Trace_ELBO()
    svi = SVI(method.model, method.guide, optax.sgd(0.0), elbo)
    return svi.get_params(svi.init(key, batch))


def _traced(fn, params, *args, key, **kwargs):
    """The trace of fn(*args, **kwargs) with `params` substituted, seeded by `key`."""
    seeded = handlers.seed(handlers.substitute(fn, data=params), key)
    return handlers.trace(seeded).get_trace(*args, **kwargs)


def test_linear_gaussian_head_closed_forms_against_monte_carlo():
    """E_q[log N(y; h^T w, s^2)] (squared residual plus trace term) and log E_q[N(...)] (the ML-PIP
    estimator's limit) against 50,000 draws; ml_pip against log(mean(exp)) in float64."""
    n, d, m, s = 5, 3, 2, 0.5

    @jax.jit
    def draws(key):
        k = jax.random.split(key, 5)
        h = jax.random.normal(k[0], (n, d))
        loc = jax.random.normal(k[2], (m, d + 1))
        sd = 0.1 + 0.3 * jax.random.uniform(k[3], (m, d + 1))
        y = head_outputs(loc, h) + jax.random.normal(k[1], (n, m))  # within a few predictive sd
        w = loc + sd * jax.random.normal(k[4], (50_000, m, d + 1))
        logp = dist.Normal(head_outputs(w, h), s).log_prob(y)  # (L, n, m)
        return {
            "mc_mean": jnp.mean(logp, 0),
            "se": jnp.std(logp, 0) / np.sqrt(w.shape[0]),
            "mc_ml_pip": ml_pip(logp),
            "expected": gaussian_expected_loglik(h, y, loc, sd, s),
            "predictive": gaussian_predictive_loglik(h, y, loc, sd, s),
            "head": head_outputs(loc, h) - (h @ loc[:, :d].T + loc[:, d]),  # h w + b row by row
            "few": logp[:7, 0, 0],
            "few_ml_pip": ml_pip(logp[:7, 0, 0]),
        }

    r = jax.tree.map(np.asarray, draws(jax.random.PRNGKey(0)))
    np.testing.assert_array_less(np.abs(r["mc_mean"] - r["expected"]), 5 * r["se"] + 1e-4)
    np.testing.assert_allclose(r["mc_ml_pip"], r["predictive"], atol=0.02)
    assert np.min(r["predictive"] - r["expected"]) > 0.05  # Jensen: the two are told apart
    np.testing.assert_allclose(r["head"], 0.0, atol=1e-5)
    few = np.asarray(r["few"], np.float64)
    np.testing.assert_allclose(float(r["few_ml_pip"]), np.log(np.mean(np.exp(few))), rtol=1e-6)


def _fit(method_overrides, steps=300):
    """A short fit on sinusoids: `steps` SVI steps of the engine's scanned chunk on 8 new tasks a step."""
    cfg = registry.load_config(None, ["model.net.hidden=[32, 32]", "train.meta_batch=8", *method_overrides])
    setup = Setup.from_config(cfg)
    fam = setup.family
    svi = make_svi(setup.method, cfg.train)
    state = jax.jit(lambda k: svi.init(k, fam.sample(jax.random.fold_in(k, 1), 8)))(jax.random.PRNGKey(0))
    trained, losses, finite = make_chunk(svi, fam, 8)(state, jnp.asarray(0), steps, jax.random.PRNGKey(2))
    assert bool(finite)
    return {
        "cfg": cfg,
        "setup": setup,
        "start": svi.get_params(state),
        "trained": svi.get_params(trained),
        "losses": np.asarray(losses),
    }


@pytest.fixture(scope="module")
def versa_fit():
    """VERSA's fit, shared by two tests (one compilation of its init and SVI step)."""
    return _fit(["model.method='versa'", "train.lr=1e-2"])


def test_versa_learns_sinusoids(versa_fit):
    """300 steps: the ML-PIP loss, the query NLL under the predictive on new tasks, falls to half of
    that of predicting N(0, s^2), E[y^2] / (2 s^2) + log(s sqrt(2 pi)) with E[y^2] = E[A^2] / 2 for
    A ~ U(0.1, 5), and by more than a nat from its first steps. (Training and prediction share q; the
    prediction path, "f" = the head at a draw of q, is pinned below.)"""
    losses = versa_fit["losses"]
    s = versa_fit["cfg"].model.noise_sd
    ey2 = (0.1**2 + 0.1 * 5 + 5**2) / 3 / 2
    zero = ey2 / (2 * s**2) + np.log(s * np.sqrt(2 * np.pi))
    assert losses[-50:].mean() < 0.5 * zero
    assert losses[-50:].mean() < losses[:50].mean() - 1.0


def test_versa_loss_is_the_mean_query_predictive_loglik_of_the_amortized_head(versa_fit):
    """At the fitted parameters and with many head draws (the same method with head_samples = 5000),
    the SVI loss equals minus the exact predictive log-likelihood of the Gaussian head q(w | D) the
    amortization network outputs, averaged over tasks and query points (the mean of log N(y; h^T w, s^2)
    over draws, an ELBO-like objective, would be lower). At prediction, "f" is the head at a draw of
    the same q through the site head_eps."""
    cfg, setup = versa_fit["cfg"], versa_fit["setup"]
    over = dataclasses.replace(cfg.model, params={**cfg.model.params, "head_samples": 5000})
    method, s = registry.build_method(over, 1, 1), cfg.model.noise_sd
    batch = _sample(setup.family, 1, 3)
    net = make_net(cfg.model.net, 1, 1)
    eps = np.random.default_rng(6).normal(size=(3, 1, 33)).astype(np.float32)

    @jax.jit
    def check(key, params, batch, eps):
        k = jax.random.split(key, 3)
        tr = _traced(method.model, params, batch, key=k[0])
        loc, sd = tr["q_loc"]["value"], tr["q_sd"]["value"]
        body = {layer: {k: params[f"theta.body.{layer}.{k}"] for k in "wb"} for layer in net.layer_names[:-1]}
        h_q = jax.vmap(lambda x: net.features(body, x))(batch.x_query)
        exact = jax.vmap(gaussian_predictive_loglik, (0, 0, 0, 0, None))(h_q, batch.y_query, loc, sd, s)
        lower = jax.vmap(gaussian_expected_loglik, (0, 0, 0, 0, None))(h_q, batch.y_query, loc, sd, s)
        loss = Trace_ELBO().loss(k[1], params, method.model, method.guide, batch)
        without_labels = batch._replace(y_query=None)
        pred = _traced(method.model, {**params, "head_eps": eps}, without_labels, training=False, key=k[2])
        head = jax.vmap(head_outputs)(loc + sd * eps, h_q)
        return loss, jnp.mean(exact), jnp.mean(lower), pred["f"]["value"], head

    out = check(jax.random.PRNGKey(0), versa_fit["trained"], batch, eps)
    loss, exact, lower, f, head = jax.tree.map(np.asarray, out)
    np.testing.assert_allclose(loss, -exact, atol=0.03)  # Monte Carlo error about 0.01
    assert exact - lower > 1.0  # a wide q: Jensen's gap is large here
    np.testing.assert_allclose(f, head, rtol=1e-5, atol=1e-5)


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
    batch = jax.tree.map(np.asarray, jax.jit(_classes)(jax.random.PRNGKey(0)))
    eps = np.random.default_rng(5).normal(size=(2, 3, 17)).astype(np.float32)

    @jax.jit
    def traced(key, init_batch, b, e):
        k = jax.random.split(key, 3)
        params = _init(method, init_batch, k[0])
        tr = _traced(
            method.model, {**params, "head_eps": e}, b._replace(y_query=None), training=False, key=k[1]
        )
        loss = Trace_ELBO().loss(k[2], params, method.model, method.guide, b)
        return tr["q_loc"]["value"], tr["q_sd"]["value"], tr["f"]["value"], loss

    def run(b, e):
        return jax.tree.map(np.asarray, traced(jax.random.PRNGKey(1), batch, b, e))

    loc, sd, f, loss = run(batch, eps)
    perm = np.array([2, 0, 1])  # class c is renamed perm[c]
    relabelled = batch._replace(y_support=perm[batch.y_support], y_query=perm[batch.y_query])
    loc2, sd2, f2, loss2 = run(relabelled, eps[:, np.argsort(perm)])  # class perm[c] gets c's noise
    np.testing.assert_allclose(loc2[:, perm], loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd2[:, perm], sd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f2[..., perm], f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=5e-3)
    order = np.random.default_rng(7).permutation(batch.x_support.shape[1])
    shuffled = batch._replace(x_support=batch.x_support[:, order], y_support=batch.y_support[:, order])
    loc3, _, f3, _ = run(shuffled, eps)
    np.testing.assert_allclose(loc3, loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f3, f, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(loc[:, 0] - loc[:, 1])) > 1e-3  # the classes do get different heads
    assert np.max(np.abs(f2 - f)) > 1e-3  # the relabelling did move the probabilities


def test_np_loss_is_the_mean_nll_plus_weighted_kl_between_the_encoders():
    """loss = mean over tasks and query points of -log p(y* | z, x*) at z ~ q(z | C u T), plus lambda
    times the mean over tasks of KL(q(z | C u T) || q(z | C)), lambda unset = 1/K for K = 3 query points
    (K * loss is the per-task negative ELBO); here with the heteroscedastic decoder and the deterministic
    path. The guide's q is the model's encoder on support + query; p(z | C) ignores the query labels."""
    cfg = registry.load_config(
        None,
        [
            *TINY,
            "model.method='np'",
            "model.params.z_dim=3",
            "model.noise='heteroscedastic'",
            "model.params.deterministic_path=true",
        ],
    )
    method = Setup.from_config(cfg).method
    batch = _sample(Setup.from_config(cfg).family, 1, 4)
    union = batch._replace(
        x_support=np.concatenate([batch.x_support, batch.x_query], 1),
        y_support=np.concatenate([batch.y_support, batch.y_query], 1),
    )
    other = batch._replace(y_query=batch.y_query + 1.0)

    @jax.jit
    def check(keys, batch, union, other):
        key = keys[1]
        params = _init(method, batch, keys[0], meanfield=True)
        loss = TraceMeanField_ELBO().loss(key, params, method.model, method.guide, batch)
        g = _traced(method.guide, params, batch, key=jax.random.split(key)[1])  # the ELBO's guide seed
        m = handlers.trace(handlers.replay(handlers.substitute(method.model, data=params), g))
        m = m.get_trace(batch)
        q, p, out = g["z"]["fn"].base_dist, m["z"]["fn"].base_dist, m["y"]["fn"].base_dist
        return {
            "loss": loss,
            "q": (q.loc, q.scale),
            "p": (p.loc, p.scale),
            "y": (out.loc, out.scale),
            "f": m["f"]["value"],
            "on_union": _traced(method.model, params, union, key=keys[2])["z"]["fn"].base_dist.loc,
            "moved": _traced(method.model, params, other, key=keys[2])["z"]["fn"].base_dist.loc,
        }

    r = jax.tree.map(np.asarray, check(jax.random.split(jax.random.PRNGKey(0), 3), batch, union, other))
    (q_loc, q_sd), (p_loc, p_sd), (mean, sd) = r["q"], r["p"], r["y"]
    kl = np.sum(np.log(p_sd / q_sd) + (q_sd**2 + (q_loc - p_loc) ** 2) / (2 * p_sd**2) - 0.5, -1)
    np.testing.assert_allclose(mean, r["f"])
    assert np.std(sd) > 1e-4 and np.min(sd) >= 0.1  # the decoder's sd, floor 0.1
    nll = np.mean(0.5 * ((batch.y_query - mean) / sd) ** 2 + np.log(sd) + 0.5 * np.log(2 * np.pi))
    assert np.mean(kl) > 1e-3
    np.testing.assert_allclose(r["loss"], nll + np.mean(kl) / 3, rtol=1e-5)
    np.testing.assert_allclose(r["on_union"], q_loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["moved"], p_loc)
    # an explicit lambda replaces 1/K (the same function weights the model's and the guide's site)
    assert kl_weight(NP.Params(kl_weight=0.3), 3) == 0.3 and kl_weight(NP.Params(), 4) == 0.25


def test_np_learns_sinusoids_and_samples_functions_from_the_context_prior():
    """300 steps: the loss (negative ELBO per point) drops; the predictive mean, with z ~ p(z | C) and
    no query labels, has an MSE below 60% of the untrained model's and of predicting 0; the draws differ."""
    np_fit = _fit(["model.method='np'", "train.lr=3e-3"])
    setup, losses = np_fit["setup"], np_fit["losses"]
    assert losses[-50:].mean() < losses[:50].mean() - 1.0
    run = predictive(setup.method, 0, 16, ("f",))

    @jax.jit
    def mse(params, key):  # one compilation for both parameter sets
        test = setup.family.sample(key, 50)
        f = run(params, test, jax.random.fold_in(key, 1))["f"]
        return jnp.mean((jnp.mean(f, 0) - test.y_query) ** 2), jnp.mean(test.y_query**2), f

    key = jax.random.PRNGKey(9)
    before, _, _ = mse(np_fit["start"], key)
    after, zero, f = jax.tree.map(np.asarray, mse(np_fit["trained"], key))
    assert after < 0.6 * float(before) and after < 0.6 * zero
    assert f.shape == (16, 50, 10, 1) and np.std(f, 0).mean() > 0.01


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.method='versa'", "model.noise='heteroscedastic'"], "model.noise"),
        (["model.method='np'", "model.likelihood='categorical'"], "model.likelihood"),
    ],
)
def test_config_problems_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        registry.load_config(None, overrides)
