"""PAC-Bayes bound for meta-learning with stochastic meta-parameters (Yin et al. 2020, Theorem 1).

With probability >= 1 - delta over n meta-training tasks with K query points each, for any prior P fixed
before training and a loss bounded in [0, 1]:

    er <= (1/n) sum_i er_hat_i + (sqrt(1/(2(K-1))) + sqrt(1/(2(n-1)))) sqrt(KL(Q || P) + log(n(K+1)/delta))

Regression losses are made bounded by clipping: l = min((y - f)^2 / c, 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import jax.numpy as jnp


def _rate(n: int, k: int) -> float:
    if n < 2 or k < 2:
        raise ValueError(f"the bound needs n >= 2 tasks and K >= 2 query points, got n={n}, K={k}")
    return math.sqrt(1 / (2 * (k - 1))) + math.sqrt(1 / (2 * (n - 1)))


def complexity(n: int, k: int, kl: float, delta: float) -> float:
    """(sqrt(1/(2(K-1))) + sqrt(1/(2(n-1)))) * sqrt(KL + log(n(K+1)/delta))."""
    return _rate(n, k) * math.sqrt(kl + math.log(n * (k + 1) / delta))


def implied_beta(n: int, k: int, delta: float) -> float:
    """The KL weight of the bound's first-order expansion: rate / (2 sqrt(log(n(K+1)/delta)))."""
    return _rate(n, k) / (2 * math.sqrt(math.log(n * (k + 1) / delta)))


def clipped_squared_error(pred: jnp.ndarray, y: jnp.ndarray, clip: float) -> jnp.ndarray:
    """min((y - f)^2 / clip, 1): a loss in [0, 1]."""
    return jnp.minimum(jnp.square(pred - y) / clip, 1.0)


@dataclass(frozen=True)
class Bound:
    """The bound's inputs and value."""

    empirical_error: float
    kl: float
    n: int
    k: int
    delta: float
    clip: float
    complexity: float
    bound: float
    implied_beta: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def pac_bayes_bound(empirical_error: float, kl: float, n: int, k: int, delta: float, clip: float) -> Bound:
    c = complexity(n, k, kl, delta)
    return Bound(
        float(empirical_error),
        float(kl),
        n,
        k,
        delta,
        clip,
        c,
        float(empirical_error) + c,
        implied_beta(n, k, delta),
    )
