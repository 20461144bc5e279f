"""Calibration of posterior predictive samples: NLL, central-interval coverage, PIT, sharpness, mode
coverage for the sine/line family, and ECE for classification. Pure functions of arrays; the summaries
run in NumPy (each is one pass over the draws, and eager JAX would compile a program per shape)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

LEVELS = (0.5, 0.8, 0.9, 0.95)


def mixture_nll(means: np.ndarray, sd: float | np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-point -log (1/S) sum_s N(y; mean_s, sd^2): the predictive NLL of S sampled functions
    (means (S, ...), y (...)) with Gaussian observation noise."""
    means, sd, y = np.asarray(means), np.asarray(sd), np.asarray(y)
    logp = -0.5 * np.square((y - means) / sd) - np.log(sd) - 0.5 * np.log(2 * np.pi)
    return -(logsumexp(logp, axis=0) - np.log(means.shape[0]))


def coverage(samples: np.ndarray, y: np.ndarray, levels: tuple[float, ...] = LEVELS) -> dict[float, float]:
    """Fraction of y inside the central `level` interval of the predictive samples (S, ...)."""
    samples, y = np.asarray(samples), np.asarray(y)
    out = {}
    for level in levels:
        lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out[level] = float(np.mean((y >= lo) & (y <= hi)))
    return out


def interval_width(samples: np.ndarray, levels: tuple[float, ...] = LEVELS) -> dict[float, float]:
    """Mean width of the central intervals (sharpness)."""
    samples = np.asarray(samples)
    out = {}
    for level in levels:
        lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out[level] = float(np.mean(hi - lo))
    return out


def pit(samples: np.ndarray, y: np.ndarray, key: jax.Array) -> np.ndarray:
    """Randomized probability integral transform of each observation among S predictive samples (S, ...):
    u = (#{samples < y} + V (#{samples == y} + 1)) / (S + 1), V ~ U(0, 1). y's rank among the S + 1
    exchangeable values, ties broken at random (as ArviZ's PIT breaks them) and spread over its cell,
    so u is exactly U(0, 1) for a calibrated predictive, continuous even for few samples (the plain
    fraction of samples below y takes only S + 1 values)."""
    samples, y = np.asarray(samples), np.asarray(y)
    below = np.sum(samples < y, axis=0)
    ties = np.sum(samples == y, axis=0)
    v = np.asarray(jax.random.uniform(key, below.shape))
    return (below + v * (ties + 1)) / (samples.shape[0] + 1)


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
