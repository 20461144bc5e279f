"""The diagnostic sections of a run's evaluation, each contributed by a declared capability.

A section owns one entry of metrics.json. `applies(setup)` asks the capability it needs (a family
protocol of bayesmeta.tasks, the method's likelihood, a hook of bayesmeta.method.Method, the training
trace); `compute` returns a typed result; `dump`/`load` convert it to and from its JSON entry (the
layout metrics.json has always had); `markdown` and `plots` render it into summary.md and plots/ from
that entry alone, so `bayesmeta report` redraws a run from its files. run.finish and report iterate
SECTIONS and name no family feature: a new diagnostic is a new section.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from bayesmeta import config as config_mod
from bayesmeta.bounds import Bound, clipped_squared_error, pac_bayes_bound
from bayesmeta.diagnostics.calibration import (
    LEVELS,
    coverage,
    expected_calibration_error,
    interval_width,
    mixture_nll,
    mixture_pit,
    pit_ks,
)
from bayesmeta.diagnostics.memorization import support_dependence
from bayesmeta.fit import run_keys, step_tasks
from bayesmeta.io import write_json
from bayesmeta.likelihoods import Categorical, Gaussian
from bayesmeta.predict import predictive
from bayesmeta.stats import summarize
from bayesmeta.tables import markdown_table
from bayesmeta.tasks import (
    Classification,
    Counterfactual,
    DenseGrid,
    ExactPredictive,
    GroundTruth,
    Groups,
    Hypotheses,
)

if TYPE_CHECKING:
    from bayesmeta.fit import FitResult
    from bayesmeta.predict import Evaluation
    from bayesmeta.run import Setup


@dataclass(frozen=True)
class Evaluated:
    """What a section computes from: the run's setup, fitted parameters, held-out evaluation and fit."""

    setup: Setup
    params: dict
    ev: Evaluation
    result: FitResult


class Section:
    """One diagnostic of a run: it owns the metrics.json entry `key` (`empty` when it does not apply).
    Subclasses define applies, compute, dump, load and markdown; plots, groups (inference.nc groups)
    and attrs (inference.nc root attrs) add nothing unless overridden."""

    key: ClassVar[str]
    empty: ClassVar[Any] = None
    # The settings (dotted config paths) the result reads besides the fitted parameters, for a section
    # that does not read the held-out evaluation: computed once per fit, then reused from the cache
    # folder by every later evaluation of the same parameters (see `compute_sections`).
    fit_level: ClassVar[tuple[str, ...] | None] = None

    def applies(self, setup: Setup) -> bool:
        raise NotImplementedError

    def compute(self, run: Evaluated) -> Any:
        raise NotImplementedError

    def dump(self, result: Any) -> Any:
        raise NotImplementedError

    def load(self, entry: Any) -> Any:
        raise NotImplementedError

    def markdown(self, result: Any) -> str:
        raise NotImplementedError

    def plots(self, result: Any, run_dir: Path) -> list[Path]:
        return []

    def groups(self, result: Any) -> dict[str, xr.Dataset]:
        return {}

    def attrs(self, result: Any) -> dict[str, str]:
        return {}


def _fmt(v: float | None) -> str:
    return "diverged" if v is None else f"{v:.4f}"


def _num(v: float | None) -> str:
    """A number that may be missing (an entry that predates it, or null: diverged)."""
    return "n/a" if v is None else f"{v:.4f}"


def _levels(d: dict[str, float]) -> dict[float, float]:
    return {float(k): v for k, v in d.items()}


def _level_keys(d: dict[float, float]) -> dict[str, float]:
    return {str(k): v for k, v in d.items()}


def _per_steps(results: dict[int, Any]) -> dict[str, Any]:
    return {str(s): r.dump() for s, r in results.items()}


# --- metrics per group of tasks ---------------------------------------------------------------------


def group_metrics(family: Groups, ev: Evaluation) -> dict[str, dict[str, Any]]:
    """Every metric at every test-time step count summarized over each group's tasks (the family's
    `Groups`, e.g. its function families), with the same divergence rule as overall; a group without
    a test task is left out."""
    group = np.asarray(family.group(jax.tree.map(jnp.asarray, ev.tasks.info)))
    out = {}
    for i, name in enumerate(family.group_names):
        keep = group == i
        if keep.any():
            out[name] = {
                f"{metric}@{s}": summarize(v[keep], ev.diverged(s)[keep])
                for s, m in ev.per_task.items()
                for metric, v in m.items()
            }
    return out


