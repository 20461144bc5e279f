"""The exact posterior predictive of a family whose task prior can be sampled (PriorDraws), by
self-normalised importance sampling with the prior as proposal: f_k ~ p(f), w_k proportional to
prod_i N(y_i; f_k(x_i), sd^2) over the support set, so sum_k w_k N(y*; f_k(x*), sd^2) -> p(y* | x*, support)
as the draws grow (Bayes' rule; Owen 2013, ch. 9). It is the reference a learner's predictive is held
against on families whose predictive has no closed form (the sine/line mixture)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.diagnostics.calibration import coverage, interval_width, pit_ks
from bayesmeta.tasks.base import DenseGrid, Hypotheses

WIDTH_DRAWS = 256  # every (keep / 256)-th resampled draw, itself a systematic resample, for the widths:
# bisection on the CDF of a 2,048-component mixture at every query point costs minutes on one core


@dataclass(frozen=True)
class Reference:
    """The importance-sampled exact predictive's metrics, in the units of the learners' calibration
    section, with the sampler's effective sample size (Kish: (sum w)^2 / sum w^2) per task."""

    nll: float
    mse: float
    coverage: dict[float, float]
    width: dict[float, float]
    pit_ks: float
    mode_coverage: float | None
    mode_coverage_ambiguous: float | None
    n_ambiguous: int
    draws: int
    keep: int
    ess_median: float
    ess_min: float

    @classmethod
    def from_dict(cls, d: dict) -> Reference:
        """From dataclasses.asdict's form after a JSON round trip (the levels' keys became strings)."""
        levels = {k: {float(q): v for q, v in d[k].items()} for k in ("coverage", "width")}
        return cls(**(d | levels))


def systematic_resample(key: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """n indices into the normalised weights w, draw i where the cumulative weight passes (i + u) / n,
    u ~ U(0, 1): each draw appears n w_k times up to rounding (systematic resampling; Kitagawa 1996)."""
    positions = (jnp.arange(n) + jax.random.uniform(key)) / n
    return jnp.minimum(jnp.searchsorted(jnp.cumsum(w), positions), w.shape[0] - 1)


def task_posterior(
    family: Any,
    key: jax.Array,
    task: tuple[jax.Array, ...],
    draws: int,
    keep: int,
) -> dict[str, jax.Array]:
    """One task's importance posterior from `draws` prior functions weighted by the support likelihood,
    task = (x_support, y_support, x_query, y_query, x_extra): per query point the predictive's NLL
    -log sum_k w_k N(y; f_k, sd^2), PIT sum_k w_k Phi((y - f_k) / sd) and mean sum_k w_k f_k over all
    draws; the ESS 1 / sum w^2; and `keep` equally weighted draws resampled from w at the query
    inputs and x_extra (for widths and hypotheses)."""
    x_s, y_s, x_q, y_q, x_extra = task
    m, q = x_s.shape[0], x_q.shape[0]
    sd = family.observation_sd()
    kf, kr = jax.random.split(key)
    f = family.prior_functions(kf, draws, jnp.concatenate([x_s, x_q, x_extra]))
    w = jax.nn.softmax(jnp.sum(jax.scipy.stats.norm.logpdf(y_s, f[:, :m], sd), axis=(1, 2)))
    fq = f[:, m : m + q]
    logp = jax.scipy.stats.norm.logpdf(y_q, fq, sd)
    return {
        "nll": -jax.scipy.special.logsumexp(logp, axis=0, b=w[:, None, None]),
        "pit": jnp.sum(w[:, None, None] * jax.scipy.stats.norm.cdf((y_q - fq) / sd), 0),
        "mean": jnp.sum(w[:, None, None] * fq, 0),
        "ess": 1.0 / jnp.sum(jnp.square(w)),
        "resampled": f[systematic_resample(kr, w, keep), m:],
    }


def all_covered(p: np.ndarray, samples: int) -> np.ndarray:
    """P(S independent draws include every hypothesis) for hypothesis probabilities p (T, H), by
    inclusion-exclusion: sum over subsets A of (-1)^|A| (1 - sum_{h in A} p_h)^S."""
    h = p.shape[-1]
    out = np.zeros(p.shape[:-1])
    for r in range(h + 1):
        for subset in itertools.combinations(range(h), r):
            out += (-1) ** r * np.clip(1 - p[..., list(subset)].sum(-1), 0, 1) ** samples
    return out


def importance_reference(
    family: Any,
    tasks: Any,
    samples: int,
    key: jax.Array,
    draws: int = 2**18,
    keep: int = 2048,
    mode_tasks: int = 100,
) -> Reference:
    """The exact predictive's NLL, MSE of its mean, coverage (from the PIT), interval widths and PIT KS
    on every task of `tasks` (a TaskBatch), and, for a family with Hypotheses and DenseGrid, the
    probability that `samples` posterior draws cover every hypothesis on the first `mode_tasks` tasks
    (all of them, and the ambiguous ones): the learners' mode coverage, computed exactly from the
    posterior's hypothesis masses instead of one set of draws."""
    modes = isinstance(family, Hypotheses) and isinstance(family, DenseGrid)
    t, q = tasks.x_query.shape[:2]
    extra = family.grid(tasks.info, 100) if modes else jnp.zeros((t, 0, tasks.x_query.shape[2]))
    one = jax.jit(lambda task: task_posterior(family, key, task, draws, keep))
    out = jax.lax.map(one, (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query, extra))
    out = {k: np.asarray(v) for k, v in out.items()}
    y, u = np.asarray(tasks.y_query), out["pit"]
    resampled = np.moveaxis(out["resampled"], 1, 0)  # (keep, T, q + grid, y_dim)
    mode_all = mode_amb = None
    n_amb = 0
    if modes:
        n = min(mode_tasks, t)
        grid = jnp.asarray(extra[0, :, 0])
        kinds = np.asarray(family.hypothesis(jnp.asarray(resampled[:, :n, q:, 0]), grid))  # (keep, n)
        p = np.stack([np.mean(kinds == h, 0) for h in range(family.n_hypotheses)], -1)
        every = all_covered(p, samples)
        amb = np.asarray(family.ambiguous(tasks.take(slice(0, n))))
        mode_all, n_amb = float(every.mean()), int(amb.sum())
        mode_amb = float(every[amb].mean()) if amb.any() else None
    return Reference(
        nll=float(np.mean(out["nll"])),
        mse=float(np.mean(np.square(out["mean"] - y))),
        coverage=coverage(u),
        width=interval_width(resampled[:: max(keep // WIDTH_DRAWS, 1), :, :q], family.observation_sd()),
        pit_ks=pit_ks(u),
        mode_coverage=mode_all,
        mode_coverage_ambiguous=mode_amb,
        n_ambiguous=n_amb,
        draws=draws,
        keep=keep,
        ess_median=float(np.median(out["ess"])),
        ess_min=float(out["ess"].min()),
    )
