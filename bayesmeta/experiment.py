"""Experiment grids: run (method, setting, seed) cells through the engine, resumably, and write the
folder's RESULTS.md and results.json (mean and sd over seeds, with the command, seeds and wall time)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta import config, registry, run
from bayesmeta.diagnostics import reference
from bayesmeta.fit import CHECKPOINT, NonFiniteError
from bayesmeta.io import RunLockedError, copy_file, run_lock, write_json, write_text
from bayesmeta.predict import eval_tasks
from bayesmeta.provenance import cpu_model
from bayesmeta.stats import Published, contrast_verdict, verdict
from bayesmeta.tables import markdown_table
from bayesmeta.tasks.base import PriorDraws


@dataclass(frozen=True)
class Cell:
    """One training run: a method label, a setting label, a seed and config overrides. With
    `evaluation` overrides, the setting is an evaluation of a run shared by every cell with the same
    method, seed and overrides: trained once in runs/<method>-seed<seed>, evaluated in its evals/<setting>."""

    method: str
    setting: str
    seed: int
    overrides: tuple[str, ...] = ()
    evaluation: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.method}-{self.setting}-seed{self.seed}"

    @property
    def run_name(self) -> str:
        """The training run's name (shared by the evaluation settings of one trained model)."""
        return f"{self.method}-seed{self.seed}" if self.evaluation else self.name

    def run_dir(self, out_dir: Path) -> Path:
        """The training run's folder under an experiment's out_dir: runs/<run_name>."""
        return out_dir / "runs" / self.run_name

    def has_run(self, out_dir: Path) -> bool:
        """Whether the training run's folder is here with a checkpoint (a cell reused from its record in
        cells/ has none, e.g. on a fresh clone)."""
        return (self.run_dir(out_dir) / CHECKPOINT).is_file()


def product(
    methods: dict[str, tuple[str, ...]],
    settings: dict[str, tuple[str, ...]],
    seeds: list[int],
    extra: tuple[str, ...] = (),
) -> list[Cell]:
    """Every (method, setting, seed) cell; overrides are the method's, then the setting's, then `extra`."""
    return [
        Cell(m, s, seed, (*m_over, *s_over, *extra))
        for m, m_over in methods.items()
        for s, s_over in settings.items()
        for seed in seeds
    ]


@dataclass
class Outcome:
    cell: Cell
    metrics: dict[str, Any] | None
    seconds: float
    reused: bool = False
    error: str = ""


def _same_config(path: Path, cfg: config.Config) -> bool:
    """The run at `path` was made with this config: its stored config, read by the current code (so
    keys added since take their defaults), equals `cfg`."""
    try:
        return path.is_file() and registry.load_config(path) == cfg
    except config.ConfigError:
        return False


def run_cell(cell: Cell, base: Path, out_dir: Path, progress: bool = True) -> Outcome:
    """Train and evaluate one cell; reuse a finished run with the same config, resume an interrupted one.
    A cell with `evaluation` overrides trains (or reuses) its run, then evaluates it under them."""
    return (
        evaluate_cell(cell, base, out_dir, progress)
        if cell.evaluation
        else _train(cell, base, out_dir, progress)
    )


CELLS = "cells"  # an experiment's committed record of finished cells: config.toml and metrics.json each


def _record(folder: Path, cfg: config.Config, metrics: dict[str, Any]) -> None:
    """Keep a finished cell's config and metrics in out_dir/cells/<cell>/ (committed with the results),
    so that a grid longer than one sitting continues on another machine without its runs/; the
    per-point PIT values (a megabyte per run; the run's own metrics.json keeps them) are left out."""
    calib = {
        s: {k: v for k, v in e.items() if k != "pit"} for s, e in (metrics.get("calibration") or {}).items()
    }
    (folder / "failed.json").unlink(missing_ok=True)  # an earlier config's failure must not pair with cfg
    write_text(folder / "config.toml", config.dumps(cfg))
    write_json(folder / "metrics.json", metrics | ({"calibration": calib} if calib else {}))
    shutil.rmtree(folder / PARKED, ignore_errors=True)  # finished: nothing left to resume


PARKED = "parked"  # cells/<run>/parked/: an unfinished run's config.toml and checkpoint, to resume elsewhere


def park(out_dir: Path) -> list[str]:
    """Copy every unfinished run of out_dir/runs/ that has a checkpoint (its config.toml and
    checkpoint/state.npz) into its record folder, cells/<run>/parked/, so that a run longer than one
    sitting continues on another machine (resume is bit-identical: tests/test_fit.py); returns the runs
    parked. Stop the grid first (Ctrl-C checkpoints a run at its current step): a run whose folder is
    locked by a process still training it is left out, with a message."""
    parked = []
    for run_dir in sorted((out_dir / "runs").glob("*")):
        unfinished = (run_dir / CHECKPOINT).is_file() and not (run_dir / "metrics.json").is_file()
        if not (unfinished and (run_dir / "config.toml").is_file()):
            continue
        try:
            with run_lock(run_dir, "bayesmeta park"):  # not while a grid is still writing it
                to = out_dir / CELLS / run_dir.name / PARKED
                copy_file(run_dir / CHECKPOINT, to / "state.npz")
                copy_file(run_dir / "config.toml", to / "config.toml")
        except RunLockedError as e:
            print(f"not parked: {e}", file=sys.stderr, flush=True)
            continue
        parked.append(run_dir.name)
    return parked


def _unpark(record: Path, run_dir: Path, cfg: config.Config, same: bool) -> bool:
    """Put a parked checkpoint made with this config into run_dir (unless run_dir holds this config,
    `same`, and a checkpoint) to resume from; whether run_dir now has one to resume."""
    if same and (run_dir / CHECKPOINT).is_file():
        return True
    parked = record / PARKED
    if not (_same_config(parked / "config.toml", cfg) and (parked / "state.npz").is_file()):
        return False
    with run_lock(run_dir, "bayesmeta experiment (resuming a parked run)"):
        (run_dir / "metrics.json").unlink(missing_ok=True)  # another config's results, as a fresh start
        copy_file(parked / "config.toml", run_dir / "config.toml")
        copy_file(parked / "state.npz", run_dir / CHECKPOINT)
    print(f"resuming {run_dir.name} from its parked checkpoint", file=sys.stderr, flush=True)
    return True


