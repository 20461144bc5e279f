"""Calibration diagnostics on synthetic predictive distributions whose answers are known."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bayesmeta import registry
from bayesmeta.diagnostics.calibration import (
    coverage,
    expected_calibration_error,
    interval_width,
    mixture_nll,
    mode_coverage,
    pit,
    pit_ks,
    sine_like,
)
from bayesmeta.registry import make_family


def _draws(sd_pred, n=20000, s=400, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    samples = sd_pred * jax.random.normal(k1, (s, n))
    y = jax.random.normal(k2, (n,))
    return samples, y


def test_calibrated_predictive_covers_at_nominal_and_has_uniform_pit():
    samples, y = _draws(1.0)
    for level, cov in coverage(samples, y).items():
        assert cov == pytest.approx(level, abs=0.015)
    u = np.asarray(pit(samples, y, jax.random.PRNGKey(1)))
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    assert stats.chisquare(counts).pvalue > 1e-3
    for level, width in interval_width(samples).items():
        assert width == pytest.approx(2 * stats.norm.ppf((1 + level) / 2), rel=0.03)


def test_pit_of_few_draws_is_continuous_and_uniform():
    """With S = 20 draws the fraction of draws below y takes only 21 values, which a 20-bin histogram
    or a KS test reads as miscalibration; the randomized PIT of the same calibrated draws is U(0, 1)."""
    samples, y = _draws(1.0, s=20)
    u = np.asarray(pit(samples, y, jax.random.PRNGKey(1)))
    assert len(np.unique(u)) > 0.99 * u.size  # not restricted to S + 1 levels
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert stats.chisquare(np.histogram(u, bins=20, range=(0, 1))[0]).pvalue > 1e-3
    fraction = np.asarray(jnp.mean(samples < y, axis=0))
    assert len(np.unique(fraction)) == 21 and stats.kstest(fraction, "uniform").pvalue < 1e-6


def test_pit_breaks_ties_of_a_discrete_predictive_uniformly():
    """Draws and observations from the same 4-valued distribution: most draws tie with y, and the
    randomized PIT is still U(0, 1); an overdispersed predictive gives a hump-shaped PIT instead."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    samples = jax.random.binomial(k1, 3, 0.5, (10, 20000))
    y = jax.random.binomial(k2, 3, 0.5, (20000,))
    u = np.asarray(pit(samples, y, k3))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    wide = jax.random.binomial(k1, 9, 0.5, (10, 20000)) - 3  # same mean, 3x the variance
    u_wide = np.asarray(pit(wide, y, k3))
    assert np.mean(np.abs(u_wide - 0.5) < 0.25) > 0.6  # mass in the middle: the predictive is too wide


def test_overconfident_predictive_undercovers_by_the_known_amount():
    """Predictive N(0, 0.5^2) for data N(0, 1): the central level-l interval covers 2 Phi(0.5 z_l) - 1."""
    samples, y = _draws(0.5)
    for level, cov in coverage(samples, y).items():
        expected = 2 * stats.norm.cdf(0.5 * stats.norm.ppf((1 + level) / 2)) - 1
        assert cov == pytest.approx(expected, abs=0.015)
        assert cov < level - 0.1


def test_mixture_nll_matches_the_exact_density():
    """One sampled function: the Gaussian NLL; two equally weighted: the two-component mixture's."""
    y = jnp.array([0.3, -1.0])
    one = mixture_nll(jnp.zeros((1, 2)), 0.5, y)
    np.testing.assert_allclose(one, -stats.norm.logpdf(np.asarray(y), 0, 0.5), rtol=1e-5)
    two = mixture_nll(jnp.array([[0.0, 0.0], [1.0, 1.0]]), 0.5, y)
    exact = -np.log(0.5 * stats.norm.pdf(np.asarray(y), 0, 0.5) + 0.5 * stats.norm.pdf(np.asarray(y), 1, 0.5))
    np.testing.assert_allclose(two, exact, rtol=1e-5)


