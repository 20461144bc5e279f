"""Calibration of posterior predictive samples: NLL, central-interval coverage, PIT, sharpness, mode
coverage for the sine/line family, and ECE for classification. Pure functions of arrays; the summaries
run in NumPy (each is one pass over the draws, and eager JAX would compile a program per shape)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp, ndtr

LEVELS = (0.5, 0.8, 0.9, 0.95)


def mixture_nll(means: np.ndarray, sd: float | np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-point -log (1/S) sum_s N(y; mean_s, sd^2): the predictive NLL of S sampled functions
    (means (S, ...), y (...)) with Gaussian observation noise."""
    means, sd, y = np.asarray(means), np.asarray(sd), np.asarray(y)
    logp = -0.5 * np.square((y - means) / sd) - np.log(sd) - 0.5 * np.log(2 * np.pi)
    return -(logsumexp(logp, axis=0) - np.log(means.shape[0]))


def mixture_pit(means: np.ndarray, sd: float | np.ndarray, y: np.ndarray) -> np.ndarray:
    """u = F(y) = (1/S) sum_s Phi((y - mean_s) / sd_s): the probability integral transform of y under
    the predictive of S sampled functions (means (S, ...)) with Gaussian observation noise (sd a number
    or broadcasting with means), the mixture the engine's draws stand for. The noise is integrated
    exactly, so u is U(0, 1) for a calibrated predictive whatever S (Gneiting et al. 2007); ranks of S
    sampled y would be too, but the central interval between the sample quantiles of S sampled y covers
    only about (S - 1) l / (S + 1) at level l even when the predictive is exact (order statistics:
    0.81 at a nominal 0.9 for S = 20)."""
    means, sd, y = np.asarray(means), np.asarray(sd), np.asarray(y)
    return np.mean(ndtr((y - means) / sd), axis=0)


def coverage(u: np.ndarray, levels: tuple[float, ...] = LEVELS) -> dict[float, float]:
    """Fraction of observations inside the predictive's central `level` interval, from their PIT
    values u: y lies in [F^-1((1 - l) / 2), F^-1((1 + l) / 2)] exactly when |u - 1/2| <= l / 2."""
    u = np.asarray(u)
    return {level: float(np.mean(np.abs(u - 0.5) <= level / 2)) for level in levels}


def mixture_quantile(means: np.ndarray, sd: float | np.ndarray, q: float, iters: int = 50) -> np.ndarray:
    """F^-1(q) per point of the mixture (1/S) sum_s N(mean_s, sd_s^2) (means (S, ...)), by bisection on
    its CDF between min_s (mean_s - 10 sd_s) and max_s (mean_s + 10 sd_s); 50 halvings of that bracket
    leave an error far below float32 resolution of the data."""
    means, sd = np.asarray(means, np.float64), np.asarray(sd, np.float64)
    lo, hi = np.min(means - 10 * sd, axis=0), np.max(means + 10 * sd, axis=0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = np.mean(ndtr((mid - means) / sd), axis=0) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def interval_width(
    means: np.ndarray, sd: float | np.ndarray, levels: tuple[float, ...] = LEVELS
) -> dict[float, float]:
    """Mean width of the mixture predictive's central intervals, F^-1((1 + l) / 2) - F^-1((1 - l) / 2)
    (sharpness)."""
    return {
        level: float(
            np.mean(
                mixture_quantile(means, sd, (1 + level) / 2) - mixture_quantile(means, sd, (1 - level) / 2)
            )
        )
        for level in levels
    }


def pit_ks(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance sup_u |F_n(u) - u| of PIT values from U(0, 1): 0 for a perfectly
    calibrated predictive (up to sampling, about 1.36 / sqrt(n) at 95% for n independent values)."""
    u = np.sort(np.ravel(u))
    n = u.shape[0]
    i = np.arange(1, n + 1)
    return float(np.max(np.maximum(i / n - u, u - (i - 1) / n)))


def sine_like(f: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """For functions f (..., G) on a grid x (G,): True where a sinusoid a sin x + b cos x + c fits
    better (smaller residual) than a line m x + c."""
    ones = jnp.ones_like(x)
    line = jnp.stack([x, ones], -1)
    sine = jnp.stack([jnp.sin(x), jnp.cos(x), ones], -1)

    def residual(basis: jnp.ndarray) -> jnp.ndarray:
        proj = basis @ jnp.linalg.pinv(basis)  # (G, G) projection onto the basis
        return jnp.sum(jnp.square(f - f @ proj.T), -1)

    return residual(sine) < residual(line)


def mode_coverage(f: jnp.ndarray, x: jnp.ndarray) -> float:
    """Fraction of tasks whose S sampled functions f (S, T, G) include both a sine-like and a
    line-like one."""
    kinds = sine_like(f, x)
    return float(jnp.mean(jnp.any(kinds, 0) & jnp.any(~kinds, 0)))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> tuple[float, dict]:
    """ECE of class probabilities (..., C) against labels (...): sum_b |acc_b - conf_b| n_b / n over
    equal-width confidence bins; also returns the reliability diagram's data."""
    probs, y = np.asarray(probs).reshape(-1, np.shape(probs)[-1]), np.asarray(y).reshape(-1)
    conf, pred = probs.max(-1), probs.argmax(-1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    acc_b, conf_b, n_b = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for b in range(bins):
        m = which == b
        n_b[b] = m.sum()
        if n_b[b]:
            acc_b[b], conf_b[b] = (pred[m] == y[m]).mean(), conf[m].mean()
    ece = float(np.sum(np.abs(acc_b - conf_b) * n_b) / max(n_b.sum(), 1))
    return ece, {"edges": edges, "accuracy": acc_b, "confidence": conf_b, "count": n_b}
