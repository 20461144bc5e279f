"""model.noise: the Gaussian observation sd fixed, learned (one numpyro.param per model) or
heteroscedastic (sd(x) = 0.1 + 0.9 softplus(r(x)) from a second block of outputs), for every
regression method through the shared likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy import stats

from bayesmeta import registry, run
from bayesmeta.adapt import adapt_tasks
from bayesmeta.config import ConfigError
from bayesmeta.likelihoods import NOISE_SITE, SD_SITE, Gaussian, make_likelihood
from bayesmeta.nets import make_net
from bayesmeta.predict import predictive
from tests.helpers import TINY


def test_the_heteroscedastic_head_is_a_gaussian_with_its_own_sd_per_point():
    lik = Gaussian(0.3, heteroscedastic=True)
    out = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 2))  # (T, n, 2 y_dim): f and r, y_dim 1
    y = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 1))
    f, r = out[..., :1], out[..., 1:]
    sd = 0.1 + 0.9 * np.log1p(np.exp(np.asarray(r)))
    assert lik.out_dim(1) == 2 and np.allclose(lik.mean(out), f)
    np.testing.assert_allclose(lik.dist(out).log_prob(y), stats.norm.logpdf(y, f, sd)[..., 0], rtol=1e-5)
    np.testing.assert_allclose(lik.sites(out)[SD_SITE], sd, rtol=1e-6)
    assert float(lik.loss(out, y)) == pytest.approx(
        float(jnp.mean(jnp.square(y - f))), rel=1e-6
    )  # inner: MSE
    # the engine's pointwise log-likelihood of a draw uses that draw's per-point sd
    draws = {SD_SITE: jnp.asarray(sd)[None]}
    np.testing.assert_allclose(
        lik.at({}, draws).log_prob(f[None], y), stats.norm.logpdf(y, f, sd)[None, ..., 0], rtol=1e-5
    )
    with pytest.raises(ValueError, match="per draw"):
        lik.at({})


@pytest.mark.parametrize("method", ["maml", "cnp"])  # an inner-loop method and a decoder: one observe path
def test_a_learned_sd_is_one_positive_param_started_at_noise_sd(method):
    cfg = registry.load_config(
        None, [*TINY, f"model.method='{method}'", "model.noise='learned'", "model.noise_sd=0.7"]
    )
    setup = run.Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(0), 2)
    tr = handlers.trace(handlers.seed(setup.method.model, 0)).get_trace(batch)
    site = tr[NOISE_SITE]
    assert site["type"] == "param" and float(site["value"]) == pytest.approx(0.7)
    assert float(tr["y"]["fn"].base_dist.scale.mean()) == pytest.approx(0.7)  # y observed with it
    assert setup.method.likelihood.at({NOISE_SITE: jnp.asarray(0.2)}).sd == pytest.approx(0.2)


def test_a_heteroscedastic_method_records_each_draws_sd():
    """Each draw's recorded sd is 0.1 + 0.9 softplus(r) of the second output block of the network at the
    task's adapted parameters (one inner step on the MSE of the first block, f), point by point."""
    cfg = registry.load_config(None, [*TINY, "model.method='maml'", "model.noise='heteroscedastic'"])
    setup = run.Setup.from_config(cfg)
    batch = setup.family.sample(jax.random.PRNGKey(0), 3)
    tr = handlers.trace(handlers.seed(setup.method.model, 0)).get_trace(batch)
    params = {k: v["value"] for k, v in tr.items() if v["type"] == "param"}
    out = predictive(setup.method, 1, 4, ("f", SD_SITE))(params, batch, jax.random.PRNGKey(1))
    assert out["f"].shape == out[SD_SITE].shape == (4, 3, batch.x_query.shape[1], 1)
    assert float(out[SD_SITE].min()) >= 0.1
    # by hand: a network of 2 outputs (f, r), adapted on its f's MSE with the configured inner rate
    net = make_net(cfg.model.net, 1, 2)
    theta = {lay: {w: params[f"theta.{lay}.{w}"] for w in "wb"} for lay in net.layer_names}

    def loss(p, x, y):
        return jnp.mean(jnp.square(net.apply(p, x)[..., :1] - y))

    phi, _ = adapt_tasks(loss, theta, batch.x_support, batch.y_support, steps=1, lr=cfg.model.inner_lr)
    head = np.asarray(jax.vmap(net.apply)(phi, batch.x_query), np.float64)  # (T, n, 2)
    f, sd = head[..., :1], 0.1 + 0.9 * np.log1p(np.exp(head[..., 1:]))
    assert np.std(sd) > 1e-2  # a recorded constant would not match
    for s in range(4):  # MAML's draws share phi: each draw records the same per-point sd
        np.testing.assert_allclose(out["f"][s], f, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[SD_SITE][s], sd, rtol=1e-5, atol=1e-6)


def test_noise_other_than_fixed_needs_a_gaussian_likelihood():
    with pytest.raises(ConfigError, match=r"model\.noise: 'learned' needs model\.likelihood = 'gaussian'"):
        registry.load_config(None, ["model.noise='learned'", "model.likelihood='categorical'"])
    cfg = registry.load_config(None, ["model.noise='heteroscedastic'"])
    assert make_likelihood(cfg.model).heteroscedastic