def test_sine_and_line_hypotheses_are_told_apart():
    fam = make_family(
        registry.load_config(None, ["task.family='sine_line'", "task.params.noise_sd=0.0"]).task
    )
    b = fam.sample(jax.random.PRNGKey(0), 400)
    x = jnp.linspace(-5, 5, 100)
    f = fam.truth(b.info, jnp.broadcast_to(x[None, :, None], (400, 100, 1)))[..., 0]
    kinds = sine_like(f, x)
    # tiny amplitudes look like flat lines; every other task is classified by its true kind
    clear = (b.info["sine"] == 0) | (b.info["amplitude"] > 0.5)
    np.testing.assert_array_equal(kinds[clear], b.info["sine"][clear] == 1)
    # S = 2 samples per task: both kinds present exactly where one sine and one line are paired
    both = jnp.stack([f[:200], f[200:]])
    expected = np.mean(np.asarray(kinds[:200] != kinds[200:]))
    assert mode_coverage(both, x) == pytest.approx(expected)
    assert mode_coverage(jnp.stack([f[:200], f[:200]]), x) == 0.0


def test_two_points_are_always_ambiguous_and_a_clean_sine_is_not():
    fam2 = make_family(registry.load_config(None, ["task.family='sine_line'", "task.shots=2"]).task)
    assert bool(np.all(fam2.ambiguous(fam2.sample(jax.random.PRNGKey(0), 50))))
    fam = make_family(
        registry.load_config(
            None,
            [
                "task.family='sine_line'",
                "task.shots=10",
                "task.params.noise_sd=0.01",
                "task.params.p_sine=1.0",
                "task.params.amplitude=[3.0, 5.0]",
            ],
        ).task
    )
    assert not bool(np.any(fam.ambiguous(fam.sample(jax.random.PRNGKey(1), 50))))


def test_ece_is_zero_when_calibrated_and_known_when_overconfident():
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, n)
    y = (rng.uniform(size=n) > conf).astype(int)  # class 0 is right with probability conf
    probs = np.stack([conf, 1 - conf], -1)
    ece, diagram = expected_calibration_error(probs, y)
    assert ece < 0.01
    # claim 0.99 confidence, be right 70% of the time: ECE = 0.29
    y2 = (rng.uniform(size=n) > 0.7).astype(int)
    ece2, _ = expected_calibration_error(np.tile([0.99, 0.01], (n, 1)), y2)
    assert ece2 == pytest.approx(0.29, abs=0.01)
    assert diagram["count"].sum() == n


def test_reliability_diagram_is_drawn(tmp_path):
    from bayesmeta.report import plot_reliability

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=2000)
    y = rng.integers(0, 5, 2000)
    ece, diagram = expected_calibration_error(probs, y)
    # labels independent of the probabilities: accuracy ~ 1/5 whatever the confidence
    acc = diagram["accuracy"][diagram["count"] > 100]
    assert np.all(np.abs(acc - 0.2) < 0.1)
    assert ece == pytest.approx(np.mean(probs.max(-1)) - 0.2, abs=0.03)
    path = plot_reliability(diagram, ece, tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pit_ks_is_the_kolmogorov_smirnov_distance_from_uniform():
    """Against scipy's KS statistic; about 1/n for an evenly spread sample, 1 - 1/n for a point mass at 0."""
    u = jax.random.uniform(jax.random.PRNGKey(0), (500,)) ** 2  # skewed towards 0
    assert pit_ks(u) == pytest.approx(stats.kstest(np.asarray(u), "uniform").statistic, rel=1e-5)
    even = (jnp.arange(100) + 0.5) / 100
    assert pit_ks(even) == pytest.approx(0.005, abs=1e-6)
    assert pit_ks(jnp.zeros(10)) == pytest.approx(1.0)


def test_exact_calibration_reports_the_exact_mean_squared_error():
    from bayesmeta.sections import exact_calibration

    fam = make_family(registry.load_config(None, ["task.family='basis_regression'", "task.shots=5"]).task)
    batch = fam.sample(jax.random.PRNGKey(3), 4000)
    _, sd = fam.exact_predictive(batch)
    out = exact_calibration(fam, batch)
    # the exact predictive's MSE is its mean variance (up to sampling): E (y - mean)^2 = E sd^2
    assert out.mse == pytest.approx(float(jnp.mean(jnp.square(sd))), rel=0.03)
