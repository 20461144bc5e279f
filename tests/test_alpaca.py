"""ALPaCA: the conjugate head against Bishop's closed form on the basis-regression family, its posterior
draws' covariance, the prediction path against the training path's moments, and a short fit whose
predictive must approach the exact one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from bayesmeta import registry
from bayesmeta.config import ConfigError
from bayesmeta.fit import make_chunk, make_svi
from bayesmeta.models.alpaca import (
    conjugate_posterior,
    posterior_heads,
    predictive_moments,
    prior_precision_factor,
    with_bias,
)
from bayesmeta.run import Setup
from bayesmeta.tasks.basis import features

GOLD = "experiments/gold_standard/base.toml"


def _gold(*overrides):
    cfg = registry.load_config(GOLD, ["model.method='alpaca'", *overrides])
    return cfg, Setup.from_config(cfg)


def test_conjugate_head_on_the_true_features_is_the_exact_predictive():
    """phi = (1, x, sin x, cos x), K0 = the prior mean and Lambda0 = s^2 diag(1 / prior_sd^2) (so the
    weights' prior covariance s^2 Lambda0^-1 is diag(prior_sd^2)): ALPaCA's predictive is the family's
    closed-form posterior predictive, mean and sd."""
    _, setup = _gold()
    fam = setup.family
    batch = jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(0), 6)
    p = fam.params
    l0 = jnp.diag(p.noise_sd / jnp.asarray(p.prior_sd))
    k0 = jnp.asarray(p.prior_mean)[:, None]

    def one(xs, ys, xq):
        kn, ln = conjugate_posterior(features(xs), ys, k0, l0)
        return predictive_moments(features(xq), kn, ln, jnp.asarray(p.noise_sd))

    mean, sd = jax.vmap(one)(batch.x_support, batch.y_support, batch.x_query)
    exact_mean, exact_sd = fam.exact_predictive(batch)
    np.testing.assert_allclose(mean, exact_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sd, exact_sd, rtol=1e-4)


def test_posterior_heads_have_the_posterior_mean_and_covariance():
    """W = K_n + s L_n^-T eps: at eps = 0 the mean K_n; with eps the identity, the columns' outer
    product is s^2 Lambda_n^-1 (the covariance of the draws)."""
    rng = np.random.default_rng(0)
    phi = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(7, 1)), jnp.float32)
    l0 = prior_precision_factor(jnp.asarray(0.3 * rng.normal(size=(4, 4)), jnp.float32))
    kn, ln = conjugate_posterior(phi, y, jnp.zeros((4, 1)), l0)
    np.testing.assert_allclose(posterior_heads(kn, ln, 0.5, jnp.zeros((4, 1))), kn)
    m = posterior_heads(jnp.zeros((4, 4)), ln, 0.5, jnp.eye(4))
    cov = 0.25 * np.linalg.inv(np.asarray(l0 @ l0.T + phi.T @ phi, np.float64))
    np.testing.assert_allclose(m @ m.T, cov, rtol=1e-4, atol=1e-6)


def test_prior_factor_is_positive_definite_and_identity_at_zero():
    np.testing.assert_array_equal(prior_precision_factor(jnp.zeros((3, 3))), np.eye(3))
    raw = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5)) * 3, jnp.float32)
    lam = prior_precision_factor(raw) @ prior_precision_factor(raw).T
    assert np.all(np.linalg.eigvalsh(np.asarray(lam, np.float64)) > 0)


@pytest.fixture(scope="module")
def gold_fit():
    """1,500 SVI steps of ALPaCA with learned noise on the gold-standard family (meta-batch 10)."""
    cfg, setup = _gold("model.noise='learned'")
    fam = setup.family
    svi = make_svi(setup.method, cfg.train)
    state = jax.jit(lambda k: svi.init(k, fam.sample(jax.random.fold_in(k, 1), 10)))(jax.random.PRNGKey(0))
    trained, losses, finite = make_chunk(svi, fam, 10)(state, jnp.asarray(0), 1500, jax.random.PRNGKey(2))
    assert bool(finite)
    return {"setup": setup, "params": svi.get_params(trained), "losses": np.asarray(losses)}


def test_alpaca_learns_a_predictive_close_to_the_exact_one(gold_fit):
    """On 200 new tasks the training objective (minus the mean query log predictive) comes within 0.25
    nats of the exact predictive's NLL (it starts above 1.5 nats away), and the learned noise sd within
    20% of the true 0.3."""
    setup, params = gold_fit["setup"], gold_fit["params"]
    fam = setup.family
    batch = jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(7), 200)

    @jax.jit
    def nll(params, batch):
        tr = handlers.trace(handlers.substitute(setup.method.model, data=params)).get_trace(batch)
        mean, sd = fam.exact_predictive(batch)
        exact = -jnp.mean(jax.scipy.stats.norm.logpdf(batch.y_query, mean, sd))
        return -tr["alpaca"]["fn"].log_factor, exact

    ours, exact = (float(v) for v in nll(params, batch))
    assert gold_fit["losses"][:20].mean() > exact + 1.5
    assert ours < exact + 0.25
    assert params["noise_sd"] == pytest.approx(0.3, rel=0.2)


def test_prediction_draws_are_heads_of_the_training_posterior(gold_fit):
    """Prediction mode (labels withheld): with head_eps = 0 the sampled function is the predictive mean
    the training objective scores."""
    setup, params = gold_fit["setup"], gold_fit["params"]
    batch = jax.jit(setup.family.sample, static_argnums=1)(jax.random.PRNGKey(8), 3)

    @jax.jit
    def both(params, batch):
        model = handlers.substitute(setup.method.model, data=params)
        train = handlers.trace(model).get_trace(batch)
        eps = {"head_eps": jnp.zeros((3, 41, 1))}
        pred = handlers.trace(handlers.substitute(handlers.seed(model, 0), data=eps)).get_trace(
            batch._replace(y_query=None), training=False
        )
        return train["f"]["value"], pred["f"]["value"]

    f_train, f_pred = both(params, batch)
    np.testing.assert_allclose(f_pred, f_train, rtol=1e-4, atol=1e-4)


def test_with_bias_appends_a_constant_feature():
    np.testing.assert_array_equal(with_bias(jnp.zeros((2, 3, 4)))[..., -1], np.ones((2, 3)))


def test_classification_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.likelihood"):
        registry.load_config(None, ["model.method='alpaca'", "model.likelihood='categorical'"])