class GroupMetrics(Section):
    """The held-out metrics per group of tasks, for a family whose tasks fall into groups (Groups):
    metrics.json `groups.<group>.<metric>@<steps>`, a table in summary.md."""

    key = "groups"
    empty: ClassVar[Any] = {}

    def applies(self, setup: Setup) -> bool:
        return isinstance(setup.eval_family, Groups)

    def compute(self, run: Evaluated) -> dict[str, dict[str, Any]]:
        return group_metrics(run.setup.eval_family, run.ev)

    def dump(self, result: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {g: dict(m) for g, m in result.items()}

    def load(self, entry: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {g: dict(m) for g, m in entry.items()}

    def markdown(self, result: dict[str, dict[str, Any]]) -> str:
        from bayesmeta.report import metric_line

        names = list(next(iter(result.values())))
        rows = [[g, m[names[0]]["n"], *(metric_line(m[k]) for k in names)] for g, m in result.items()]
        return (
            "## Per group of tasks\n\nThe same metrics over each group's test tasks (the family's "
            "`Groups`, e.g. its function families):\n\n"
            + markdown_table(["group", "tasks", *names], rows)
            + "\n\n"
        )


# --- the method's own episode metrics ---------------------------------------------------------------


def episode_metrics(method: Any, params: dict, tasks: Any, chunk: int) -> dict[str, dict[str, Any]]:
    """The method's `episode_metrics` hook on the labelled held-out tasks, `chunk` tasks at a time (key
    fold_in(PRNGKey(6), chunk index)), each metric summarized over tasks (mean, 95% CI; a non-finite
    task value is left out and counted)."""
    hook = jax.jit(method.episode_metrics)
    n = tasks.x_support.shape[0]
    parts: dict[str, list[np.ndarray]] = {}
    for i, start in enumerate(range(0, n, chunk)):
        batch = tasks.take(slice(start, start + chunk))
        for name, v in hook(params, batch, jax.random.fold_in(jax.random.PRNGKey(6), i)).items():
            parts.setdefault(name, []).append(np.asarray(v))
    return {name: summarize(np.concatenate(v)) for name, v in parts.items()}


class EpisodeMetrics(Section):
    """Metrics of a method's own protocol on the held-out episodes (the hook Method.episode_metrics):
    metrics.json `episode_metrics.<name>` summaries over tasks, a table in summary.md."""

    key = "episode_metrics"
    empty: ClassVar[Any] = {}

    def applies(self, setup: Setup) -> bool:
        return setup.eval_method.episode_metrics is not None

    def compute(self, run: Evaluated) -> dict[str, dict[str, Any]]:
        return episode_metrics(run.setup.eval_method, run.params, run.ev.tasks, run.setup.cfg.eval.batch)

    def dump(self, result: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in result.items()}

    def load(self, entry: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in entry.items()}

    def markdown(self, result: dict[str, dict[str, Any]]) -> str:
        from bayesmeta.report import metric_line

        rows = [[k, v["n"], metric_line(v)] for k, v in result.items()]
        return (
            "## The method's own episode metrics\n\nOn the held-out tasks with their labels, by the "
            "method's protocol (Method.episode_metrics):\n\n"
            + markdown_table(["metric", "tasks", "mean (95% CI)"], rows)
            + "\n\n"
        )


# --- the memorization meter -------------------------------------------------------------------------


class Memorization(Section):
    """Support dependence D and the truth slope at each test-time step count (bayesmeta.diagnostics.
    memorization): needs a family with a known truth (GroundTruth) or counterfactual tasks
    (Counterfactual), and a Gaussian likelihood."""

    key = "diagnostics"
    empty: ClassVar[Any] = {}

    def applies(self, setup: Setup) -> bool:
        return (
            setup.cfg.eval.memorization_tasks >= 2
            and isinstance(setup.likelihood, Gaussian)
            and isinstance(setup.eval_family, GroundTruth | Counterfactual)
        )

    def compute(self, run: Evaluated) -> dict[str, float | None]:
        setup, tasks = run.setup, run.ev.tasks
        n = min(setup.cfg.eval.memorization_tasks, tasks.x_support.shape[0])
        if n < 2:
            return {}
        sub = jax.tree.map(lambda a: jnp.asarray(a[:n]), tasks)
        out = {}
        for s in setup.cfg.eval.inner_steps:
            meter = support_dependence(
                setup.eval_method,
                run.params,
                setup.eval_family,
                sub,
                s,
                jax.random.PRNGKey(3),
                samples=setup.cfg.eval.samples,
            )
            out |= {f"{k}@{s}": v for k, v in meter.items()}
        return out

    def dump(self, result: dict[str, float | None]) -> dict[str, float | None]:
        return dict(result)

    def load(self, entry: dict[str, float | None]) -> dict[str, float | None]:
        return dict(entry)

    def markdown(self, result: dict[str, float | None]) -> str:
        return (
            "## Memorization meter\n\nSupport dependence D (0: predictions ignore the support set, "
            "complete memorization; about 1: they follow it to the truth):\n\n"
            + "\n".join(f"- {k}: {_fmt(v)}" for k, v in result.items())
            + "\n\n"
        )


# --- calibration of a regression predictive ---------------------------------------------------------


@dataclass(frozen=True)
class Exact:
    """The family's exact posterior predictive on the same tasks: NLL, MSE of its mean, coverage and
    width of its central intervals (level -> value)."""

    nll: float
    mse: float | None
    coverage: dict[float, float]
    width: dict[float, float]

    def dump(self) -> dict[str, Any]:
        out = {"nll": self.nll, "mse": self.mse}
        return out | {"coverage": _level_keys(self.coverage), "width": _level_keys(self.width)}

    @classmethod
    def load(cls, e: dict[str, Any]) -> Exact:
        return cls(e["nll"], e.get("mse"), _levels(e["coverage"]), _levels(e["width"]))


@dataclass(frozen=True)
class Modes:
    """Mode coverage: the fraction of tasks whose sampled functions follow every hypothesis, over all
    tasks and over the ambiguous ones (None when there are none), and the ambiguous count."""

    all: float
    ambiguous: float | None
    ambiguous_tasks: int


@dataclass(frozen=True)
class CalibrationAt:
    """A regression predictive's calibration at one test-time step count, over the tasks that did not
    diverge (their count `diverged_tasks`): NLL of the predictive mixture, MSE of its mean, coverage and
    width of central intervals (level -> value), the PIT F(y) and its KS distance to uniform, and
    where the family declares them, mode coverage (Hypotheses) and the exact predictive (ExactPredictive)
    with the learner's MSE ratio and NLL gap to it."""

    nll: float | None
    mse: float | None
    coverage: dict[float, float]
    width: dict[float, float]
    pit: list[float]
    pit_ks: float | None
    diverged_tasks: int
    modes: Modes | None = None
    exact: Exact | None = None

    @property
    def mse_ratio(self) -> float | None:
        ok = self.exact is not None and self.mse is not None and self.exact.mse
        return self.mse / self.exact.mse if ok else None

    @property
    def nll_gap(self) -> float | None:
        ok = self.exact is not None and self.nll is not None
        return self.nll - self.exact.nll if ok else None

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nll": self.nll,
            "mse": self.mse,
            "coverage": _level_keys(self.coverage),
            "width": _level_keys(self.width),
            "pit": list(self.pit),
            "pit_ks": self.pit_ks,
            "diverged_tasks": self.diverged_tasks,
        }
        if self.modes is not None:
            out |= {
                "mode_coverage": self.modes.all,
                "mode_coverage_ambiguous": self.modes.ambiguous,
                "ambiguous_tasks": self.modes.ambiguous_tasks,
            }
        if self.exact is not None:
            out["exact"] = self.exact.dump()
            out["vs_exact"] = {"mse_ratio": self.mse_ratio, "nll_gap": self.nll_gap}
        return out

    @classmethod
    def load(cls, e: dict[str, Any]) -> CalibrationAt:
        modes = None
        if "mode_coverage" in e:
            modes = Modes(e["mode_coverage"], e["mode_coverage_ambiguous"], e["ambiguous_tasks"])
        return cls(
            nll=e["nll"],
            mse=e.get("mse"),
            coverage=_levels(e["coverage"]),
            width=_levels(e["width"]),
            pit=list(e.get("pit", [])),
            pit_ks=e.get("pit_ks"),
            diverged_tasks=e.get("diverged_tasks", 0),
            modes=modes,
            exact=Exact.load(e["exact"]) if "exact" in e else None,
        )


def exact_calibration(family: ExactPredictive, tasks: Any) -> Exact:
    """NLL, MSE of the mean, coverage and width of the family's exact posterior predictive on `tasks`."""
    batch = jax.tree.map(jnp.asarray, tasks)
    mean, sd = family.exact_predictive(batch)
    y = batch.y_query
    z = {level: float(jax.scipy.stats.norm.ppf((1 + level) / 2)) for level in LEVELS}
    return Exact(
        nll=float(-jnp.mean(jax.scipy.stats.norm.logpdf(y, mean, sd))),
        mse=float(jnp.mean(jnp.square(mean - y))),
        coverage={k: float(jnp.mean(jnp.abs(y - mean) <= v * sd)) for k, v in z.items()},
        width={k: float(jnp.mean(2 * v * sd)) for k, v in z.items()},
    )


def mode_coverage(run: Evaluated, steps: int) -> Modes:
    """Do the sampled functions on a dense grid cover every hypothesis of the family (Hypotheses and
    DenseGrid), on up to eval.memorization_tasks (else 100) of the evaluation tasks?"""
    setup, cfg = run.setup, run.setup.cfg
    fam = setup.eval_family
    n = min(cfg.eval.memorization_tasks or 100, run.ev.tasks.x_support.shape[0])
    sub = jax.tree.map(lambda a: jnp.asarray(a[:n]), run.ev.tasks)
    x = fam.grid(sub.info, 100)
    fg = predictive(setup.eval_method, steps, cfg.eval.samples, ("f",), cfg.eval.blown_up_draws)(
        run.params, sub._replace(x_query=x, y_query=None), jax.random.PRNGKey(6)
    )["f"][..., 0]
    kinds = fam.hypothesis(fg, x[0, :, 0])  # (S, T)
    every = np.asarray(jnp.all(jnp.stack([jnp.any(kinds == h, 0) for h in range(fam.n_hypotheses)]), 0))
    amb = np.asarray(fam.ambiguous(sub))
    return Modes(float(every.mean()), float(every[amb].mean()) if amb.any() else None, int(amb.sum()))


class Calibration(Section):
    """Calibration of a Gaussian predictive (needs eval.samples >= 2), per test-time step count."""

    key = "calibration"
    empty: ClassVar[Any] = {}

    def applies(self, setup: Setup) -> bool:
        return setup.cfg.eval.samples >= 2 and isinstance(setup.likelihood, Gaussian)

    def compute(self, run: Evaluated) -> dict[int, CalibrationAt]:
        setup, ev = run.setup, run.ev
        fam = setup.eval_family
        y = np.asarray(ev.tasks.y_query)
        out = {}
        for s in setup.cfg.eval.inner_steps:
            keep = ~ev.diverged(s)  # a diverged task's interval would dominate every mean
            if not keep.any():  # every task diverged: the metrics say so; nothing to calibrate
                continue
            draws = {k: np.asarray(v)[:, keep] for k, v in ev.draws[s].items()}
            f = draws["f"]
            likelihood = setup.eval_method.likelihood.at(run.params, draws)
            noise_sd = np.asarray(likelihood.sd)  # fixed, learned, or per draw and point
            u = mixture_pit(f, noise_sd, y[keep])  # the noise integrated exactly: no sampling of y
            out[s] = CalibrationAt(
                nll=float(np.mean(mixture_nll(f, noise_sd, y[keep]))),
                mse=float(np.mean(np.square(np.mean(f, 0) - y[keep]))),
                coverage=coverage(u),
                width=interval_width(f, noise_sd),
                pit=np.asarray(u).ravel().tolist(),
                pit_ks=pit_ks(u),
                diverged_tasks=int((~keep).sum()),
                modes=mode_coverage(run, s)
                if isinstance(fam, Hypotheses) and isinstance(fam, DenseGrid)
                else None,
                exact=exact_calibration(fam, jax.tree.map(lambda a, k=keep: a[k], ev.tasks))
                if isinstance(fam, ExactPredictive)
                else None,
            )
        return out

    def dump(self, result: dict[int, CalibrationAt]) -> dict[str, Any]:
        return _per_steps(result)

    def load(self, entry: dict[str, Any]) -> dict[int, CalibrationAt]:
        return {int(s): CalibrationAt.load(e) for s, e in entry.items()}

    def markdown(self, result: dict[int, CalibrationAt]) -> str:
        return (
            "## Calibration of the posterior predictive\n\n"
            + calibration_table(result)
            + "\nThe predictive is the mixture of the sampled functions with their Gaussian noise, "
            "(1/S) sum_s N(f_s, sd_s^2). Coverage: fraction of query targets inside its central interval "
            "(nominal in the header), read from their PIT F(y); width: the interval's mean width. Mode "
            "coverage: fraction of tasks whose sampled functions include both a sine-like and a "
            "line-like one; ambiguous tasks are those whose "
            "support set both hypotheses fit within 2 noise sds (their count in brackets). The PIT of the "
            "query targets, uniform for a calibrated predictive, is drawn as ArviZ's PIT "
            "Delta-ECDF with its uniformity test in plots/pit.png.\n\n"
        )

    def plots(self, result: dict[int, CalibrationAt], run_dir: Path) -> list[Path]:
        from bayesmeta import report

        return [
            report.plot_calibration(result, run_dir / "plots" / "calibration.png"),
            report.plot_pit(result, run_dir / "plots" / "pit.png"),
        ]


def calibration_table(calib: dict[int, CalibrationAt]) -> str:
    """Per test-time step count: NLL, MSE, coverage at each level, 90% width, PIT KS distance, mode
    coverage and diverged tasks; with an exact predictive, its row and the learner's MSE ratio and NLL gap."""
    levels = list(next(iter(calib.values())).coverage)
    exact = any(e.exact is not None for e in calib.values())
    header = [
        "test steps",
        "NLL",
        "MSE",
        *(f"coverage {k:.0%}" for k in levels),
        "width 90%",
        "PIT KS",
        "mode coverage (all / ambiguous tasks)",
        "diverged tasks (left out)",
        *(["MSE / exact", "NLL - exact"] if exact else []),
    ]
    rows = []
    for steps, e in calib.items():
        mode = "n/a"
        if e.modes is not None:
            amb = "n/a" if e.modes.ambiguous is None else f"{e.modes.ambiguous:.3f}"
            mode = f"{e.modes.all:.3f} / {amb} ({e.modes.ambiguous_tasks})"
        if e.exact is not None:
            x = e.exact
            cov = [f"{x.coverage[k]:.3f}" for k in levels]
            rows.append(["exact posterior predictive", f"{x.nll:.4f}", _num(x.mse), *cov])
            rows[-1] += [f"{x.width.get(0.9, float('nan')):.3f}", "n/a", "n/a", e.diverged_tasks, "1", "0"]
        cov = [f"{e.coverage[k]:.3f}" for k in levels]
        width = f"{e.width.get(0.9, float('nan')):.3f}"
        row = [steps, _fmt(e.nll), _num(e.mse), *cov, width, _num(e.pit_ks), mode, e.diverged_tasks]
        if exact:
            row += [_num(e.mse_ratio), _num(e.nll_gap)]
        rows.append(row)
    return markdown_table(header, rows) + "\n"


# --- calibration of a classifier --------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityAt:
    """A classifier's calibration at one test-time step count, over the tasks that did not diverge: ECE
    of the predictive class probabilities with its reliability diagram's bins, accuracy and NLL."""

    ece: float
    accuracy: float
    nll: float
    diagram: dict[str, list[float]] = field(default_factory=dict)
    diverged_tasks: int = 0

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, e: dict[str, Any]) -> ReliabilityAt:
        return cls(**e)


