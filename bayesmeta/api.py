"""A fitted run, from Python: predict on a new support set, re-evaluate, sample.

    run = bayesmeta.open_run("runs/example")
    dt = run.predict(x_support, y_support, x_query, samples=50)
    dt["posterior_predictive"]["y"]  # (chain, draw, point, output): posterior predictive draws
    run.sample(task_seed=3)  # sampled functions on a task of the family: samples/sample_<n>.nc, .png
    metrics = run.evaluate(["eval.tasks=100"])  # rewrites the run's report, like `bayesmeta evaluate`

The command line (`bayesmeta evaluate`, `bayesmeta sample`) is a thin shell over these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import xarray as xr

from bayesmeta import sample as sampling
from bayesmeta.config import Config, ConfigError
from bayesmeta.fit import FitResult
from bayesmeta.io import RunFolderError, run_lock
from bayesmeta.likelihoods import Categorical
from bayesmeta.predict import predictive
from bayesmeta.registry import load_config
from bayesmeta.report import support_set_tree
from bayesmeta.run import Setup, finish, restore
from bayesmeta.tasks import Classification, DenseGrid, GroundTruth, TaskBatch


@dataclass
class Run:
    """A run folder with its config, its method and the fitted parameters of its checkpoint."""

    path: Path
    setup: Setup
    result: FitResult

    @classmethod
    def open(cls, path: str | Path, overrides: Sequence[str] = ()) -> Run:
        """Load the run's config.toml (with `key=value` overrides, e.g. of [eval]) and checkpoint."""
        path = Path(path)
        _check_run_folder(path)
        cfg = load_config(path / "config.toml", list(overrides))
        with run_lock(path, "bayesmeta (Python API)"):
            setup, result = restore(cfg, path)
        return cls(path, setup, result)

    @property
    def cfg(self) -> Config:
        return self.setup.cfg

    @property
    def params(self) -> dict[str, Any]:
        return self.result.params

    def predict(
        self,
        x_support: Any,
        y_support: Any,
        x_query: Any,
        *,
        samples: int = 20,
        inner_steps: int | None = None,
        seed: int = 0,
    ) -> xr.DataTree:
        """Posterior predictive draws at x_query after adapting to one support set, as a DataTree:
        `posterior_predictive` holds y (draws of the observation) and f (the predictive mean of each
        draw: class probabilities for a classifier), as numpyro.infer.Predictive returns them, with
        dims (chain, draw, point[, output]); `constant_data` holds the inputs. inner_steps defaults
        to the last of eval.inner_steps."""
        fam, method = self.setup.eval_family, self.setup.eval_method
        classifier = isinstance(method.likelihood, Categorical)
        x_s = _array(x_support, "x_support", (None, fam.x_dim), np.float32)
        x_q = _array(x_query, "x_query", (None, fam.x_dim), np.float32)
        y_shape = (x_s.shape[0],) if classifier else (x_s.shape[0], fam.y_dim)
        y_s = _array(y_support, "y_support", y_shape, np.int32 if classifier else np.float32)
        if classifier and not ((y_s >= 0) & (y_s < fam.y_dim)).all():
            raise ValueError(f"y_support: class labels must lie in 0..{fam.y_dim - 1}")
        if samples < 1:
            raise ValueError(f"samples: expected an integer >= 1, got {samples}")
        steps = self.cfg.eval.inner_steps[-1] if inner_steps is None else inner_steps
        batch = TaskBatch(x_s[None], y_s[None], x_q[None], None, {})
        out = predictive(method, steps, samples, blown_up=self.cfg.eval.blown_up_draws)(
            self.params, batch, jax.random.PRNGKey(seed)
        )
        attrs = {"method": method.name, "inner_steps": steps, "samples": samples, "seed": seed}
        if "blown_up" in out:  # a method that checks its draws: how many blew up (before any rejection)
            attrs |= {
                "blown_up_draws": int(out.pop("blown_up").sum()),
                "blown_up_rule": self.cfg.eval.blown_up_draws,
            }
        return support_set_tree(
            {k: np.asarray(v[:, 0]) for k, v in out.items()}, x_s, y_s, x_q, classifier, attrs
        )

    def sample(
        self,
        x_support: Any = None,
        y_support: Any = None,
        x_query: Any = None,
        *,
        task_seed: int = 0,
        samples: int = 20,
        inner_steps: int | None = None,
        out: str | Path | None = None,
        source: str | None = None,
    ) -> list[Path]:
        """Draw `samples` posterior predictive functions for one support set (regression families) and
        write them to `out` (default RUN/samples) as sample_<n>.nc and .png, never overwriting earlier
        ones. The support set is the one given, or a task of the evaluation family drawn with
        `task_seed`; the inputs are x_query, else the family's grid (DenseGrid), else the task's own
        query inputs (or, for a given 1-D support set, its range widened by 1)."""
        fam = self.setup.eval_family
        if isinstance(fam, Classification):
            raise ConfigError(
                f"eval.task.family: sample draws functions of a regression family, and "
                f"{self.cfg.eval.task.family!r} is a classification family; predict with "
                "bayesmeta.open_run(run_dir).predict"
            )
        truth = None
        if x_support is None:
            task = fam.sample(jax.random.PRNGKey(task_seed), 1)
            x_s, y_s = np.asarray(task.x_support[0]), np.asarray(task.y_support[0])
            x = task.x_query if x_query is None else np.asarray(x_query, np.float32)[None]
            if x_query is None and isinstance(fam, DenseGrid):
                x = fam.grid(task.info, 200)
            if isinstance(fam, GroundTruth):
                truth = np.asarray(fam.truth(task.info, x)[0])
            x = np.asarray(x[0])
            source = source or f"{self.cfg.eval.task.family} task, seed {task_seed}"
        else:
            x_s = _array(x_support, "x_support", (None, fam.x_dim), np.float32)
            y_s = _array(y_support, "y_support", (x_s.shape[0], fam.y_dim), np.float32)
            x = None if x_query is None else _array(x_query, "x_query", (None, fam.x_dim), np.float32)
            if x is None and isinstance(fam, DenseGrid):  # the family's own input range
                x = np.asarray(fam.grid(fam.sample(jax.random.PRNGKey(0), 1).info, 200)[0])
            elif x is None and fam.x_dim == 1:
                x = np.linspace(float(x_s.min()) - 1, float(x_s.max()) + 1, 200, dtype=np.float32)[:, None]
            elif x is None:
                raise ConfigError(f"x_query: inputs have {fam.x_dim} dimensions; give the query inputs")
            source = source or "a given support set"
        steps = self.cfg.eval.inner_steps[-1] if inner_steps is None else inner_steps
        method = self.setup.eval_method
        rule = self.cfg.eval.blown_up_draws
        s = sampling.draw(
            method, self.params, x_s, y_s, x, samples, steps, jax.random.PRNGKey(0), truth, rule
        )
        title = f"{method.name}: {samples} posterior predictive functions ({source})"
        attrs = {"method": method.name, "support": source, "inner_steps": steps}
        if s.blown_up is not None:
            attrs |= {"blown_up_draws": s.blown_up, "blown_up_rule": rule}
            title += f"; {s.blown_up} blew up" + (", replaced" if rule == "reject" and s.blown_up else "")
        return sampling.save(s, Path(out) if out is not None else self.path / "samples", attrs, title)

    def evaluate(self, overrides: Sequence[str] = (), progress: bool = False) -> dict[str, Any]:
        """Re-evaluate on held-out tasks (overrides of [eval], e.g. "eval.tasks=100") and rewrite the
        run's metrics.json, inference.nc, summary.md and plots together; returns the metrics."""
        return evaluate(self.path, overrides, progress)


