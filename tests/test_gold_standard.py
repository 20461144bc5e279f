"""The gold-standard family's closed-form posterior predictive: calibrated on its own prior, and equal
to NUTS on the same hierarchical model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS

from bayesmeta import registry
from bayesmeta.registry import make_family
from bayesmeta.tasks.basis import features


def _family(shots=3):
    return make_family(
        registry.load_config(
            None, ["task.family='basis_regression'", f"task.shots={shots}", "task.queries=8"]
        ).task
    )


def test_exact_predictive_is_calibrated_on_tasks_from_its_prior():
    fam = _family()
    batch = fam.sample(jax.random.PRNGKey(0), 20000)
    mean, sd = fam.exact_predictive(batch)
    z = (batch.y_query - mean) / sd
    for level in (0.5, 0.9):
        half = float(jax.scipy.stats.norm.ppf((1 + level) / 2))
        assert float(jnp.mean(jnp.abs(z) <= half)) == pytest.approx(level, abs=0.01)
    assert float(jnp.std(z)) == pytest.approx(1.0, abs=0.02)


def test_exact_predictive_matches_nuts():
    fam = _family(shots=4)
    batch = fam.sample(jax.random.PRNGKey(1), 1)
    p = fam.params

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(jnp.asarray(p.prior_mean), jnp.asarray(p.prior_sd)).to_event(1))
        numpyro.sample("y", dist.Normal(features(x) @ w, p.noise_sd), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=4000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(2), batch.x_support[0], batch.y_support[0, :, 0])
    w = mcmc.get_samples()["w"]
    f = features(batch.x_query[0]) @ w.T  # (Q, S)
    mean, sd = fam.exact_predictive(batch)
    np.testing.assert_allclose(f.mean(1), mean[0, :, 0], atol=0.05)
    np.testing.assert_allclose(jnp.sqrt(f.var(1) + p.noise_sd**2), sd[0, :, 0], rtol=0.05)