class Reliability(Section):
    """ECE, accuracy and NLL of a categorical predictive (mean over draws), per test-time step count,
    in 15 equal-width confidence bins."""

    key = "reliability"
    empty: ClassVar[Any] = {}

    def applies(self, setup: Setup) -> bool:
        return isinstance(setup.likelihood, Categorical)

    def compute(self, run: Evaluated) -> dict[int, ReliabilityAt]:
        ev = run.ev
        out = {}
        for s in run.setup.cfg.eval.inner_steps:
            keep = ~ev.diverged(s)
            if not keep.any():
                continue
            probs = np.mean(ev.draws[s]["f"], axis=0)[keep]
            y = np.asarray(ev.tasks.y_query)[keep]
            ece, diagram = expected_calibration_error(probs, y)
            p_true = np.take_along_axis(probs, y[..., None].astype(int), -1)[..., 0]
            out[s] = ReliabilityAt(
                ece=ece,
                accuracy=float(np.mean(probs.argmax(-1) == y)),
                nll=float(-np.mean(np.log(np.clip(p_true, 1e-12, None)))),
                diagram={k: np.asarray(v).tolist() for k, v in diagram.items()},
                diverged_tasks=int((~keep).sum()),
            )
        return out

    def dump(self, result: dict[int, ReliabilityAt]) -> dict[str, Any]:
        return _per_steps(result)

    def load(self, entry: dict[str, Any]) -> dict[int, ReliabilityAt]:
        return {int(s): ReliabilityAt.load(e) for s, e in entry.items()}

    def markdown(self, result: dict[int, ReliabilityAt]) -> str:
        rows = [
            [s, f"{e.ece:.4f}", f"{e.accuracy:.4f}", f"{e.nll:.4f}", e.diverged_tasks]
            for s, e in result.items()
        ]
        return (
            "## Calibration of the predictive class probabilities\n\n"
            + markdown_table(["test steps", "ECE", "accuracy", "NLL", "diverged tasks (left out)"], rows)
            + "\n\nECE: the mean |accuracy - confidence| over 15 equal-width confidence bins, weighted by "
            "their counts (reliability diagrams in plots/reliability_<steps>.png).\n\n"
        )

    def plots(self, result: dict[int, ReliabilityAt], run_dir: Path) -> list[Path]:
        from bayesmeta import report

        return [
            report.plot_reliability(e.diagram, e.ece, run_dir / "plots" / f"reliability_{s}.png")
            for s, e in result.items()
        ]


