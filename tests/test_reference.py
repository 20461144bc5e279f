"""The importance-sampled exact predictive (bayesmeta.diagnostics.reference) against closed forms."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesmeta.diagnostics.reference import (
    all_covered,
    importance_reference,
    systematic_resample,
    task_posterior,
)
from bayesmeta.tasks.ambiguous import SineLine
from bayesmeta.tasks.base import PriorDraws
from bayesmeta.tasks.basis import BasisRegression


def _posterior(fam, batch, draws):
    one = jax.jit(lambda t: task_posterior(fam, jax.random.PRNGKey(0), t, draws, 256))
    extra = jnp.zeros((batch.n_tasks, 0, 1))
    return jax.lax.map(one, (batch.x_support, batch.y_support, batch.x_query, batch.y_query, extra))


def test_importance_posterior_matches_the_closed_form_linear_gaussian_predictive():
    """On Bayesian linear regression the importance-sampled predictive mean and NLL agree with the
    closed form (Bishop 2006, 3.3) within Monte Carlo error, and the error shrinks with the draws."""
    fam = BasisRegression(BasisRegression.Params(), shots=2, queries=10)
    assert isinstance(fam, PriorDraws)
    batch = fam.sample(jax.random.PRNGKey(3), 20)
    mean, sd = fam.exact_predictive(batch)
    exact_nll = float(jnp.mean(-jax.scipy.stats.norm.logpdf(batch.y_query, mean, sd)))
    errors = []
    for draws in (2**12, 2**16):
        out = _posterior(fam, batch, draws)
        errors.append(float(jnp.mean(jnp.abs(out["mean"] - mean) / sd)))
    assert errors[1] < 0.05 < errors[0]
    assert float(jnp.mean(out["nll"])) == pytest.approx(exact_nll, abs=0.05)
    assert np.mean(np.abs(np.asarray(out["pit"]) - 0.5) <= 0.45) == pytest.approx(0.9, abs=0.06)


def test_the_resampled_draws_carry_the_posterior():
    """The equally weighted resample gives the weighted draws' predictive mean within its standard error."""
    fam = BasisRegression(BasisRegression.Params(), shots=2, queries=10)
    batch = fam.sample(jax.random.PRNGKey(4), 5)
    out = _posterior(fam, batch, 2**14)
    resampled = np.moveaxis(np.asarray(out["resampled"]), 1, 0)  # (256, T, q, 1)
    se = resampled.std(0) / np.sqrt(resampled.shape[0])  # at most this, systematic resampling being finer
    assert np.all(np.abs(resampled.mean(0) - np.asarray(out["mean"])) <= 4 * se + 1e-3)


def test_systematic_resampling_keeps_each_draw_within_one_of_its_share():
    w = jax.random.dirichlet(jax.random.PRNGKey(0), jnp.ones(50))
    idx = systematic_resample(jax.random.PRNGKey(1), w, 1000)
    counts = np.bincount(np.asarray(idx), minlength=50)
    assert counts.sum() == 1000
    assert np.all(np.abs(counts - 1000 * np.asarray(w)) < 1 + 1e-4)


def test_all_covered_is_inclusion_exclusion_of_the_hypothesis_masses():
    """Two hypotheses: 1 - p^S - (1 - p)^S; three: the probability of every class among S
    categorical draws, counted by enumerating all 3^S outcomes for S = 4."""
    p = np.array([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(all_covered(p, 20), 1 - p[:, 0] ** 20 - p[:, 1] ** 20)
    q = np.array([0.2, 0.5, 0.3])
    brute = sum(np.prod(q[list(o)]) for o in itertools.product(range(3), repeat=4) if len(set(o)) == 3)
    assert all_covered(q[None], 4)[0] == pytest.approx(brute)


def test_reference_on_the_sine_line_family_covers_its_nominal_levels_and_counts_modes():
    """The exact predictive is calibrated on tasks drawn from its own prior (coverage at nominal within
    sampling error), and mode coverage is a probability on the ambiguous subset."""
    fam = SineLine(SineLine.Params(), shots=2, queries=10)
    batch = fam.sample(jax.random.PRNGKey(5), 60)
    ref = importance_reference(fam, batch, samples=20, key=jax.random.PRNGKey(0), draws=2**14, keep=512)
    assert ref.coverage[0.9] == pytest.approx(0.9, abs=0.04)
    assert ref.coverage[0.5] == pytest.approx(0.5, abs=0.06)
    assert ref.n_ambiguous == 60  # every set of at most 2 points is ambiguous
    assert 0 < ref.mode_coverage_ambiguous <= 1
    assert ref.ess_min > 1


def test_exact_reference_reads_the_experiment_config_and_refuses_a_family_without_a_prior(tmp_path):
    from bayesmeta.config import ConfigError
    from bayesmeta.experiment import exact_reference, reference_table

    base = Path(__file__).parents[1] / "experiments" / "ambiguous" / "base.toml"
    small = ("task.shots=2", "eval.tasks=20", "eval.batch=20", "eval.memorization_tasks=10")
    cache = tmp_path / "exact.json"
    ref = exact_reference(base, small, draws=2**12, cache=cache)
    assert ref.n_ambiguous == 10 and ref.draws == 2**12
    assert exact_reference(base, small, draws=2**12, cache=cache) == ref  # read back, floats as keys
    stored = json.loads(cache.read_text())
    (key,) = stored
    cache.write_text(json.dumps({key: stored[key] | {"nll": 123.0}}))  # a hit is read, not recomputed
    assert exact_reference(base, small, draws=2**12, cache=cache).nll == 123.0
    assert exact_reference(base, small, draws=2**11, cache=cache).draws == 2**11  # another key
    for bad in ("{not json", json.dumps({key: {"nll": 1.0}})):  # unreadable: recomputed and rewritten
        cache.write_text(bad)
        assert exact_reference(base, small, draws=2**12, cache=cache) == ref
    assert len(json.loads(cache.read_text())) == 1
    assert "| 2-shot |" in reference_table({"2-shot": ref})
    with pytest.raises(ConfigError, match=r"eval\.task: family 'sinusoid' cannot sample its prior"):
        exact_reference(base, (*small, "task.family='sinusoid'", "task.params={}"), draws=2**10)