def _record_failure(folder: Path, cfg: config.Config, error: str, seconds: float) -> None:
    """Keep a failed cell's config and error in out_dir/cells/<cell>/ (failed.json): a run that
    diverges does so again from the same seed, so later invocations report it without retraining."""
    (folder / "metrics.json").unlink(missing_ok=True)  # an earlier config's result must not pair with cfg
    write_text(folder / "config.toml", config.dumps(cfg))
    write_json(folder / "failed.json", {"version": run.METRICS_VERSION, "error": error, "seconds": seconds})
    shutil.rmtree(folder / PARKED, ignore_errors=True)


def _recorded_failure(folder: Path, cfg: config.Config) -> dict[str, Any] | None:
    """The recorded failure of a cell made with this config by the current code, or None."""
    if not (folder / "failed.json").is_file() or not _same_config(folder / "config.toml", cfg):
        return None
    f = json.loads((folder / "failed.json").read_text())
    return f if run.up_to_date(f) else None


def _failure(e: NonFiniteError, out_dir: Path) -> str:
    """The error of a failed run, its paths relative to the experiment's folder."""
    return str(e).replace(f"{out_dir}/", "")


def _recorded(folder: Path, cfg: config.Config) -> dict[str, Any] | None:
    """The recorded metrics of a cell made with this config by the current metrics schema, or None."""
    if not (folder / "metrics.json").is_file() or not _same_config(folder / "config.toml", cfg):
        return None
    m = json.loads((folder / "metrics.json").read_text())
    return m if run.up_to_date(m) else None


def recorded(cells: list[Cell], base: Path, out_dir: Path) -> list[Cell]:
    """The cells whose result is recorded under out_dir for their config (nothing parked, failed or to
    train): a table of what has been run, e.g. one row with three seeds beside rows with one."""

    def done(cell: Cell) -> bool:
        folder = out_dir / CELLS / cell.run_name
        record = folder / "evals" / cell.setting if cell.evaluation else folder
        return _recorded(record, _eval_config(cell, base)) is not None

    return [c for c in cells if done(c)]


def _train_config(cell: Cell, base: Path) -> config.Config:
    """The config of the cell's training run (without its evaluation overrides)."""
    return registry.load_config(base, [*cell.overrides, f"seed={cell.seed}", f"name={cell.run_name}"])


def _eval_config(cell: Cell, base: Path) -> config.Config:
    """The config of the cell's evaluation (its training run's, with the evaluation overrides)."""
    overrides = [*cell.overrides, *cell.evaluation, f"seed={cell.seed}", f"name={cell.run_name}"]
    return registry.load_config(base, overrides)


def _train(cell: Cell, base: Path, out_dir: Path, progress: bool) -> Outcome:
    """The cell's training run in runs/<run_name>, reused or resumed when its config is unchanged (or
    reused from its record in cells/<run_name>/ when runs/ is gone)."""
    cfg = _train_config(cell, base)
    run_dir = cell.run_dir(out_dir)
    record = out_dir / CELLS / cell.run_name
    done = run_dir / "metrics.json"
    same = _same_config(run_dir / "config.toml", cfg)
    if not (done.is_file() and same) and not cell.evaluation and (m := _recorded(record, cfg)) is not None:
        return Outcome(cell, m, m["train_seconds"] + m["eval_seconds"], reused=True)
    if not done.is_file() and (f := _recorded_failure(record, cfg)) is not None:
        return Outcome(cell, None, f["seconds"], reused=True, error=f["error"])
    if done.is_file() and same:
        m = json.loads(done.read_text())
        if not run.up_to_date(m):  # evaluated by older code: re-evaluate, keep training
            setup, result = run.restore(cfg, run_dir)
            m = run.finish(setup, run_dir, result, progress=progress)
        _record(record, cfg, m)
        return Outcome(cell, m, m["train_seconds"] + m["eval_seconds"], reused=True)
    t0 = time.perf_counter()
    resume = _unpark(record, run_dir, cfg, same)
    try:
        _, metrics = run.train(cfg, run_dir, resume=resume, progress=progress)
    except NonFiniteError as e:  # recorded as a failed run; the grid goes on
        seconds = time.perf_counter() - t0
        _record_failure(record, cfg, _failure(e, out_dir), seconds)
        return Outcome(cell, None, seconds, error=_failure(e, out_dir))
    _record(record, cfg, metrics)
    return Outcome(cell, metrics, time.perf_counter() - t0)


def _untrained(cell: Cell, base: Path, out_dir: Path) -> config.Config | None:
    """The training config of a cell that nothing finished, resumable or recorded covers, else None."""
    cfg = registry.load_config(base, [*cell.overrides, f"seed={cell.seed}", f"name={cell.run_name}"])
    run_dir = cell.run_dir(out_dir)
    if _same_config(run_dir / "config.toml", cfg) and any(
        (run_dir / f).is_file() for f in ("metrics.json", CHECKPOINT)
    ):
        return None
    record = out_dir / CELLS / cell.run_name
    if _same_config(record / PARKED / "config.toml", cfg):
        return None  # resumed from its parked checkpoint by _train
    if cell.evaluation:
        if _recorded(record / "evals" / cell.setting, _eval_config(cell, base)) is not None:
            return None
    elif _recorded(record, cfg) is not None or _recorded_failure(record, cfg) is not None:
        return None
    return cfg if cfg.train.devices == 1 else None