# --- landscape diagnostics during training ----------------------------------------------------------


@dataclass(frozen=True)
class Landscape:
    """The landscape series on held-out tasks (METHODS 5, 6) at the diagnostic steps, the held-out
    metric they are compared with (`test_metric`), each series' Pearson r with it (None when undefined)
    and last value; non-finite values are None."""

    step: list[int]
    test_metric: str
    correlation: dict[str, float | None]
    values: dict[str, list[float | None]]

    @property
    def final(self) -> dict[str, float | None]:
        return {k: v[-1] for k, v in self.values.items()}

    def dump(self) -> dict[str, Any]:
        return asdict(self) | {"final": self.final}

    @classmethod
    def load(cls, e: dict[str, Any]) -> Landscape:
        return cls(e["step"], e["test_metric"], e["correlation"], e["values"])


def landscape_summary(steps: list[int], values: dict[str, list[float]]) -> Landscape:
    """The diagnostics series and the correlation r of each metric with the held-out metric (the series
    named `test_...`) across the diagnostic steps; r is None when undefined."""
    test = next(k for k in values if k.startswith("test_"))
    y = np.asarray(values[test], np.float64)
    corr: dict[str, float | None] = {}
    for k, v in values.items():
        if k.startswith("test_"):
            continue
        x = np.asarray(v, np.float64)
        ok = len(x) > 1 and np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and x.std() > 0 and y.std() > 0
        corr[k] = float(np.corrcoef(x, y)[0, 1]) if ok else None
    # a diverged held-out task makes a metric inf: JSON gets null there, never a non-finite number
    clean = {k: [float(x) if np.isfinite(x) else None for x in v] for k, v in values.items()}
    return Landscape(list(steps), test[5:], corr, clean)


