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
    mixture_pit,
    mixture_quantile,
    mode_coverage,
    pit_ks,
    sine_like,
)
from bayesmeta.registry import make_family


def _exact_draws(s=20, n=20000, seed=0, sd_f=0.8, noise=0.6):
    """An exact predictive drawn as the engine draws one: per point a posterior over f, N(0, sd_f^2),
    S sampled functions f_s and Gaussian noise; y comes from the same predictive, N(0, sd_f^2 + noise^2)."""
    rng = np.random.default_rng(seed)
    f = sd_f * rng.normal(size=(s, n))
    y = np.sqrt(sd_f**2 + noise**2) * rng.normal(size=n)
    return f, noise, y


def test_exact_predictive_covers_at_nominal():
    """Draws of an exact predictive: the PIT F(y) of the mixture is U(0, 1) and its coverage nominal
    (S = 200 function draws). With S = 20 the mixture still covers within 3 points of nominal at 0.9,
    where the sample quantiles of 20 sampled y cover (S - 1) l / (S + 1), 0.81."""
    f, noise, y = _exact_draws(s=200)
    u = mixture_pit(f, noise, y)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    for level, cov in coverage(u).items():
        assert cov == pytest.approx(level, abs=0.012)
    f, noise, y = _exact_draws(s=20)
    assert coverage(mixture_pit(f, noise, y))[0.9] == pytest.approx(0.9, abs=0.03)
    y_draws = f + noise * np.random.default_rng(1).normal(size=f.shape)
    lo, hi = np.quantile(y_draws, [0.05, 0.95], axis=0)
    assert np.mean((y >= lo) & (y <= hi)) == pytest.approx(19 * 0.9 / 21, abs=0.012)


def test_mixture_quantiles_invert_its_cdf_and_give_known_widths():
    """One component: the width of N(m, s^2)'s central interval, 2 z s; two: F(Q(q)) = q."""
    means = np.array([[0.3, -1.0]])
    for level, width in interval_width(means, 0.5).items():
        assert width == pytest.approx(2 * 0.5 * stats.norm.ppf((1 + level) / 2), rel=1e-6)
    two = np.array([[0.0, 2.0], [3.0, 2.5]])
    sd = np.array([[0.5, 0.1], [1.0, 0.3]])
    for q in (0.05, 0.5, 0.9):
        x = mixture_quantile(two, sd, q)
        np.testing.assert_allclose(mixture_pit(two, sd, x), q, atol=1e-9)


def test_overconfident_predictive_undercovers_by_the_known_amount():
    """Predictive N(0, 0.5^2) for data N(0, 1): the central level-l interval covers 2 Phi(0.5 z_l) - 1,
    and its PIT piles up at 0 and 1 (a U shape)."""
    y = np.random.default_rng(2).normal(size=20000)
    u = mixture_pit(np.zeros((20, 1)), 0.5, y)
    for level, cov in coverage(u).items():
        expected = 2 * stats.norm.cdf(0.5 * stats.norm.ppf((1 + level) / 2)) - 1
        assert cov == pytest.approx(expected, abs=0.012)
        assert cov < level - 0.1
    assert np.mean(np.abs(u - 0.5) > 0.4) > 0.4  # 20% for a calibrated one


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