def train_together(
    cells: list[Cell], base: Path, out_dir: Path, progress: bool = True, lanes: int = 5
) -> dict[str, Outcome]:
    """Train the cells' untrained runs that differ only in seed together, up to `lanes` seeds in one
    vmapped computation (run.train_seeds), into runs/<run_name> with their records; returns each
    trained run's outcome by run name (a run that failed carries its error). Runs without a partner
    are left to run_cell."""
    groups: dict[tuple[str, ...], dict[str, config.Config]] = {}
    for cell in cells:
        if (cfg := _untrained(cell, base, out_dir)) is not None:
            groups.setdefault(cell.overrides, {})[cell.run_name] = cfg
    done: dict[str, Outcome] = {}
    for runs in groups.values():
        names = list(runs)
        for i in range(0, len(names), lanes):
            part = names[i : i + lanes]
            if len(part) < 2:
                continue
            print(f"training {len(part)} seeds together: {', '.join(part)}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            cfgs = [runs[n] for n in part]
            outs = run.train_seeds(cfgs, [out_dir / "runs" / n for n in part], progress=progress)
            share = (time.perf_counter() - t0) / len(part)
            for name, cfg, (result, metrics) in zip(part, cfgs, outs, strict=True):
                cell = next(c for c in cells if c.run_name == name)
                if metrics is None:
                    _record_failure(out_dir / CELLS / name, cfg, _failure(result, out_dir), share)
                    done[name] = Outcome(cell, None, share, error=_failure(result, out_dir))
                    continue
                _record(out_dir / CELLS / name, cfg, metrics)
                done[name] = Outcome(cell, metrics, metrics["train_seconds"] + metrics["eval_seconds"])
    return done


def evaluate_cell(cell: Cell, base: Path, out_dir: Path, progress: bool = True) -> Outcome:
    """Evaluate the cell's trained run (training it first if needed) under its evaluation overrides,
    into runs/<run>/evals/<setting>/; reused when that evaluation's config is unchanged (also from its
    record in cells/<run>/evals/<setting>/). Overrides that leave the training run's config as it was
    name its own evaluation, which is not repeated."""
    cfg = _eval_config(cell, base)
    run_dir = cell.run_dir(out_dir)
    eval_dir = run_dir / "evals" / cell.setting
    record = out_dir / CELLS / cell.run_name / "evals" / cell.setting
    if not (eval_dir / "metrics.json").is_file() and (m := _recorded(record, cfg)) is not None:
        return Outcome(cell, m, m["eval_seconds"], reused=True)
    trained = _train(cell, base, out_dir, progress)
    if trained.metrics is None:
        return Outcome(cell, None, trained.seconds, error=trained.error)
    if _train_config(cell, base) == cfg:  # the training run's own evaluation: not repeated
        _record(record, cfg, trained.metrics)
        return Outcome(cell, trained.metrics, trained.seconds, reused=trained.reused)
    if (eval_dir / "metrics.json").is_file() and _same_config(eval_dir / "config.toml", cfg):
        m = json.loads((eval_dir / "metrics.json").read_text())
        if run.up_to_date(m):
            _record(record, cfg, m)
            return Outcome(cell, m, m["eval_seconds"], reused=True)
    t0 = time.perf_counter()
    with run_lock(run_dir, "bayesmeta experiment"):  # run.finish publishes eval_dir's config.toml too
        setup, result = run.restore(cfg, run_dir)
        metrics = run.finish(setup, eval_dir, result, progress=progress, fit_dir=run_dir)
    _record(record, cfg, metrics)
    return Outcome(cell, metrics, time.perf_counter() - t0)


def _stats(metrics: dict[str, Any], name: str) -> dict[str, Any]:
    """A metric's summary over tasks ("accuracy@5"; "accuracy@max" at the largest test-time step
    count), or a run-level number in the same shape: a diagnostic by name, or any entry of
    metrics.json by its path, e.g. "calibration/5/coverage/0.9"; a path to a summary over tasks
    (a group's metric, "groups/sine/mse@10") gives that summary."""
    if name.endswith("@max"):  # the metric at the run's largest test-time step count
        prefix = name[: -len("max")]
        steps = [int(k[len(prefix) :]) for k in metrics["metrics"] if k.startswith(prefix)]
        name = f"{prefix}{max(steps)}"
    if name in metrics["metrics"]:
        return metrics["metrics"][name]
    if "/" in name:
        v: Any = metrics
        for key in name.split("/"):
            v = v[key]
        if isinstance(v, dict) and "mean" in v:  # a summary over tasks, e.g. "groups/sine/mse@10"
            return v
    else:  # a diagnostic the run did not compute (e.g. eval.memorization_tasks = 0) is missing
        v = metrics["diagnostics"].get(name)
    return {"mean": v, "median": v, "n_diverged": 0, "n": 1, "dominated": False, "missing": v is None}


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None


def _published(value: float | Published | None) -> Published | None:
    return Published(value) if isinstance(value, (int, float)) else value


def aggregate(
    outcomes: list[Outcome],
    metric_names: list[str],
    published: dict[tuple[str, str, str], float | Published] | None = None,
) -> list[dict[str, Any]]:
    """One row per (method, setting, metric): mean and sd over seeds of the per-run mean over the
    tasks that did not diverge, the same for the median over tasks, the diverged count, and the
    verdict against the published value (bayesmeta.stats.verdict)."""
    published = published or {}
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        if o.metrics is None:  # failed runs are listed in RESULTS.md, not averaged
            continue
        groups.setdefault((o.cell.method, o.cell.setting), []).append(o)
    rows = []
    for (method, setting), group in groups.items():
        for metric in metric_names:
            stats = [_stats(o.metrics, metric) for o in group]
            mean, sd = _mean_sd([s["mean"] for s in stats])
            med, sd_med = _mean_sd([s["median"] for s in stats])
            ci95 = _mean_sd([s.get("ci95") for s in stats])[0]
            pub = _published(published.get((method, setting, metric)))
            dominated = any(s.get("dominated", False) for s in stats)
            per_seed = [s["mean"] for s in stats]
            word, tol = verdict(metric, per_seed, ci95, pub)
            if dominated and pub is not None and not pub.baseline:
                word, tol = "no verdict (a mean one task dominates)", None
            rows.append(
                {
                    "method": method,
                    "setting": setting,
                    "metric": metric,
                    "mean": mean,
                    "sd": sd,
                    "median": med,
                    "sd_median": sd_med,
                    "n": len(group),
                    "diverged_tasks": sum(s["n_diverged"] for s in stats),
                    "tasks_per_seed": stats[0]["n"],
                    "ci95_tasks": ci95,
                    "dominated": dominated,
                    "seeds": [o.cell.seed for o in group],
                    "per_seed": per_seed,
                    "published": None if pub is None else pub.value,
                    "published_sd": None if pub is None else pub.sd,
                    "failure_baseline": bool(pub and pub.baseline),
                    "verdict": word,
                    "tolerance": tol,
                    "missing": any(st.get("missing", False) for st in stats),
                }
            )
    return rows


@dataclass(frozen=True)
class Contrast:
    """`method` minus `base` on `metric` in `setting`, paired by seed (the same seed tests on the same
    tasks), against the paper's contrast where it gives one (e.g. MR-MAML(W) minus MAML)."""

    setting: str
    base: str
    method: str
    metric: str
    published: float | None = None


def paired(
    means: dict[tuple[str, str, str, int], float | None], wanted: list[Contrast]
) -> list[dict[str, Any]]:
    """Each contrast's per-seed differences of the (method, setting, metric, seed) means, its mean,
    95% t-interval over seeds and verdict (bayesmeta.stats.contrast_verdict); a contrast with no
    shared seed, or an undefined mean, is left out."""
    rows = []
    for c in wanted:
        seeds = sorted(
            k[3]
            for k in means
            if k[:3] == (c.method, c.setting, c.metric) and (c.base, c.setting, c.metric, k[3]) in means
        )
        pairs = [
            (means[(c.method, c.setting, c.metric, k)], means[(c.base, c.setting, c.metric, k)])
            for k in seeds
        ]
        if not seeds or any(a is None or b is None for a, b in pairs):
            continue
        rows.append(
            {**asdict(c), "seeds": seeds} | contrast_verdict([a - b for a, b in pairs], c.published, c.metric)
        )
    return rows


def contrasts(outcomes: list[Outcome], wanted: list[Contrast]) -> list[dict[str, Any]]:
    """`paired` on the runs of a grid: each run's mean over tasks of each contrast's metric."""
    means = {
        (o.cell.method, o.cell.setting, metric, o.cell.seed): _stats(o.metrics, metric)["mean"]
        for o in outcomes
        if o.metrics is not None
        for metric in {c.metric for c in wanted}
    }
    return paired(means, wanted)


def contrast_table(rows: list[dict[str, Any]], scale: float = 1.0, unit: str = "") -> str:
    """Markdown of `contrasts` rows (values times `scale`, e.g. 100 for accuracy points)."""

    def f(v: float) -> str:
        return f"{scale * v:+.{2 if scale != 1 else 4}f}{unit}"

    rows_md = []
    for r in rows:
        half = r["half_width"]
        ci = "n/a" if half is None else f"[{f(r['mean'] - half)}, {f(r['mean'] + half)}]"
        pub = "n/a" if r["published"] is None else f(r["published"])
        size = f"; published {r['size']}" if r["size"] else ""
        rows_md.append(
            [
                r["setting"],
                f"{r['method']} minus {r['base']}",
                r["metric"],
                ", ".join(f(v) for v in r["per_seed"]),
                f(r["mean"]),
                ci,
                pub,
                f"{r['verdict']}{size}",
            ]
        )
    header = [
        "setting",
        "contrast",
        "metric",
        "per seed",
        "mean",
        "95% CI over seeds",
        "published",
        "verdict",
    ]
    return markdown_table(header, rows_md) + "\n"


def machine() -> str:
    import jax

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()} CPU ({cpu_model()}), {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}, JAX {jax.__version__} ({jax.default_backend()})"
    )