class LandscapeSection(Section):
    """The landscape diagnostics recorded during training (train.diagnostics_every, Method.probe)."""

    key = "landscape"
    empty: ClassVar[Any] = None

    def applies(self, setup: Setup) -> bool:
        return bool(setup.cfg.train.diagnostics_every) and setup.method.probe is not None

    def compute(self, run: Evaluated) -> Landscape | None:
        trace = run.result.trace
        return (
            landscape_summary(trace.diagnostics_step, trace.diagnostics) if trace.diagnostics_step else None
        )

    def dump(self, result: Landscape) -> dict[str, Any]:
        return result.dump()

    def load(self, entry: dict[str, Any]) -> Landscape:
        return Landscape.load(entry)

    def markdown(self, land: Landscape) -> str:
        rows = markdown_table(
            ["metric", f"r with {land.test_metric}", "last value"],
            [
                [k, "n/a" if r is None else f"{r:.3f}", _num(land.values[k][-1])]
                for k, r in land.correlation.items()
            ],
        )
        return (
            "## Landscape diagnostics (METHODS 5, 6)\n\n"
            f"On held-out tasks at {len(land.step)} steps during training; r is the correlation "
            f"coefficient of each metric with the held-out {land.test_metric} across those steps "
            "(series in inference.nc sample_stats `diag_*`, plot in plots/landscape.png).\n\n"
            f"{rows}\n\n"
        )

    def plots(self, land: Landscape, run_dir: Path) -> list[Path]:
        from bayesmeta import report

        return [report.plot_landscape(land, run_dir / "plots" / "landscape.png")]