def open_run(path: str | Path, overrides: Sequence[str] = ()) -> Run:
    """Run.open: a fitted run folder, ready to predict, evaluate and sample."""
    return Run.open(path, overrides)


def evaluate(path: str | Path, overrides: Sequence[str] = (), progress: bool = False) -> dict[str, Any]:
    """Restore a run from its checkpoint and evaluate it, holding the folder's lock throughout."""
    path = Path(path)
    _check_run_folder(path)
    cfg = load_config(path / "config.toml", list(overrides))
    with run_lock(path, "bayesmeta evaluate"):
        setup, result = restore(cfg, path)
        return finish(setup, path, result, progress=progress)


def _check_run_folder(path: Path) -> None:
    if not (path / "config.toml").is_file():
        raise RunFolderError(
            f"{path} is not a run folder (it has no config.toml); give the folder bayesmeta fit wrote"
        )


def _array(value: Any, name: str, shape: tuple[int | None, ...], dtype: Any) -> np.ndarray:
    """`value` as a finite array of `shape` (None: any length), or a ValueError naming the argument."""
    a = np.asarray(value, dtype=dtype)
    if a.ndim == len(shape) - 1 and shape[-1] == 1:  # a vector of scalar inputs or targets
        a = a[..., None]
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape, strict=True)):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected an array of shape {want}, got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one point")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: holds NaN or infinite values")
    return a