@dataclass
class Results:
    title: str
    out_dir: Path
    rows: list[dict[str, Any]]
    outcomes: list[Outcome]
    wall_seconds: float
    notes: str = ""
    wide: bool = False
    command: str = field(
        default_factory=lambda: " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    )

    def table(self) -> str:
        return self.wide_table() if self.wide else self.long_table()

    def wide_table(self) -> str:
        """One row per (method, setting), one column per metric: mean (sd) over seeds."""
        metrics = self._metric_names()
        lines = []
        for method, setting in dict.fromkeys((r["method"], r["setting"]) for r in self.rows):
            rows = {r["metric"]: r for r in self.rows if (r["method"], r["setting"]) == (method, setting)}
            diverged = max(rows[m]["diverged_tasks"] for m in metrics)
            total = max(rows[m]["tasks_per_seed"] * rows[m]["n"] for m in metrics)
            cells = [_cell(rows[m], 3) for m in metrics]
            lines.append([method, setting, *cells, f"{diverged} of {total}", rows[metrics[0]]["n"]])
        header = ["method", "setting", *metrics, "diverged tasks (support loss rose)", "seeds"]
        return markdown_table(header, lines) + "\n"

    def long_table(self) -> str:
        def ci(v: float | None) -> str:
            return "n/a" if v is None else f"± {v:.4f}"

        def pub(r: dict[str, Any]) -> str:
            if r["published"] is None:
                return "n/a"
            sd = "" if r["published_sd"] is None else f" ({r['published_sd']})"
            return f"{r['published']}{sd}"

        header = [
            "method",
            "setting",
            "metric",
            "mean (sd) over seeds",
            "95% CI over tasks",
            "median over tasks (sd)",
            "diverged tasks (support loss rose)",
            "seeds",
            "published",
            "verdict",
        ]
        body = [
            [
                r["method"],
                r["setting"],
                r["metric"],
                _cell(r, 4),
                ci(r.get("ci95_tasks")),
                _cell({**r, "mean": r["median"], "sd": r["sd_median"], "dominated": False}, 4),
                f"{r['diverged_tasks']} of {r['tasks_per_seed'] * r['n']}",
                r["n"],
                pub(r),
                r["verdict"],
            ]
            for r in self.rows
        ]
        return markdown_table(header, body) + "\n" + VERDICT_LEGEND

    def write(self) -> None:
        seeds = sorted({o.cell.seed for o in self.outcomes})
        run_seconds = compute_seconds(self.outcomes)
        reused = sum(o.reused for o in self.outcomes)
        md = (
            f"# {self.title}\n\n{self.table()}\n"
            f"- command: `{self.command}`\n"
            f"- seeds: {seeds}; {len(self.outcomes)} runs"
            f"{f' ({reused} reused from earlier invocations)' if reused else ''}\n"
            f"- time: {run_seconds / 60:.1f} min of training and evaluation summed over the runs (per run "
            f"below; runs may have shared the 2 cores with other experiments); this invocation took "
            f"{self.wall_seconds / 60:.1f} min\n"
            f"- machine: {machine()}\n"
            f"- written by the experiment script on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        )
        if self.notes:
            md += f"\n## Notes\n\n{self.notes.strip()}\n"
        names = self._metric_names()
        runs = [
            [o.cell.name, f"failed: {o.error}", *[""] * len(names)]
            if o.metrics is None
            else [
                o.cell.name,
                *(_fmt(_stats(o.metrics, m)["mean"]) for m in names),
                f"{o.metrics['train_seconds']:.0f}",
            ]
            for o in self.outcomes
        ]
        md += "\n## Runs\n\n" + markdown_table(["run", *names, "train s"], runs) + "\n"
        failed = [o for o in self.outcomes if o.metrics is None]
        if failed:
            md += (
                "\nFailed runs (not in the means above): "
                + "; ".join(f"{o.cell.name}: {o.error}" for o in failed)
                + "\n"
            )
        write_text(self.out_dir / "RESULTS.md", md)
        write_json(
            self.out_dir / "results.json",
            {
                "title": self.title,
                "command": self.command,
                "machine": machine(),
                "wall_seconds": self.wall_seconds,
                "seeds": seeds,
                "results": self.rows,
            },
        )

    def _metric_names(self) -> list[str]:
        return list(dict.fromkeys(r["metric"] for r in self.rows))


def compute_seconds(outcomes: list[Outcome]) -> float:
    """Training time of every distinct training run (once, however many settings evaluate it) plus
    every evaluation's time, from the runs' metrics.json (so reused runs count what they cost)."""
    train: dict[str, float] = {}
    total = 0.0
    for o in outcomes:
        if o.metrics is None:
            total += o.seconds
            continue
        train[o.cell.run_name] = o.metrics["train_seconds"]
        total += o.metrics["eval_seconds"]
    return total + sum(train.values())


VERDICT_LEGEND = (
    "\nMeans are over the tasks that did not diverge (a task diverged when its adapted support loss "
    "ended above its value before adaptation, or is not finite; without an inner loop nothing adapts, and "
    "a task diverged when its predictions are not finite); a mean with one task carrying more than "
    "a quarter of its sum is not shown (†) and gets no verdict. Verdict: *matches* when ours is within the "
    "combined 95% interval (our t-interval over seeds, or over tasks with one seed, and 1.96 x the "
    "paper's sd where it gives one); otherwise *better* or *worse*; *inconclusive* when ours is within "
    "it but it is as wide as the published value. A paper's failure baseline is judged through the contrast "
    "with the method that fixes it.\n"
)


def _cell(r: dict[str, Any], digits: int) -> str:
    """mean (sd) over seeds; n/a, diverged, or a dagger when one task dominates the mean."""
    if r["missing"]:
        return "n/a"
    if r["mean"] is None:
        return "diverged"
    if r.get("dominated"):  # never headlined: the number stays in results.json
        return "† one task dominates (see the median)"
    sd = "" if r["sd"] is None else f" ({r['sd']:.{digits}f})"
    return f"{r['mean']:.{digits}f}{sd}"


def _fmt(v: float | None) -> str:
    return "diverged" if v is None else f"{v:.4f}"


CACHE = Path.home() / ".cache" / "bayesmeta" / "xla"
CACHE_BYTES = 4 << 30  # the cache's bound; least recently used programs are dropped beyond it


def compilation_cache() -> None:
    """Use XLA's persistent compilation cache in ~/.cache/bayesmeta/xla unless one is configured: every
    seed of a configuration compiles to one program (the data key is an argument of the training
    chunk), so a grid's later seeds load it instead of compiling. The cache is bounded (least recently
    used entries go beyond CACHE_BYTES), which also makes JAX hold a file lock around each read and
    write: the worker processes of a grid, and concurrent experiments, share the folder."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(CACHE))
        if jax.config.jax_compilation_cache_max_size < 0:
            jax.config.update("jax_compilation_cache_max_size", CACHE_BYTES)


def run_cells(cells: list[Cell], base: Path, out_dir: Path, progress: bool = False) -> list[Outcome]:
    """run_cell for each cell in order (one worker's share of a grid: the cells of one training run)."""
    compilation_cache()
    return [run_cell(cell, base, out_dir, progress) for cell in cells]


def _run_parallel(cells: list[Cell], base: Path, out_dir: Path, jobs: int) -> list[Outcome]:
    """Every cell, `jobs` training runs at a time in worker processes (the cells sharing a training run,
    its evaluation settings, go to one worker, which holds that run's lock); outcomes in cell order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.run_name, []).append(cell)
    done: dict[Cell, Outcome] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_cells, group, base, out_dir): name for name, group in groups.items()}
        for k, future in enumerate(as_completed(futures)):
            for o in future.result():
                done[o.cell] = o
            print(f"[{k + 1}/{len(groups)} runs] {futures[future]}", file=sys.stderr, flush=True)
    return [done[cell] for cell in cells]


def _run_cells(cells: list[Cell], base: Path, out_dir: Path, progress: bool, lanes: int, jobs: int) -> list:
    """Every cell's outcome, trained (lanes of seeds together, or `jobs` worker processes) or reused."""
    together = train_together(cells, base, out_dir, progress, lanes) if lanes > 1 else {}
    if jobs > 1 and not together:
        return _run_parallel(cells, base, out_dir, jobs)
    outcomes = []
    for i, cell in enumerate(cells):
        print(f"[{i + 1}/{len(cells)}] {cell.name}", file=sys.stderr, flush=True)
        trained = together.get(cell.run_name)
        if trained is not None and not cell.evaluation:
            outcomes.append(trained)
        elif trained is not None and trained.error:
            outcomes.append(Outcome(cell, None, trained.seconds, error=trained.error))
        else:
            outcomes.append(run_cell(cell, base, out_dir, progress))
    return outcomes


def run_grid(
    title: str,
    base: Path,
    cells: list[Cell],
    metric_names: list[str],
    out_dir: Path,
    published: dict | None = None,
    notes: str = "",
    progress: bool = True,
    wide: bool = False,
    lanes: int = 1,
    jobs: int = 1,
) -> Results:
    """Run every cell (reusing finished ones) and write RESULTS.md / results.json into out_dir.

    `jobs` > 1 trains that many runs at once in worker processes (on a CPU, one per core: XLA runs a
    small model's step on one core). `lanes` > 1 trains untrained runs that differ only in seed that
    many at a time as lanes of one vmapped computation (train_together), which pays on an accelerator
    a small model leaves idle; on a CPU it is no faster (experiments/bench/seeds). Interrupted (Ctrl-C,
    SIGTERM), it parks the unfinished runs into their records (park) before it stops."""
    t0 = time.perf_counter()
    compilation_cache()
    try:
        outcomes = _run_cells(cells, base, out_dir, progress, lanes, jobs)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run in training checkpointed; keep it with the records
        for name in park(out_dir):
            print(f"parked {name} in {out_dir / CELLS / name / PARKED}", file=sys.stderr, flush=True)
        raise
    res = Results(
        title,
        out_dir,
        aggregate(outcomes, metric_names, published),
        outcomes,
        time.perf_counter() - t0,
        notes,
        wide,
    )
    res.write()
    return res


INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT (as `bayesmeta fit` returns)


def script(main: Callable[[], None]) -> None:
    """Run an experiment script's main; interrupted (Ctrl-C, or SIGTERM while training), end with one
    line saying how to resume and exit status 130, not a traceback: run_grid has parked the unfinished
    runs and every finished one is in its record, so the same command carries on."""
    try:
        main()
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished runs are recorded and the unfinished ones checkpointed (parked in"
            " cells/<run>/parked/ by a grid); rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(INTERRUPTED) from None


def plot_sweep(
    res: Results, x_of: Any, metric: str, path: Path, xlabel: str, ylabel: str, logx: bool = False
) -> Path:
    """`metric` against a numeric setting, one line per method: the mean over tasks (log scale, where a
    few diverging tasks show) and the median over tasks (robust), each as mean and sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayesmeta.report import save_fig

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for stat, ax in zip(("mean", "median"), axes, strict=True):
        for method in dict.fromkeys(r["method"] for r in res.rows):
            rows = sorted(
                (
                    r
                    for r in res.rows
                    if r["method"] == method and r["metric"] == metric and r[stat] is not None
                ),
                key=lambda r: x_of(r["setting"]),
            )
            sd = "sd" if stat == "mean" else "sd_median"
            ax.errorbar(
                [x_of(r["setting"]) for r in rows],
                [r[stat] for r in rows],
                yerr=[r[sd] or 0.0 for r in rows],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set(
            xlabel=xlabel,
            ylabel=f"{ylabel} ({stat} over tasks)",
            xscale="log" if logx else "linear",
            yscale="log" if stat == "mean" else "linear",
        )
        ax.legend()
    return save_fig(fig, path)


def end_change(history: dict[str, float]) -> float | None:
    """Relative change of a held-out curve over its last quarter: (mean of the third quarter's points
    - mean of the last quarter's) / |mean of the third quarter's|, > 0 while it still falls; None
    with fewer than 8 points or a non-finite value. A curve is called flat when |change| < 5%."""
    values = [history[k] for k in sorted(history, key=int)]
    if len(values) < 8 or any(v is None or not np.isfinite(v) for v in values):
        return None
    q = len(values) // 4
    third, last = np.mean(values[-2 * q : -q]), np.mean(values[-q:])
    return float((third - last) / abs(third)) if third else None


@dataclass(frozen=True)
class Condition:
    """One condition of a target: `met(mean)` on a metric's mean over seeds, named by `label`."""

    metric: str
    label: str
    met: Callable[[float], bool]


def joint_target_table(
    rows: list[dict], conditions: tuple[Condition, ...], reference: str | tuple[str, ...] = ()
) -> str:
    """Markdown: a target that one method must meet in all its conditions at once, in one setting (a
    predictive can be calibrated by being wide, or sharp by being over-confident). Per (method,
    setting): its mean (sd over seeds, or "one seed") on each condition's metric, ticked where met, and
    how many it meets; then one verdict naming the methods that meet all. A mean that one seed or task
    dominates meets nothing; the `reference` methods are listed but not judged, and a row's "spread"
    (e.g. "exact") replaces the sd over seeds."""
    references = (reference,) if isinstance(reference, str) else reference
    by = {(r["method"], r["setting"], r["metric"]): r for r in rows}
    pairs = list(dict.fromkeys((r["method"], r["setting"]) for r in rows))
    head = " | ".join(c.label for c in conditions)
    out = [f"| method | setting | {head} | conditions met |", "|---|---|" + "---|" * (len(conditions) + 1)]
    winners = []
    for m, setting in pairs:
        cells, met = [], 0
        for c in conditions:
            r = by.get((m, setting, c.metric))
            if r is None or r["mean"] is None:
                cells.append("n/a")
                continue
            good = c.met(r["mean"]) and not r["dominated"]
            met += good
            spread = r.get("spread") or ("one seed" if r["sd"] is None else f"{r['sd']:.3f}")
            cells.append(f"{r['mean']:.3f} ({spread}){' ✓' if good else ''}")
        name = f"{m} (reference)" if m in references else m
        out.append(f"| {name} | {setting} | {' | '.join(cells)} | {met} of {len(conditions)} |")
        if met == len(conditions) and m not in references:
            winners.append(f"{m} ({setting})")
    verdict = (
        f"**Met** by {', '.join(winners)}: every condition at once."
        if winners
        else "**Missed**: no method meets every condition at once."
    )
    return "\n".join(out) + f"\n\n{verdict}\n"


def exact_reference(
    base: Path, overrides: tuple[str, ...], draws: int = 2**18, cache: Path | None = None
) -> reference.Reference:
    """The exact posterior predictive of the config's evaluation family (a PriorDraws family), by
    importance sampling with `draws` prior functions per task, on the evaluation tasks every cell of
    that config is tested on, with its eval.samples draws for mode coverage. With `cache` (a JSON
    file), a result is stored under a hash of the resolved config, the draws and the source of the
    sampler and of the family, and read back while they are unchanged (delete the file to recompute)."""
    cfg = registry.load_config(base, list(overrides))
    setup = run.Setup.from_config(cfg)
    family_source = inspect.getsource(sys.modules[type(setup.eval_family).__module__])
    text = f"{config.dumps(cfg)}\n{draws}\n{inspect.getsource(reference)}\n{family_source}"
    key = hashlib.sha256(text.encode()).hexdigest()
    try:
        return reference.Reference.from_dict(_read_cache(cache)[key])
    except (KeyError, TypeError, ValueError, AttributeError):  # not cached, or an entry we cannot read
        pass
    ref = _exact_reference(cfg, setup, draws)
    if cache is not None:
        write_json(cache, _read_cache(cache) | {key: asdict(ref)})
    return ref


def _read_cache(path: Path | None) -> dict:
    """A JSON object of cached results; empty when the file is missing or unreadable (recomputed)."""
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _exact_reference(cfg: config.Config, setup: run.Setup, draws: int) -> reference.Reference:
    """exact_reference's computation, uncached."""
    if not isinstance(setup.eval_family, PriorDraws):
        raise config.ConfigError(
            f"eval.task: family {cfg.eval.task.family!r} cannot sample its prior (PriorDraws)"
        )
    batches = eval_tasks(setup.eval_family, setup.eval_key, cfg.eval.tasks, cfg.eval.batch)
    tasks = jax.tree.map(lambda *a: jnp.concatenate(a), *batches)
    mode_tasks = cfg.eval.memorization_tasks or 100  # as sections.mode_coverage
    key = jax.random.fold_in(setup.eval_key, 10**6 + 2)
    return reference.importance_reference(
        setup.eval_family, tasks, cfg.eval.samples, key, draws, mode_tasks=mode_tasks
    )


def reference_rows(label: str, setting: str, metrics: dict[str, float | None]) -> list[dict]:
    """Rows in aggregate's shape for an exact reference's metrics (no seeds: its spread reads "exact"),
    to stand beside the learners in joint_target_table."""
    return [
        {
            "method": label,
            "setting": setting,
            "metric": k,
            "mean": v,
            "sd": None,
            "spread": "exact",
            "dominated": False,
        }
        for k, v in metrics.items()
    ]


def reference_table(refs: dict[str, reference.Reference]) -> str:
    """Markdown: per setting, the importance-sampled exact predictive's calibration numbers, mode
    coverage and the sampler's effective sample size per task (median and smallest)."""
    head = ["setting", "NLL", "MSE", "cov 50%", "cov 90%", "cov 95%", "width 90%", "PIT KS"]
    head += ["mode coverage", "mode coverage, ambiguous (n)", "draws", "ESS median / min"]
    rows = []
    for setting, r in refs.items():
        amb = (
            "n/a"
            if r.mode_coverage_ambiguous is None
            else f"{r.mode_coverage_ambiguous:.3f} ({r.n_ambiguous})"
        )
        rows.append(
            [
                setting,
                f"{r.nll:.3f}",
                f"{r.mse:.3f}",
                *(f"{r.coverage[level]:.3f}" for level in (0.5, 0.9, 0.95)),
                f"{r.width[0.9]:.3f}",
                f"{r.pit_ks:.3f}",
                "n/a" if r.mode_coverage is None else f"{r.mode_coverage:.3f}",
                amb,
                f"{r.draws:,}",
                f"{r.ess_median:.0f} / {r.ess_min:.0f}",
            ]
        )
    return markdown_table(head, rows)


def ablation_note(extra: list[str]) -> str:
    """The line a RESULTS.md's notes carry when every run of the grid took extra overrides (an
    ablation beside the main table), or "" when it took none."""
    return f"\nAblation: every run also takes {' '.join(extra)}.\n" if extra else ""


def curve_table(outcomes: list[Outcome], metric: str) -> str:
    """Markdown: per run, the held-out `metric` at the end of training and its change over the last
    quarter of the curve (end_change), with a verdict: flat (|change| < 5%), still falling or rising."""
    rows = []
    for o in outcomes:
        if o.metrics is None or metric not in o.metrics.get("history", {}):
            continue
        hist = o.metrics["history"][metric]
        change = end_change(hist)
        last = hist[max(hist, key=int)]
        word = (
            "n/a"
            if change is None
            else "flat"
            if abs(change) < 0.05
            else "still falling"
            if change > 0
            else "still rising"
        )
        rows.append([o.cell.name, _fmt(last), "n/a" if change is None else f"{change:+.1%}", word])
    return markdown_table(
        [
            "run",
            f"held-out {metric} at the end (one predictive draw)",
            "change over the last quarter",
            "curve",
        ],
        rows,
    )


def plot_curves(outcomes: list[Outcome], metric: str, path: Path, logy: bool = True) -> Path:
    """The held-out `metric` during training (metrics.json history, the monitor tasks), one line per
    method: mean over seeds with the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayesmeta.report import save_fig

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(o.cell.method for o in outcomes):
        curves = [
            o.metrics["history"][metric]
            for o in outcomes
            if o.cell.method == method and o.metrics is not None and metric in o.metrics.get("history", {})
        ]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)), key=int)
        vals = np.array([[np.nan if c[k] is None else c[k] for k in steps] for c in curves], dtype=float)
        x = [int(k) for k in steps]
        ax.plot(x, np.nanmean(vals, 0), label=f"{method} ({len(curves)} seeds)")
        ax.fill_between(x, np.nanmin(vals, 0), np.nanmax(vals, 0), alpha=0.2)
    ax.set(xlabel="meta-training step", ylabel=f"held-out {metric}", yscale="log" if logy else "linear")
    ax.legend(fontsize=7)
    return save_fig(fig, path)


def adapted_functions(
    outcomes: list[Outcome],
    base: Path,
    out_dir: Path,
    panels: dict[str, tuple[str, ...]],
    inner_steps: int,
    key: int = 0,
) -> dict[str, Any]:
    """Each method's adapted function on one task per panel: for each panel (a label and config
    overrides choosing its tasks, e.g. `eval.task.params.families=['sine']`) one task of the evaluation
    family drawn with PRNGKey(key), the same for every method; each method's run of the lowest seed
    whose run folder is present (a cell reused from its record has none) restored, adapted to its
    support set with `inner_steps` steps, and its predictive mean (over the run's eval.samples draws) on
    the family's dense grid. Returns {"x", "truth", "x_support", "y_support"} per panel and {"f": {method:
    (G, y_dim)}}, methods in the grid's order. Each method's curves are also stored beside its cell
    record (cells/<cell>/adapted.json, under a hash of the cell's overrides and seed, the panels, steps
    and key) and read from there when its run folder is gone, so a figure regenerates on a fresh clone;
    a method with neither is left out of "f" (`unplotted` names them)."""

    def tag(o: Outcome) -> str:
        what = [list(o.cell.overrides), o.cell.seed, panels, inner_steps, key]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    first: dict[str, tuple[Outcome, dict | None]] = {}
    for o in sorted((o for o in outcomes if o.metrics is not None), key=lambda o: o.cell.seed):
        stored = _read_cache(out_dir / CELLS / o.cell.name / "adapted.json").get(tag(o))
        if o.cell.method not in first and (o.cell.has_run(out_dir) or stored is not None):
            first[o.cell.method] = (o, None if o.cell.has_run(out_dir) else stored)
    order = list(dict.fromkeys(o.cell.method for o in outcomes))  # the grid's (the table's) order
    out: dict[str, Any] = {}
    for method, (o, stored) in sorted(first.items(), key=lambda kv: order.index(kv[0])):
        panels_of_run = stored or _adapted_panels(o, base, out_dir, panels, inner_steps, key)
        if stored is None:
            path = out_dir / CELLS / o.cell.name / "adapted.json"
            if path.parent.is_dir():
                write_json(path, _read_cache(path) | {tag(o): panels_of_run})
        for label, values in panels_of_run.items():
            panel = out.setdefault(label, {"f": {}})
            panel["f"][method] = np.asarray(values["f"])
            panel |= {k: np.asarray(v) for k, v in values.items() if k != "f"}
    return out


def _adapted_panels(
    o: Outcome, base: Path, out_dir: Path, panels: dict[str, tuple[str, ...]], inner_steps: int, key: int
) -> dict[str, dict[str, list]]:
    """adapted_functions for one run folder: per panel its grid, truth, support and the predictive mean
    (as lists, for the cell's adapted.json)."""
    import jax

    from bayesmeta.predict import predictive

    cfg = registry.load_config(base, [*o.cell.overrides, f"seed={o.cell.seed}", f"name={o.cell.run_name}"])
    setup, result = run.restore(cfg, o.cell.run_dir(out_dir))
    draw = predictive(setup.eval_method, inner_steps, cfg.eval.samples, ("f",))
    out = {}
    for label, overrides in panels.items():
        fam = registry.make_family(registry.load_config(base, [*o.cell.overrides, *overrides]).eval.task)
        task = fam.sample(jax.random.PRNGKey(key), 1)
        grid = fam.grid(task.info, run.GRID_POINTS)
        f = draw(result.params, task._replace(x_query=grid, y_query=None), jax.random.PRNGKey(1))["f"]
        out[label] = {
            "f": np.asarray(f.mean(0)[0]).tolist(),
            "x": np.asarray(grid[0]).tolist(),
            "truth": np.asarray(fam.truth(task.info, grid)[0]).tolist(),
            "x_support": np.asarray(task.x_support[0]).tolist(),
            "y_support": np.asarray(task.y_support[0]).tolist(),
        }
    return out


def unplotted(outcomes: list[Outcome], functions: dict[str, Any]) -> list[str]:
    """The methods with a finished run that `adapted_functions` could not plot (no run folder here)."""
    plotted = {m for panel in functions.values() for m in panel["f"]}
    return sorted({o.cell.method for o in outcomes if o.metrics is not None} - plotted)


def on_grid_line(x_points: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(n,) bool: the points (n, d) whose inputs beyond the first match those of the grid (G, d) at the
    grid point nearest in the first input, within one grid step: the points a 1-D plot against the
    first input can draw."""
    nearest = np.abs(x_points[:, None, 0] - grid[None, :, 0]).argmin(1)
    tol = np.ptp(grid[:, 0]) / max(len(grid) - 1, 1)
    return np.all(np.abs(x_points[:, 1:] - grid[nearest, 1:]) < tol, -1)


def plot_adapted(functions: dict[str, Any], path: Path, title: str = "") -> Path:
    """One panel per entry of `adapted_functions`: the truth, each method's adapted function against the
    grid's first input, and the support points that lie on the grid's line (for inputs of more than one
    dimension, a support point off the plotted line is not drawn). Past ten methods the colours repeat
    with another line style; the legend sits beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayesmeta.report import save_fig

    n = len(functions)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (label, p) in zip(axes.flat, functions.items(), strict=False):
        x = p["x"]
        ax.plot(x[:, 0], p["truth"][:, 0], color="k", lw=2, label="truth")
        for j, (method, f) in enumerate(p["f"].items()):
            ax.plot(
                x[:, 0], f[:, 0], color=f"C{j % 10}", ls=("-", "--", ":")[j // 10 % 3], lw=1.2, label=method
            )
        on_line = on_grid_line(p["x_support"], x)
        ax.scatter(p["x_support"][on_line, 0], p["y_support"][on_line, 0], color="k", s=16, zorder=3)
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.legend(
        *axes.flat[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_fig(fig, path)


def plot_reliability_grid(outcomes: list[Outcome], steps: int, path: Path) -> Path:
    """One reliability diagram per method (the run of its lowest seed with a metrics.json reliability
    entry at `steps` test-time steps; methods in their order in `outcomes`): accuracy against
    confidence per bin, with the run's ECE in the title, over the share of predictions per bin."""
    import matplotlib

    matplotlib.use("Agg")

    from bayesmeta.report import draw_reliability, reliability_axes, save_fig

    first: dict[str, Outcome] = {}
    for o in outcomes:
        has = o.metrics is not None and str(steps) in (o.metrics.get("reliability") or {})
        if has and (o.cell.method not in first or o.cell.seed < first[o.cell.method].cell.seed):
            first[o.cell.method] = o
    fig, axes = reliability_axes(max(1, len(first)), 3.2, 4.3)
    for column, (method, o) in enumerate(first.items()):
        e = o.metrics["reliability"][str(steps)]
        draw_reliability(axes[0][column], axes[1][column], e["diagram"])
        axes[0][column].set_title(f"{method}\nECE {e['ece']:.3f} (seed {o.cell.seed})")
    axes[0][0].set_ylabel("accuracy")
    axes[1][0].set_ylabel("share")
    fig.tight_layout()
    return save_fig(fig, path)
