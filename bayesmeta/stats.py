"""Numbers that cannot overstate: summaries over tasks with the divergence rule, and verdicts
against published numbers and between methods (numpy and scipy only, so reports need no JAX)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DOMINANCE = 0.25  # a mean whose largest task carries more than this share of the sum is not a headline
MIN_TASKS_FOR_DOMINANCE = 10  # with fewer tasks every task carries a large share


def summarize(values: np.ndarray, diverged: np.ndarray | None = None) -> dict[str, Any]:
    """A metric over tasks: the mean over the tasks that did not diverge, its sd and normal 95% CI
    half-width 1.96 sd / sqrt(n), the median over all tasks, and how many diverged.

    A task diverged when its adapted support loss ended above its starting value or is not finite,
    or its metric is not finite (`diverged`, from `diverged_tasks`). `dominated` says that one task
    carries more than DOMINANCE of the sum of the remaining values (of at least
    MIN_TASKS_FOR_DOMINANCE), so the mean is not a headline.
    """
    values = np.asarray(values, np.float64)
    n = values.size
    bad = ~np.isfinite(values)
    if diverged is not None:
        bad |= np.asarray(diverged, bool)
    rest = values[~bad]

    def num(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    sd = rest.std(ddof=1) if rest.size > 1 else 0.0
    total = np.abs(rest).sum()
    share = float(np.abs(rest).max() / total) if rest.size and total > 0 else 0.0
    ranked = np.where(np.isfinite(values), values, np.inf)  # a non-finite task sorts as the worst
    return {
        "mean": num(rest.mean()) if rest.size else None,
        "sd": num(sd),
        "ci95": num(1.96 * sd / np.sqrt(rest.size)) if rest.size else None,
        "n": n,
        "n_diverged": int(bad.sum()),
        "median": num(np.median(ranked)),
        "mean_all": num(values.mean()),
        "max_share": share,
        "dominated": bool(rest.size >= MIN_TASKS_FOR_DOMINANCE and share > DOMINANCE),
    }


def diverged_tasks(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Tasks whose adapted support loss `end` is not finite or above its value `start` before
    adaptation (issue #12's divergence rule)."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    return ~np.isfinite(end) | (end > start)


HIGHER_IS_BETTER = ("accuracy",)  # metric-name prefixes where larger is better; every other is an error


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_IS_BETTER)


def t_half_width(values: Any) -> float | None:
    """Half-width of the Student-t 95% interval of the mean of `values` (None for fewer than 2)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    if v.size < 2:
        return None
    return float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))


@dataclass(frozen=True)
class Published:
    """A paper's number: its value, the sd it gives (over its trials), and whether it is a failure
    baseline (e.g. MAML memorizing in Yin et al.), whose reproduction is judged through contrasts."""

    value: float
    sd: float | None = None
    baseline: bool = False


def verdict(
    metric: str, per_seed: list[float], ci95_tasks: float | None, published: Published | None
) -> tuple[str, float | None]:
    """(matches | better | worse | ..., tolerance): ours (mean over seeds) against a published value.

    Matches when |ours - published| <= sqrt(u_ours^2 + (1.96 sd_paper)^2), u_ours the 95% t-interval
    half-width over seeds (with one seed, the 95% CI over tasks), sd_paper the paper's sd if given;
    otherwise better or worse in the metric's direction. Within it but with a tolerance as wide as the
    published value itself: inconclusive. A failure baseline gets no verdict here.
    """
    if published is None:
        return "n/a", None
    if published.baseline:
        return "failure baseline: see the contrast", None
    if not per_seed or any(v is None for v in per_seed):
        return "no verdict (diverged)", None
    ours = float(np.mean(per_seed))
    u = t_half_width(per_seed) if len(per_seed) > 1 else ci95_tasks
    if u is None:
        return "no verdict (no interval)", None
    tol = float(np.hypot(u, 1.96 * (published.sd or 0.0)))
    diff = ours - published.value
    if abs(diff) <= tol:  # within the interval: a match only if the interval is narrower than the value
        if tol >= abs(published.value):
            return "inconclusive (our interval is wider than the published value)", tol
        return "matches", tol
    return ("better" if (diff > 0) == higher_is_better(metric) else "worse"), tol


def contrast_verdict(diffs: list[float], published: float | None, metric: str) -> dict[str, Any]:
    """A paired contrast (method minus baseline, one value per seed): mean, 95% t-interval over seeds,
    and whether the published contrast's direction is reproduced: `reproduced` when the interval
    excludes 0 on the published side, `no significant difference` when it covers 0, `reversed`
    when it excludes 0 on the other side (without a published contrast: better / worse in the metric's
    direction); `size` says where the published contrast lies against our interval."""
    d = np.asarray(diffs, np.float64)
    mean = float(d.mean())
    half = t_half_width(d)
    out: dict[str, Any] = {"per_seed": d.tolist(), "mean": mean, "half_width": half, "published": published}
    if half is None:
        side = (
            ""
            if published is None
            else (
                ": the published direction"
                if (mean > 0) == (published > 0)
                else ": opposite to the published direction"
            )
        )
        out |= {"verdict": f"one seed, no interval{side}", "size": None}
        return out
    lo, hi = mean - half, mean + half
    if published is None:
        good = 1.0 if higher_is_better(metric) else -1.0
        out["verdict"] = (
            "no significant difference" if lo <= 0 <= hi else "better" if mean * good > 0 else "worse"
        )
        out["size"] = None
        return out
    if lo <= 0 <= hi:
        out["verdict"] = "not reproduced (no significant difference)"
    elif (mean > 0) == (published > 0):
        out["verdict"] = "reproduced"
    else:
        out["verdict"] = "reversed"
    out["size"] = (
        "inside our interval"
        if lo <= published <= hi
        else "above our interval"
        if published > hi
        else "below our interval"
    )
    return out
