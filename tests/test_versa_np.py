"""VERSA (ML-PIP) and the neural process with a latent path: the linear-Gaussian head's closed forms
against Monte Carlo, the model's objective against the exact predictive, permutation equivariance of
the per-class amortization, the NP's likelihood and KL weights, and short fits that must learn."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

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


def _init(method, batch, elbo=Trace_ELBO()):
    svi = SVI(method.model, method.guide, optax.sgd(0.0), elbo)
    return svi.get_params(svi.init(jax.random.PRNGKey(3), batch))


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
    cfg = registry.load_config(None, [*TINY, "model.method='versa'", "model.params.head_samples=20000"])
    setup = Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(1), 3)
    method, s = setup.method, cfg.model.noise_sd
    params = _init(method, batch)
    tr = handlers.trace(handlers.seed(handlers.substitute(method.model, data=params), 0)).get_trace(batch)
    loc, sd = tr["q_loc"]["value"], tr["q_sd"]["value"]
    net = make_net(cfg.model.net, 1, 1)
    body = {
        layer: {k: params[f"theta.body.{layer}.{k}"] for k in ("w", "b")} for layer in net.layer_names[:-1]
    }
    h_q = jax.vmap(lambda x: net.features(body, x))(batch.x_query)
    exact = jax.vmap(gaussian_predictive_loglik, (0, 0, 0, 0, None))(h_q, batch.y_query, loc, sd, s)
    lower = jax.vmap(gaussian_expected_loglik, (0, 0, 0, 0, None))(h_q, batch.y_query, loc, sd, s)
    loss = Trace_ELBO().loss(jax.random.PRNGKey(2), params, method.model, method.guide, batch)
    np.testing.assert_allclose(float(loss), -float(jnp.mean(exact)), rtol=2e-3)
    assert float(jnp.mean(exact - lower)) > 0.02


def _classes(key, n_tasks=2, ways=3, shots=2, queries=2, x_dim=4):
    """Gaussian blobs: each task draws its own class means; shots + queries points per class."""
    km, kx = jax.random.split(key)
    means = 2.0 * jax.random.normal(km, (n_tasks, ways, 1, x_dim))
    x = means + 0.5 * jax.random.normal(kx, (n_tasks, ways, shots + queries, x_dim))
    y = jnp.broadcast_to(jnp.arange(ways)[None, :, None], x.shape[:3])
    split = (
        lambda a: (
            a[:, :, :shots].reshape(n_tasks, -1, *a.shape[3:]),  # noqa: E731
            a[:, :, shots:].reshape(n_tasks, -1, *a.shape[3:]),
        )
    )
    (xs, xq), (ys, yq) = split(x), split(y)
    return TaskBatch(xs, ys.astype(jnp.int32), xq, yq.astype(jnp.int32), {})


@dataclass(frozen=True)
class Blobs:
    """A tiny classification family for the fit below: 3-way Gaussian blobs in 4 dimensions."""

    x_dim: int = 4
    y_dim: int = 3

    def sample(self, key, n_tasks):
        return _classes(key, n_tasks, self.y_dim, 2, 4, self.x_dim)


def _versa_classifier(*extra):
    cfg = registry.load_config(
        None,
        ["model.method='versa'", "model.likelihood='categorical'", "model.net.hidden=[16]", *extra],
    )
    return cfg, registry.build_method(cfg.model, 4, 3)


def test_versa_classification_is_permutation_equivariant():
    """Relabelling the classes permutes q's rows and the predicted probabilities (given the same head
    noise per class); reordering the support examples changes nothing."""
    _, method = _versa_classifier()
    batch = _classes(jax.random.PRNGKey(0))
    params = _init(method, batch)
    eps = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 17))

    def run(b, e):
        model = handlers.substitute(method.model, data={**params, "head_eps": e})
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(b._replace(y_query=None), training=False)
        return tr["q_loc"]["value"], tr["q_sd"]["value"], tr["f"]["value"]

    loc, sd, f = run(batch, eps)
    perm = jnp.array([2, 0, 1])  # class c is renamed perm[c]
    inv = jnp.argsort(perm)
    relabelled = batch._replace(y_support=perm[batch.y_support])
    loc2, sd2, f2 = run(relabelled, eps[:, inv])  # class perm[c] gets class c's noise
    np.testing.assert_allclose(loc2[:, perm], loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd2[:, perm], sd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f2[..., perm], f, rtol=1e-5, atol=1e-6)
    order = jax.random.permutation(jax.random.PRNGKey(7), batch.x_support.shape[1])
    shuffled = batch._replace(x_support=batch.x_support[:, order], y_support=batch.y_support[:, order])
    loc3, sd3, f3 = run(shuffled, eps)
    np.testing.assert_allclose(loc3, loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f3, f, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(loc[:, 0] - loc[:, 1]))) > 1e-3  # the classes do get different heads


def _np_setup(*extra):
    cfg = registry.load_config(None, [*TINY, "model.method='np'", "model.params.z_dim=3", *extra])
    return cfg, Setup.from_config(cfg)


@pytest.mark.parametrize(
    ("extra", "lam"),
    [
        ((), None),
        (
            (
                "model.params.kl_weight=0.3",
                "model.params.learn_sd=true",
                "model.params.deterministic_path=true",
            ),
            0.3,
        ),
    ],
)
def test_np_loss_is_the_mean_nll_plus_weighted_kl_between_the_encoders(extra, lam):
    """loss = mean over tasks and query points of -log p(y* | z, x*) at z ~ q(z | C u T), plus lambda
    times the mean over tasks of KL(q(z | C u T) || q(z | C)) (unset: lambda = 1/K, K = 3 query points:
    K * loss is the per-task negative ELBO). The guide's q is the model's encoder on support + query."""
    cfg, setup = _np_setup(*extra)
    lam = 1 / 3 if lam is None else lam
    method = setup.method
    batch = setup.family.sample(jax.random.PRNGKey(1), 4)
    params = _init(method, batch, TraceMeanField_ELBO())
    key = jax.random.PRNGKey(2)
    loss = TraceMeanField_ELBO().loss(key, params, method.model, method.guide, batch)
    _, guide_key = jax.random.split(key)  # how the ELBO seeds the guide (one particle)
    g = handlers.trace(handlers.seed(handlers.substitute(method.guide, data=params), guide_key)).get_trace(
        batch
    )
    m = handlers.trace(handlers.replay(handlers.substitute(method.model, data=params), g)).get_trace(batch)
    q, p = g["z"]["fn"].base_dist, m["z"]["fn"].base_dist
    kl = jnp.sum(
        jnp.log(p.scale / q.scale) + (q.scale**2 + (q.loc - p.loc) ** 2) / (2 * p.scale**2) - 0.5, -1
    )
    out = m["y"]["fn"].base_dist
    np.testing.assert_allclose(out.loc, m["f"]["value"])
    if "model.params.learn_sd=true" in extra:
        assert float(jnp.std(out.scale)) > 1e-4 and float(jnp.min(out.scale)) >= 0.1
    else:
        np.testing.assert_allclose(out.scale, cfg.model.noise_sd)
    nll = -jnp.mean(dist.Normal(out.loc, out.scale).log_prob(batch.y_query))
    assert float(jnp.mean(kl)) > 1e-3
    np.testing.assert_allclose(float(loss), float(nll + lam * jnp.mean(kl)), rtol=1e-5)
    # the prior is the encoder on the context alone; the guide is the same encoder on C u T
    union = batch._replace(
        x_support=jnp.concatenate([batch.x_support, batch.x_query], 1),
        y_support=jnp.concatenate([batch.y_support, batch.y_query], 1),
    )
    seeded = handlers.seed(handlers.substitute(method.model, data=params), 0)
    on_union = handlers.trace(seeded).get_trace(union)["z"]["fn"].base_dist
    np.testing.assert_allclose(on_union.loc, q.loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on_union.scale, q.scale, rtol=1e-5)
    other = batch._replace(y_query=batch.y_query + 1.0)
    moved = handlers.trace(seeded).get_trace(other)["z"]["fn"].base_dist
    np.testing.assert_allclose(moved.loc, p.loc)  # p(z | C) does not read the query labels


def _fit(setup, steps, meta_batch=8, family=None):
    """(untrained params, trained params) after `steps` SVI steps of the engine's scanned chunk."""
    family = family or setup.family
    svi = make_svi(setup.method, setup.cfg.train)
    state = svi.init(jax.random.PRNGKey(0), family.sample(jax.random.PRNGKey(1), meta_batch))
    start = svi.get_params(state)
    state, losses, finite = make_chunk(svi, family, meta_batch, jax.random.PRNGKey(2))(
        state, jnp.asarray(0), steps
    )
    assert bool(finite)
    return start, svi.get_params(state)