# --- the PAC-Bayes bound ----------------------------------------------------------------------------


def training_steps(steps: int, meta_batch: int, max_tasks: int, key: jax.Array) -> np.ndarray:
    """The training steps whose meta-batches the bound's empirical term is computed on: all of them
    when steps * meta_batch <= max_tasks, else a uniform sample without replacement."""
    m = min(steps, max(1, max_tasks // meta_batch))
    if m == steps:
        return np.arange(steps)
    return np.sort(np.asarray(jax.random.choice(key, steps, (m,), replace=False)))


def query_points(family: Any) -> int:
    """Query examples per task: the PAC-Bayes bound's K."""
    return family.query_points if isinstance(family, Classification) else family.queries


def bound(setup: Setup, params: dict) -> Bound:
    """Theorem 1 of Yin et al. for a method with stochastic meta-parameters (Method.kl). The empirical
    error is the Gibbs risk on the tasks the fit saw (regenerated from the training step keys; a uniform
    sample of them when there are more than eval.bound_tasks): the 0-1 error for classifiers, the
    clipped squared error min((y - f)^2 / clip, 1) for regression."""
    cfg = setup.cfg
    _, data_key = run_keys(cfg.seed)
    steps = training_steps(cfg.train.steps, cfg.train.meta_batch, cfg.eval.bound_tasks, jax.random.PRNGKey(4))
    run = predictive(setup.method, cfg.model.inner_steps, cfg.eval.samples, ("f",))
    chunk = max(1, cfg.eval.batch // cfg.train.meta_batch)
    categorical = isinstance(setup.likelihood, Categorical)
    clip = 1.0 if categorical else cfg.eval.bound_clip

    @jax.jit
    def chunk_errors(params: dict, data_key: jax.Array, idx: jax.Array, key: jax.Array) -> jax.Array:
        """Per-task Gibbs risk of the meta-batches of training steps `idx`, as one XLA computation."""
        tasks = jax.vmap(lambda s: step_tasks(setup.family, data_key, s, cfg.train.meta_batch))(idx)
        tasks = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tasks)
        f = run(params, tasks, key)["f"]
        if categorical:
            err = jnp.argmax(f, -1) != tasks.y_query[None]
        else:
            err = clipped_squared_error(f, tasks.y_query[None], clip)
        return jnp.mean(err, axis=tuple(a for a in range(err.ndim) if a != 1))

    errors = []
    for i in range(0, len(steps), chunk):
        idx = steps[i : i + chunk]
        padded = np.pad(idx, (0, chunk - len(idx)), mode="edge")  # one shape: one compilation
        e = chunk_errors(params, data_key, jnp.asarray(padded), jax.random.fold_in(jax.random.PRNGKey(5), i))
        errors.append(np.asarray(e)[: len(idx) * cfg.train.meta_batch])
    n = cfg.train.steps * cfg.train.meta_batch
    kl = float(setup.method.kl(params))
    return pac_bayes_bound(
        np.concatenate(errors),
        kl,
        n,
        query_points(setup.family),
        cfg.eval.bound_delta,
        clip,
        setup.method.kl_weight,
    )


def pac_text(pac: dict[str, Any]) -> str:
    """The bound in words: its value (VACUOUS above 1), its terms, which tasks the empirical error is
    over, and the beta the bound implies beside the one used in training."""
    if pac["empirical_tasks"] == pac["n"]:
        tasks = f"all {pac['n']} training tasks the fit saw"
    else:
        tasks = (
            f"a uniform sample of {pac['empirical_tasks']} of the {pac['n']} training tasks the fit saw "
            f"(standard error {pac['empirical_error_se']:.4f})"
        )
    verdict = (
        f"**vacuous**: {pac['bound']:.4f} exceeds 1, the largest value of the loss, so it certifies nothing"
        if pac["vacuous"]
        else f"**{pac['bound']:.4f}**"
    )
    used = "n/a" if pac.get("beta") is None else f"{pac['beta']:.3g}"
    return (
        f"With probability >= {1 - pac['delta']:g}, the expected clipped error "
        f"min((y-f)^2/{pac['clip']:g}, 1) (the 0-1 error for classifiers) on new tasks is at most "
        f"{verdict} = empirical error {pac['empirical_error']:.4f} on {tasks} + complexity "
        f"{pac['complexity']:.4f} (n = {pac['n']} tasks, K = {pac['k']} query points, KL(q || prior) = "
        f"{pac['kl']:.2f}). Beta used in training: {used}; beta the bound implies: {pac['implied_beta']:.3g}."
    )


class PACBayes(Section):
    """The PAC-Bayes bound of a method with stochastic meta-parameters (Method.kl); also written to
    inference.nc as the group pac_bayes and in words as the tree's attr pac_bayes."""

    key = "pac_bayes"
    # the training tasks (regenerated from seed, task, train), the predictive (model, eval.samples,
    # eval.batch: its chunks and keys) and the bound's own settings; not the held-out tasks
    fit_level = (
        "seed",
        "task",
        "model",
        "train.steps",
        "train.meta_batch",
        "eval.samples",
        "eval.batch",
        "eval.bound_tasks",
        "eval.bound_delta",
        "eval.bound_clip",
    )
    empty: ClassVar[Any] = None

    def applies(self, setup: Setup) -> bool:
        return setup.method.kl is not None

    def compute(self, run: Evaluated) -> dict[str, Any]:
        return bound(run.setup, run.params).as_dict()

    def dump(self, result: dict[str, Any]) -> dict[str, Any]:
        return dict(result)

    def load(self, entry: dict[str, Any]) -> dict[str, Any]:
        return dict(entry)

    def markdown(self, pac: dict[str, Any]) -> str:
        return "## PAC-Bayes bound (Yin et al. 2020, Theorem 1)\n\n" + pac_text(pac) + "\n\n"

    def groups(self, pac: dict[str, Any]) -> dict[str, xr.Dataset]:
        from bayesmeta.report import bound_dataset

        return {"pac_bayes": bound_dataset(pac)}

    def attrs(self, pac: dict[str, Any]) -> dict[str, str]:
        return {"pac_bayes": pac_text(pac)}


SECTIONS: tuple[Section, ...] = (
    GroupMetrics(),
    EpisodeMetrics(),
    Memorization(),
    Calibration(),
    Reliability(),
    LandscapeSection(),
    PACBayes(),
)


def fit_key(section: Section, cfg: Any, params: dict) -> str:
    """sha256 of what a fit-level section's result is a function of: its module's source, the
    settings it names (`Section.fit_level`) and the fitted parameters' values."""
    settings = config_mod.to_dict(cfg)
    h = hashlib.sha256(Path(sys.modules[type(section).__module__].__file__).read_bytes())
    for path in section.fit_level or ():
        value: Any = settings
        for part in path.split("."):
            value = value[part]
        h.update(json.dumps([path, value], sort_keys=True, default=str).encode())
    for name in sorted(params):
        a = np.asarray(params[name])
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _cached(section: Section, run: Evaluated, cache: Path) -> Any:
    """A fit-level section's result from cache/<key>-<hash>.json, computed and written there (atomically)
    when absent or unreadable."""
    path = cache / f"{section.key}-{fit_key(section, run.setup.cfg, run.params)[:20]}.json"
    try:
        return section.load(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        result = section.compute(run)
        if result is not None:
            write_json(path, section.dump(result))
        return result


def compute_sections(run: Evaluated, cache: Path | None = None) -> dict[str, Any]:
    """Every section's typed result by its key (absent when the section does not apply). A fit-level
    section (`Section.fit_level`) is taken from `cache` (a folder) when it holds the result for these
    parameters and settings, and stored there otherwise, so evaluating one fit on several held-out
    settings computes it once."""
    out = {}
    for s in SECTIONS:
        if s.applies(run.setup):
            use_cache = cache is not None and s.fit_level is not None
            result = _cached(s, run, cache) if use_cache else s.compute(run)
            if result is not None:
                out[s.key] = result
    return out


def dump_sections(results: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's section entries: each section's dump, or its `empty` value when it has no result."""
    return {s.key: s.dump(results[s.key]) if s.key in results else s.empty for s in SECTIONS}


def tree_contributions(results: dict[str, Any]) -> tuple[dict[str, xr.Dataset], dict[str, str]]:
    """The inference.nc groups and root attrs the sections with results contribute."""
    groups: dict[str, xr.Dataset] = {}
    attrs: dict[str, str] = {}
    for s in SECTIONS:
        if s.key in results:
            groups |= s.groups(results[s.key])
            attrs |= s.attrs(results[s.key])
    return groups, attrs


def render_sections(metrics: dict[str, Any], run_dir: Path) -> tuple[str, list[Path]]:
    """summary.md's sections and their plots, from metrics.json's entries alone."""
    text, plots = "", []
    for s in SECTIONS:
        entry = metrics.get(s.key)
        if entry:
            result = s.load(entry)
            text += s.markdown(result)
            plots += s.plots(result, run_dir)
    return text, plots
