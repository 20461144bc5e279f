"""ALPaCA: the conjugate head against Bishop's closed form on the basis-regression family, its posterior
draws' covariance, the prediction path against the training path's moments, and a short fit whose
predictive must approach the exact one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy import stats

from bayesmeta import registry
from bayesmeta.config import ConfigError
from bayesmeta.fit import make_chunk, make_svi
from bayesmeta.models.alpaca import (
    conjugate_posterior,
    log_evidence,
    posterior_heads,
    predictive_moments,
    prior_precision_factor,
    with_bias,
)
from bayesmeta.run import Setup
from bayesmeta.tasks.basis import features

GOLD = "experiments/gold_standard/base.toml"
AMBIGUOUS = "experiments/ambiguous/base.toml"


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


def test_log_evidence_is_the_marginal_likelihood_of_the_support_set():
    """log p(Y) under MN(K0, Lambda0^-1, s^2 I) equals, per output column, the Gaussian density with
    mean Phi k0 and covariance s^2 (I + Phi Lambda0^-1 Phi^T), computed directly."""
    rng = np.random.default_rng(2)
    phi = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    k0 = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    l0 = prior_precision_factor(jnp.asarray(0.3 * rng.normal(size=(4, 4)), jnp.float32))
    _, ln = conjugate_posterior(phi, y, k0, l0)
    ours = float(log_evidence(phi, y, k0, l0, ln, jnp.asarray(0.7)))
    p64, l64 = np.asarray(phi, np.float64), np.asarray(l0, np.float64)
    cov = 0.49 * (np.eye(6) + p64 @ np.linalg.inv(l64 @ l64.T) @ p64.T)
    direct = sum(
        stats.multivariate_normal(p64 @ np.asarray(k0, np.float64)[:, j], cov).logpdf(np.asarray(y)[:, j])
        for j in range(2)
    )
    assert ours == pytest.approx(direct, rel=1e-4)


def test_evidence_prefers_the_prior_that_generated_the_tasks():
    """On basis-regression tasks drawn from the family's prior, the true prior's evidence beats a prior
    whose mean is shifted by three prior sds on every weight, task by task."""
    _, setup = _gold()
    fam, p = setup.family, setup.family.params
    batch = jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(3), 50)
    l0 = jnp.diag(p.noise_sd / jnp.asarray(p.prior_sd))
    true_k0 = jnp.asarray(p.prior_mean)[:, None]
    wrong_k0 = true_k0 + 3 * jnp.asarray(p.prior_sd)[:, None]

    def ev(xs, ys, k0):
        _, ln = conjugate_posterior(features(xs), ys, k0, l0)
        return log_evidence(features(xs), ys, k0, l0, ln, jnp.asarray(p.noise_sd))

    good = jax.vmap(ev, (0, 0, None))(batch.x_support, batch.y_support, true_k0)
    bad = jax.vmap(ev, (0, 0, None))(batch.x_support, batch.y_support, wrong_k0)
    assert np.mean(np.asarray(good) > np.asarray(bad)) > 0.95


def _mixture(*overrides):
    cfg = registry.load_config(AMBIGUOUS, ["model.method='alpaca_mixture'", *overrides])
    return cfg, Setup.from_config(cfg)


def test_one_component_mixture_is_alpaca():
    """With K = 1 the mixture's training objective and predictive mean are ALPaCA's for the same body,
    prior mean and prior factor."""
    cfg, mix = _mixture("model.params.components=1")
    _, single = _mixture("model.method='alpaca'")
    batch = jax.jit(mix.family.sample, static_argnums=1)(jax.random.PRNGKey(4), 5)
    svi = make_svi(mix.method, cfg.train)
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), batch))
    theta = {k: v for k, v in params.items() if k.startswith("theta.")}
    as_single = {
        k: v[0] if k.endswith(("prior_mean", "prior_factor")) else v
        for k, v in theta.items()
        if not k.endswith("logits")
    }

    def run(model, p):
        tr = handlers.trace(handlers.substitute(model, data=p)).get_trace(batch)
        return tr["alpaca"]["fn"].log_factor, tr["f"]["value"]

    a, fa = jax.jit(lambda p: run(mix.method.model, p))(theta)
    b, fb = jax.jit(lambda p: run(single.method.model, p))(as_single)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-4)


def test_mixture_predictions_draw_components_by_their_posterior_and_average_to_the_training_mean():
    """Prediction mode: the component site has probabilities p(c | D); with head_eps = 0, component c's
    function weighted by p(c | D) and summed is the mixture mean the training path records."""
    cfg, setup = _mixture("model.params.components=3")
    svi = make_svi(setup.method, cfg.train)
    batch = jax.jit(setup.family.sample, static_argnums=1)(jax.random.PRNGKey(5), 4)
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(1), batch))

    @jax.jit
    def parts(params, batch):
        model = handlers.substitute(setup.method.model, data=params)
        train = handlers.trace(model).get_trace(batch)
        fs, probs = [], None
        for c in range(3):
            fixed = {"head_eps": jnp.zeros((4, 41, 1)), "component": jnp.full((4,), c)}
            tr = handlers.trace(handlers.substitute(handlers.seed(model, 0), data=fixed)).get_trace(
                batch._replace(y_query=None), training=False
            )
            fs.append(tr["f"]["value"])
            probs = tr["component"]["fn"].probs
        return train["f"]["value"], jnp.stack(fs, 1), probs

    f_train, f_each, probs = parts(params, batch)
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.einsum("tc,tcnm->tnm", probs, f_each), f_train, rtol=1e-3, atol=1e-3)