def _mse(method, params, batch, samples=8):
    f = predictive(method, 0, samples, ("f",))(params, batch, jax.random.PRNGKey(5))["f"]
    return float(jnp.mean((jnp.mean(f, 0) - batch.y_query) ** 2))


FIT = ["model.net.hidden=[32, 32]", "train.lr=3e-3", "train.meta_batch=8"]


def test_versa_learns_sinusoids():
    """300 steps: the held-out ML-PIP loss (the query NLL under the predictive) drops by more than a
    nat, and the predictive mean beats the untrained one."""
    setup = Setup.from_config(registry.load_config(None, ["model.method='versa'", *FIT]))
    start, trained = _fit(setup, 300)
    test = setup.family.sample(jax.random.PRNGKey(9), 50)
    m = setup.method
    held_out = jax.jit(lambda p: Trace_ELBO().loss(jax.random.PRNGKey(4), p, m.model, m.guide, test))
    assert float(held_out(trained)) < float(held_out(start)) - 1.0
    assert _mse(m, trained, test, 16) < 0.85 * _mse(m, start, test, 16)


def test_np_learns_sinusoids_and_samples_functions_from_the_context_prior():
    """300 steps: the predictive mean's MSE falls below 60% of the untrained model's and of predicting
    0; at prediction each draw is a z ~ p(z | C), so draws differ, without the query labels."""
    setup = Setup.from_config(registry.load_config(None, ["model.method='np'", *FIT]))
    start, trained = _fit(setup, 300)
    test = setup.family.sample(jax.random.PRNGKey(9), 50)
    zero = float(jnp.mean(test.y_query**2))
    mse = _mse(setup.method, trained, test)
    assert mse < 0.6 * _mse(setup.method, start, test) and mse < 0.6 * zero
    draws = Predictive(
        partial(setup.method.model, training=False), params=trained, num_samples=4, return_sites=["f", "z"]
    )(jax.random.PRNGKey(0), test._replace(y_query=None))
    assert draws["f"].shape == (4, 50, 10, 1) and draws["z"].shape == (4, 50, 8)
    assert float(jnp.std(draws["z"], 0).mean()) > 0.05


def test_versa_learns_to_classify_blobs():
    """3-way tasks whose class means are new in every task: only the support set tells them apart;
    200 steps lift held-out accuracy from chance to well above it."""
    cfg, method = _versa_classifier("train.lr=3e-3")

    @dataclass
    class S:
        method: object
        cfg: object

    start, trained = _fit(S(method, cfg), 200, family=Blobs())
    test = Blobs().sample(jax.random.PRNGKey(9), 50)

    def accuracy(p):
        f = predictive(method, 0, 4, ("f",))(p, test, jax.random.PRNGKey(5))["f"]
        return float(jnp.mean(jnp.argmax(jnp.mean(f, 0), -1) == test.y_query))

    assert accuracy(trained) > 0.8 and accuracy(trained) > accuracy(start) + 0.2
