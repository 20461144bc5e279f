"""PAC-Bayes bound for meta-learning with stochastic meta-parameters (Yin et al. 2020, Theorem 1).

With probability >= 1 - delta over n meta-training tasks with K query points each, for any prior P fixed
before training and a loss bounded in [0, 1]:

    er <= (1/n) sum_i er_hat_i + (sqrt(1/(2(K-1))) + sqrt(1/(2(n-1)))) sqrt(KL(Q || P) + log(n(K+1)/delta))

Regression losses are made bounded by clipping: l = min((y - f)^2 / c, 1). The empirical term is the
error on the n tasks the fit saw (regenerated from the training step keys), not on fresh tasks; a
bound above 1 is vacuous.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np


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
    """The bound's inputs and value. `empirical_error` is the Gibbs error on the training tasks the fit
    saw: all n of them (`empirical_tasks` = n, `empirical_error_se` = 0), or a uniform sample of them
    (a Monte Carlo estimate with that standard error). `vacuous`: the bound exceeds 1, the largest
    value the loss can take, so it certifies nothing."""

    empirical_error: float
    empirical_error_se: float
    empirical_tasks: int
    kl: float
    n: int
    k: int
    delta: float
    clip: float
    complexity: float
    bound: float
    vacuous: bool
    implied_beta: float
    beta: float | None

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def pac_bayes_bound(
    errors: Any, kl: float, n: int, k: int, delta: float, clip: float, beta: float | None = None
) -> Bound:
    """Theorem 1 from per-task Gibbs errors on m of the n training tasks (m = n: the theorem's own
    empirical term; m < n: its unbiased estimate, whose standard error is reported)."""
    e = np.asarray(errors, np.float64)
    m = e.size
    if m > n:
        raise ValueError(f"{m} per-task errors for n = {n} training tasks")
    se = 0.0 if m == n else float(e.std(ddof=1) / math.sqrt(m)) if m > 1 else float("nan")
    c = complexity(n, k, kl, delta)
    value = float(e.mean()) + c
    return Bound(
        float(e.mean()),
        se,
        m,
        float(kl),
        n,
        k,
        delta,
        clip,
        c,
        value,
        value > 1.0,
        implied_beta(n, k, delta),
        beta,
    )
