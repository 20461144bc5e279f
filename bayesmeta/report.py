"""Run outputs: the ArviZ DataTree (inference.nc), metrics.json, summary.md and PNG plots.

Plots and the summary are drawn from the saved files alone, so `bayesmeta report RUN_DIR` can redraw
them without JAX or the model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import arviz_base as az
import numpy as np
import numpyro
import xarray as xr

from bayesmeta.io import atomic_write, run_lock, write_json, write_text
from bayesmeta.likelihoods import SD_SITE
from bayesmeta.sections import CalibrationAt, Landscape, render_sections
from bayesmeta.sites import site_layout
from bayesmeta.stats import DOMINANCE
from bayesmeta.tables import markdown_table

INFERENCE = "inference.nc"
MAX_STORED_INPUTS = 5_000_000  # evaluation inputs kept in constant_data up to this many values


SAMPLE_DIMS = ["chain", "draw"]
STEPS = "test-time inner (adaptation) steps on the support set"
NO_DRAWS = (
    "no stochastic meta-parameters (they are in point_estimates); chain and draw index the predictive "
    "draws, as arviz_stats.loo reads them"
)
LAYOUT = (
    "posterior: draws of the stochastic meta-parameters (none when a method has none: then it only "
    "indexes the predictive draws); point_estimates: the meta-parameters held in numpyro.param. Every "
    "predictive variable has an inner_steps dim (test-time inner steps); observed_data y repeats the "
    "query targets along it. log_likelihood holds one variable y_steps_<s> per step count s: pick one "
    "for arviz_stats.loo / compare with var_name."
)
PAC_BAYES = {
    "bound": "PAC-Bayes bound (Yin et al. 2020, Theorem 1): with probability >= 1 - delta over the "
    "training tasks, the expected error on a new task of the clipped squared error min((y - f)^2 / clip, "
    "1) (the 0-1 error for classifiers) is at most this; the loss lies in [0, 1], so a bound above 1 is "
    "vacuous (certifies nothing)",
    "empirical_error": "Gibbs error (averaged over q) on the training tasks the fit saw",
    "empirical_error_se": "standard error of empirical_error when it is estimated on a uniform sample "
    "of the training tasks (0 when all of them are used)",
    "empirical_tasks": "training tasks the empirical error is computed on",
    "complexity": "(sqrt(1/(2(k-1))) + sqrt(1/(2(n-1)))) sqrt(kl + log(n(k+1)/delta))",
    "kl": "KL(q || prior) of the stochastic meta-parameters",
    "n": "meta-training tasks (train.steps x train.meta_batch)",
    "k": "query points per task",
    "delta": "the bound fails with probability at most delta",
    "clip": "c in the clipped regression loss min((y - f)^2 / c, 1) (1 for classifiers)",
    "implied_beta": "KL weight beta the bound implies (its first-order expansion)",
    "beta": "KL weight beta used in training",
}


def described(ds: xr.Dataset, attrs: dict[str, dict[str, Any]]) -> xr.Dataset:
    """`ds` with the attrs (description, units, ...) of each of its variables named in `attrs`."""
    for name, a in attrs.items():
        if name in ds.variables:
            ds[name].attrs.update(a)
    return ds


def sites_dataset(values: dict[str, np.ndarray], what: str, sample_dims: list[str]) -> xr.Dataset:
    """Parameter or latent sites as ArviZ variables: dots replaced, dims named from each site's role
    (sites.site_layout), `what` they are in the description; `sample_dims` lead every array."""
    layouts = {k: site_layout(k, np.ndim(v) - len(sample_dims)) for k, v in values.items()}
    ds = az.dict_to_dataset(
        {lay.name: values[k] for k, lay in layouts.items()},
        dims={lay.name: lay.dims for lay in layouts.values()},
        sample_dims=sample_dims,
        inference_library=numpyro,
    )
    if len(ds.data_vars) < len(values):
        raise ValueError(f"sites {sorted(values)} do not map to distinct variable names")
    return described(
        ds, {lay.name: {"description": f"{what}: {lay.description}", "site": k} for k, lay in layouts.items()}
    )


def input_coords(x: np.ndarray, dims: tuple[str, ...]) -> dict[str, Any]:
    """x (..., 1) as the coordinate "x" over `dims` (1-D inputs only: wider inputs stay in constant data)."""
    if x.shape[-1] != 1:
        return {}
    return {"x": xr.Variable(dims, x[..., 0], {"description": "input x of each point"})}


def predictive_groups(
    draws: dict[int, dict[str, np.ndarray]],
    log_likelihood: dict[int, np.ndarray],
    tasks: Any,
    inner_steps: list[int],
    store_inputs: bool,
) -> dict[str, xr.Dataset]:
    """posterior_predictive (y, f, and a heteroscedastic likelihood's y_sd), observed_data (y),
    log_likelihood (y_steps_<s>) and constant_data on the evaluation tasks, y and f aligned on
    (inner_steps, task, point, output | class)."""
    classifier = np.ndim(tasks.y_query) == 2  # labels (task, point); regression targets have an output axis
    out = [] if classifier else ["output"]
    dims = {
        "y": ["inner_steps", "task", "point", *out],
        "f": ["inner_steps", "task", "point", "class" if classifier else "output"],
        SD_SITE: ["inner_steps", "task", "point", "output"],
        **{f"y_steps_{s}": ["task", "point"] for s in inner_steps},
        "y_support": ["task", "support", *out],
        "x_support": ["task", "support", "input"],
        "x_query": ["task", "point", "input"],
    }
    y_query = np.asarray(tasks.y_query)
    constant = {"y_support": np.asarray(tasks.y_support)}
    if store_inputs:
        constant |= {"x_support": np.asarray(tasks.x_support), "x_query": np.asarray(tasks.x_query)}
    data = {
        "posterior_predictive": {
            site: np.stack([draws[s][site] for s in inner_steps], 1)[None] for site in draws[inner_steps[0]]
        },
        "observed_data": {"y": np.broadcast_to(y_query, (len(inner_steps), *y_query.shape))},
        "log_likelihood": {f"y_steps_{s}": log_likelihood[s][None] for s in inner_steps},
        "constant_data": constant,
    }
    x = input_coords(np.asarray(tasks.x_query), ("task", "point")) if store_inputs else {}
    target = "class label" if classifier else "target"
    about = {
        "y": f"posterior predictive draw of the query {target} y* given the task's support set (query "
        "labels withheld)",
        "f": "class probabilities (softmax of the network output) under each draw"
        if classifier
        else "predictive mean of y* under each draw (the network output)",
        SD_SITE: "sd of y* at each point under each draw (the heteroscedastic head, model.noise)",
        "inner_steps": STEPS,
        "y_support": "support-set targets each task adapts to",
        "x_support": "support-set inputs",
        "x_query": "query inputs x*",
    }
    observed_about = f"observed query {target} y*, repeated along inner_steps as posterior_predictive y"
    loglik_about = {
        f"y_steps_{s}": {
            "description": f"pointwise log p(y* | f) of the observed query {target} under each predictive "
            f"draw after {s} test-time inner steps (the query points are held out of the adaptation)",
            "units": "nats",
            "inner_steps": s,
        }
        for s in inner_steps
    }
    groups = {}
    for group, values in data.items():
        sampled = group in ("posterior_predictive", "log_likelihood")
        ds = az.dict_to_dataset(
            values,
            dims=dims,
            coords={"inner_steps": inner_steps},
            sample_dims=SAMPLE_DIMS if sampled else [],
            inference_library=numpyro if sampled else None,
        )
        if group != "constant_data":
            ds = ds.assign_coords(x)
        attrs = {k: {"description": v} for k, v in about.items()} | loglik_about
        if group == "observed_data":
            attrs["y"] = {"description": observed_about}
        groups[group] = described(ds, attrs)
    return groups


def grid_groups(grid: dict[str, Any], inner_steps: list[int]) -> dict[str, xr.Dataset]:
    """predictions (predictive means on a dense input grid of the plotted tasks, x as coordinate) and
    predictions_constant_data (the grid and the true function)."""
    f = np.stack([grid["f"][s] for s in inner_steps], 1)[None]
    pred = az.dict_to_dataset(
        {"f": f},
        dims={"f": ["inner_steps", "plot_task", "grid", "output"]},
        coords={"inner_steps": inner_steps},
        sample_dims=SAMPLE_DIMS,
        inference_library=numpyro,
    ).assign_coords(input_coords(grid["x"], ("plot_task", "grid")))
    const = az.dict_to_dataset(
        {"x": grid["x"], "truth": grid["truth"]},
        dims={"x": ["plot_task", "grid", "input"], "truth": ["plot_task", "grid", "output"]},
        sample_dims=[],
    )
    return {
        "predictions": described(
            pred,
            {
                "f": {
                    "description": "predictive mean on a dense input grid of the first eval.plot_tasks "
                    "evaluation tasks, per draw, after adapting to the task's support set"
                },
                "inner_steps": {"description": STEPS},
            },
        ),
        "predictions_constant_data": described(
            const,
            {
                "x": {"description": "dense grid of inputs"},
                "truth": {"description": "the task's true (noise-free) function on the grid"},
            },
        ),
    }


def trace_dataset(trace: Any) -> xr.Dataset:
    """The training record: loss per step, held-out metrics per eval step, landscape diagnostics."""
    stats = xr.Dataset(
        {"loss": ("step", np.asarray(trace.loss, np.float32))},
        coords={"step": np.arange(1, len(trace.loss) + 1)},
    )
    stats["loss"].attrs.update(
        description="SVI loss per training step: the negative ELBO, scaled to a mean over tasks and query "
        "points (KL terms weighted as in training)",
        units="nats per query point",
    )
    for k, v in trace.eval.items():
        stats[f"eval_{k}"] = xr.DataArray(
            np.asarray(v),
            dims="eval_step",
            coords={"eval_step": trace.eval_step},
            attrs={"description": f"held-out {k} during training (train.eval_tasks tasks, one draw)"},
        )
    for k, v in trace.diagnostics.items():
        what = f"held-out {k[5:]}" if k.startswith("test_") else f"landscape diagnostic {k}"
        stats[f"diag_{k}"] = xr.DataArray(
            np.asarray(v),
            dims="diagnostics_step",
            coords={"diagnostics_step": trace.diagnostics_step},
            attrs={"description": f"{what} on train.diagnostics_tasks held-out tasks"},
        )
    return stats


def bound_dataset(pac: dict[str, Any]) -> xr.Dataset:
    """The PAC-Bayes bound's numbers as scalars with their meaning; flags and missing values (vacuous,
    an unset beta) as JSON attrs of the group."""
    numbers = {k: v for k, v in pac.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ds = xr.Dataset({k: ((), v, {"description": PAC_BAYES[k]}) for k, v in numbers.items()})
    ds["bound"].attrs.update(delta=pac["delta"], vacuous_above=1.0, vacuous=str(pac["vacuous"]).lower())
    ds["kl"].attrs["units"] = "nats"
    ds.attrs.update({k: json.dumps(v) for k, v in pac.items() if k not in numbers})
    return ds


def ppc_view(dt: xr.DataTree, inner_steps: int, var: str = "y") -> xr.DataTree:
    """The posterior predictive and observed `var` of a run's inference.nc at one test-time step count,
    with task x point x output flattened to one dim "obs": the layout arviz-plots' plot_ppc_pit needs
    (its Pareto-smoothed PIT takes one observation dim), e.g. azp.plot_ppc_pit(ppc_view(dt, 5))."""

    def flat(ds: xr.Dataset) -> xr.Dataset:
        da = ds[var].sel(inner_steps=inner_steps)
        obs = [d for d in da.dims if d not in SAMPLE_DIMS]
        da = da.drop_vars([c for c in da.coords if c not in SAMPLE_DIMS])
        return da.stack(obs=obs).drop_vars(["obs", *obs], errors="ignore").to_dataset(name=var)

    return xr.DataTree.from_dict(
        {
            "posterior_predictive": flat(dt["posterior_predictive"].to_dataset()),
            "observed_data": flat(dt["observed_data"].to_dataset()),
        }
    )


def build_datatree(
    *,
    posterior: dict[str, np.ndarray],
    point_estimates: dict[str, np.ndarray],
    draws: dict[int, dict[str, np.ndarray]],
    log_likelihood: dict[int, np.ndarray],
    tasks: Any,
    grid: dict[str, Any] | None,
    trace: Any,
    attrs: dict[str, Any],
    inner_steps: list[int],
    groups: dict[str, xr.Dataset] | None = None,
) -> xr.DataTree:
    """The run's ArviZ DataTree: posterior (draws (S, ...) of the stochastic meta-parameters; without
    any, no variables and the predictive draws' chain and draw, which arviz_stats.loo reads),
    point_estimates (the numpyro.param meta-parameters), the predictive groups on the evaluation tasks
    (predictive_groups), predictions on a dense grid (grid_groups), sample_stats (training trace) and
    the groups the diagnostic sections contribute (bayesmeta.sections: e.g. pac_bayes). Every variable
    has a description attr."""
    inputs = np.size(tasks.x_support) + np.size(tasks.x_query)
    store_inputs = inputs <= MAX_STORED_INPUTS  # images are regenerated from eval.seed instead of stored
    if not store_inputs:
        attrs = {**attrs, "inputs_not_stored": f"{inputs} input values; regenerate them from eval.seed"}
    samples = len(next(iter(draws.values()))["f"])
    groups = {
        "posterior": sites_dataset(
            {k: np.asarray(v)[None] for k, v in posterior.items()},
            "draw from the variational posterior q of a stochastic meta-parameter",
            SAMPLE_DIMS,
        )
        if posterior
        else xr.Dataset(coords={"chain": [0], "draw": np.arange(samples)}, attrs={"description": NO_DRAWS}),
        "point_estimates": sites_dataset(
            point_estimates, "point estimate (numpyro.param, fitted by SVI) of a meta-parameter", []
        ),
        **predictive_groups(draws, log_likelihood, tasks, inner_steps, store_inputs),
        **(grid_groups(grid, inner_steps) if grid is not None else {}),
        "sample_stats": trace_dataset(trace),
        **(groups or {}),
    }
    dt = xr.DataTree.from_dict(groups)
    dt.attrs.update({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in attrs.items()})
    dt.attrs["layout"] = LAYOUT
    return dt


def support_set_tree(
    draws: dict[str, np.ndarray],
    x_support: np.ndarray,
    y_support: np.ndarray,
    x_query: np.ndarray,
    classifier: bool,
    attrs: dict[str, Any],
    truth: np.ndarray | None = None,
) -> xr.DataTree:
    """Predictive draws (S, n, ...) per site at x_query after adapting to one support set, in ArviZ's
    layout (one chain): posterior_predictive y (a label per point for a classifier, else outputs) and f
    (class probabilities or the predictive mean), x as coordinate for 1-D inputs; constant_data the
    inputs, the support targets and, when known, the true function at x_query."""
    out = "class" if classifier else "output"
    dims = {
        "y": ["point", *([] if classifier else ["output"])],
        "f": ["point", out],
        "x_query": ["point", "input"],
        "x_support": ["support", "input"],
        "y_support": ["support", *([] if classifier else ["output"])],
        "truth": ["point", "output"],
    }
    pp = az.dict_to_dataset(
        {k: v[None] for k, v in draws.items()}, dims=dims, sample_dims=SAMPLE_DIMS, inference_library=numpyro
    ).assign_coords(input_coords(x_query, ("point",)))
    const = {"x_query": x_query, "x_support": x_support, "y_support": y_support}
    if truth is not None:
        const["truth"] = truth
    about = {
        "y": "posterior predictive draw of y at the query inputs given the support set",
        "f": "class probabilities under each draw" if classifier else "predictive mean of y under each draw",
        "x_query": "query inputs",
        "x_support": "support-set inputs",
        "y_support": "support-set targets the prediction adapts to",
        "truth": "the task's true (noise-free) function at the query inputs",
    }
    attrs_of = {k: {"description": v} for k, v in about.items()}
    dt = xr.DataTree.from_dict(
        {
            "posterior_predictive": described(pp, attrs_of),
            "constant_data": described(az.dict_to_dataset(const, dims=dims, sample_dims=[]), attrs_of),
        }
    )
    dt.attrs.update(attrs)
    return dt


def save_datatree(dt: xr.DataTree, path: Path) -> Path:
    """Atomic netCDF write (h5netcdf) of the whole tree."""

    def write(f: Any) -> None:
        f.write(dt.to_netcdf(engine="h5netcdf"))

    return atomic_write(path, write)


class RunFileError(ValueError):
    """A run folder's inference.nc or metrics.json that is missing, truncated or not what a run writes;
    the message is one line naming the file and how to re-create it."""


METRICS = "metrics.json"
REQUIRED_METRICS = {
    "name": (str,),
    "method": (str,),
    "family": (str,),
    "eval_family": (str,),
    "seed": (int,),
    "steps": (int,),
    "train_seconds": (int, float),
    "eval_seconds": (int, float),
    "eval_tasks": (int,),
    "final_loss": (int, float),
    "metrics": (dict,),
}
"""The entries of metrics.json the summary is written from, with their JSON types."""
JSON_TYPES = {(str,): "a string", (int,): "an integer", (int, float): "a number", (dict,): "an object"}
METRIC_ENTRY = {
    "mean": True,
    "ci95": True,
    "median": True,
    "n": False,
    "n_diverged": False,
    "max_share": False,
}
"""Per held-out metric: its fields, and whether null (a diverged task) is allowed."""


def _redo(run_dir: Path) -> str:
    return f"re-create it with `bayesmeta evaluate {run_dir}`"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def load_datatree(run_dir: Path) -> xr.DataTree:
    """inference.nc as a loaded DataTree; missing, truncated or foreign files are a RunFileError."""
    path = Path(run_dir) / INFERENCE
    if not path.is_file():
        raise RunFileError(f"{path}: no inference file; run `bayesmeta evaluate {run_dir}`")
    try:
        with xr.open_datatree(path, engine="h5netcdf") as dt:
            dt = dt.load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        # h5py/h5netcdf report a truncated or foreign file as one of these
        raise RunFileError(f"{path}: not a readable netCDF file ({_one_line(e)}); {_redo(run_dir)}") from None
    stats = dt["sample_stats"].to_dataset() if "sample_stats" in dt.children else None
    if stats is None or "loss" not in stats.data_vars:
        raise RunFileError(f"{path}: has no sample_stats group with the training loss; {_redo(run_dir)}")
    if "predictions" in dt.children and not {"predictions_constant_data", "constant_data"} <= set(
        dt.children
    ):
        raise RunFileError(f"{path}: predictions without their constant data; {_redo(run_dir)}")
    return dt


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json, checked to hold what the summary is written from (one line naming the entry)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise RunFileError(
            f"{run_dir}: no {METRICS}, so the run was not evaluated yet: run `bayesmeta evaluate {run_dir}`"
        )
    try:
        metrics = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunFileError(f"{path}: not UTF-8 text (byte {e.start}); {_redo(run_dir)}") from None
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path}: not valid JSON ({_one_line(e)}); {_redo(run_dir)}") from None
    except (OSError, RecursionError) as e:
        raise RunFileError(f"{path}: unreadable ({_one_line(e)}); {_redo(run_dir)}") from None
    if not isinstance(metrics, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(metrics).__name__}; {_redo(run_dir)}")
    for key, types in REQUIRED_METRICS.items():
        v = metrics.get(key)
        if isinstance(v, bool) or not isinstance(v, types):
            raise RunFileError(f"{path}: entry {key!r} missing or not {JSON_TYPES[types]}; {_redo(run_dir)}")
    for name, entry in metrics["metrics"].items():
        for field, nullable in METRIC_ENTRY.items():
            present = isinstance(entry, dict) and field in entry
            v = entry[field] if present else None
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not present or not (number or (nullable and v is None)):
                raise RunFileError(
                    f"{path}: metrics.{name}.{field} missing or not a number; {_redo(run_dir)}"
                )
    return metrics


def save_fig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_training(dt: xr.DataTree, path: Path) -> Path:
    """Training loss per step (light) with its moving average, and held-out metrics per eval step."""
    import matplotlib.pyplot as plt

    stats = dt["sample_stats"].to_dataset()
    evals = [k for k in stats.data_vars if k.startswith("eval_")]
    fig, axes = plt.subplots(1, 1 + bool(evals), figsize=(5.5 * (1 + bool(evals)), 3.6), squeeze=False)
    loss = stats["loss"].values
    ax = axes[0, 0]
    ax.plot(stats["step"].values, loss, color="0.8", lw=0.5, label="per step")
    w = max(1, len(loss) // 100)
    if len(loss) >= w:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(stats["step"].values[w - 1 :], smooth, color="C0", label=f"mean of {w}")
    ax.set(xlabel="step", ylabel="SVI loss (negative scaled ELBO)", title="training")
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.legend()
    if evals:
        ax = axes[0, 1]
        for k in evals:
            ax.plot(stats["eval_step"].values, stats[k].values, marker="o", ms=3, label=k[5:])
        ax.set(xlabel="step", title="held-out tasks")
        ax.legend()
    return save_fig(fig, path)


def plot_predictions(dt: xr.DataTree, path: Path) -> Path | None:
    """Adapted predictions against the true function and the support points on test tasks (1-D x): the
    mean of the predictive draws of f and, with several draws, their central 90% band."""
    if "predictions" not in dt.children:
        return None
    import matplotlib.pyplot as plt

    pred = dt["predictions"]["f"]
    const = dt["predictions_constant_data"]
    x = const["x"].values[..., 0]
    n = x.shape[0]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False, sharex=True)
    xs = dt["constant_data"]["x_support"].values[:n, :, 0]
    ys = dt["constant_data"]["y_support"].values[:n, :, 0]
    steps = pred["inner_steps"].values
    for t, ax in enumerate(axes.flat):
        if t >= n:
            ax.axis("off")
            continue
        ax.plot(x[t], const["truth"].values[t, :, 0], color="k", lw=1.2, label="truth")
        for j, s in enumerate(steps):
            draws = pred.values[:, :, j, t, :, 0].reshape(-1, x.shape[1])
            ax.plot(x[t], draws.mean(0), color=f"C{j}", lw=1.2, label=f"{s} steps")
            if draws.shape[0] > 1:
                lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
                ax.fill_between(x[t], lo, hi, color=f"C{j}", alpha=0.2, label=f"90% of f draws, {s} steps")
        ax.scatter(xs[t], ys[t], color="C3", s=14, zorder=3, label="support")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{dt.attrs.get('method', '')}: adapted predictions on test tasks")
    return save_fig(fig, path)


def plot_landscape(landscape: Landscape, path: Path) -> Path:
    """Each landscape metric over training beside the held-out metric (twin axis), titled with r."""
    import matplotlib.pyplot as plt

    names = list(landscape.correlation)
    test = landscape.test_metric
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    step = landscape.step
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(step, np.array(landscape.values[name], dtype=float), marker="o", ms=3, color="C0")
        ax.set_ylabel(name, color="C0", fontsize=8)
        twin = ax.twinx()
        test_values = np.array(landscape.values["test_" + test], dtype=float)
        twin.plot(step, test_values, marker="s", ms=3, color="C3", ls="--")
        twin.set_ylabel(test, color="C3", fontsize=8)
        r = landscape.correlation[name]
        ax.set(xlabel="step", title=f"{name}: r = {r:.3f}" if r is not None else f"{name}: r undefined")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"landscape diagnostics (held-out tasks) against held-out {test}")
    fig.tight_layout()
    return save_fig(fig, path)


def plot_calibration(calib: dict[int, CalibrationAt], path: Path) -> Path:
    """Empirical against nominal coverage of central predictive intervals, per test-time step count."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", label="calibrated")
    for j, (steps, entry) in enumerate(calib.items()):
        ax.plot(
            list(entry.coverage),
            list(entry.coverage.values()),
            marker="o",
            color=f"C{j}",
            label=f"{steps} steps",
        )
    ax.set(xlabel="nominal coverage", ylabel="empirical coverage", title="central intervals")
    ax.legend()
    return save_fig(fig, path)


def plot_pit(calib: dict[int, CalibrationAt], path: Path) -> Path:
    """ArviZ's PIT Delta-ECDF (arviz_plots.plot_ecdf_pit) of the PIT values F(y), one panel per
    test-time step count: the ECDF minus the uniform CDF, with ArviZ's default "pot_c" uniformity test
    (its p-value, and the points that drive a departure highlighted), which holds for dependent PIT
    values such as the query points of one task (the simultaneous-band "envelope" assumes independence)."""
    import arviz_plots as azp

    pits = xr.Dataset({f"{s} steps": (f"pit_{s}", np.asarray(e.pit, np.float64)) for s, e in calib.items()})
    pc = azp.plot_ecdf_pit(
        xr.DataTree.from_dict({"pit": pits}),
        group="pit",
        sample_dims=list(pits.dims),
        backend="matplotlib",
        visuals={"ylabel": {"text": "ECDF - uniform CDF"}},
    )
    return save_fig(pc.viz["figure"].item(), path)


def draw_reliability(ax: Any, ax_share: Any, diagram: dict[str, Any]) -> None:
    """A reliability diagram on ax (accuracy against confidence per bin of diagnostics.calibration.
    expected_calibration_error, bar widths the bins, the diagonal for calibration) and below it, on
    ax_share, each bin's share of the predictions (log scale, Guo et al. 2017's confidence histogram),
    so that a bar resting on a handful of predictions reads as such."""
    edges, count = np.asarray(diagram["edges"]), np.asarray(diagram["count"])
    used = count > 0
    left, width = edges[:-1][used], np.diff(edges)[used]
    acc = np.asarray(diagram["accuracy"], dtype=float)[used]
    ax.bar(left, acc, width=width, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax_share.bar(left, count[used] / count.sum(), width=width, align="edge", color="0.6", edgecolor="k")
    ax_share.set(yscale="log", xlim=(0, 1), xlabel="confidence")


def reliability_axes(columns: int, width: float, height: float) -> tuple[Any, Any]:
    """(figure, axes (2, columns)): per column a reliability panel over a shorter share panel."""
    import matplotlib.pyplot as plt

    return plt.subplots(
        2,
        columns,
        figsize=(width * columns, height),
        squeeze=False,
        sharex="col",
        gridspec_kw={"height_ratios": [3, 1]},
    )


def plot_reliability(diagram: dict[str, Any], ece: float, path: Path) -> Path:
    """Reliability diagram of a classifier with its ECE, and the share of predictions per bin."""
    fig, axes = reliability_axes(1, 4.5, 5.4)
    draw_reliability(axes[0][0], axes[1][0], diagram)
    axes[0][0].set(ylabel="accuracy", title=f"reliability (ECE {ece:.3f})")
    axes[1][0].set_ylabel("share")
    axes[0][0].legend()
    return save_fig(fig, path)


def posterior_table(dt: xr.DataTree) -> str:
    """Per stochastic meta-parameter: size, mean |posterior mean| and the posterior sd's mean and range."""
    post = dt["posterior"].to_dataset()
    rows = []
    for name, da in post.data_vars.items():
        mean, sd = da.mean(("chain", "draw")), da.std(("chain", "draw"))
        rows.append(
            [
                name,
                mean.size,
                f"{float(abs(mean).mean()):.4g}",
                f"{float(sd.mean()):.3g}",
                f"{float(sd.min()):.3g} .. {float(sd.max()):.3g}",
            ]
        )
    return markdown_table(["parameter", "size", "mean abs(mean)", "mean sd", "sd range"], rows) + "\n"


def write_posterior_summary(dt: xr.DataTree, path: Path) -> Path:
    """arviz_stats.summary of the posterior draws (mean, sd, 89% ETI per weight) as CSV."""
    from arviz_stats import summary

    table = summary(dt, group="posterior", kind="stats", round_to="none")
    return atomic_write(path, lambda f: f.write(table.to_csv().encode()))


def metric_line(v: dict) -> str:
    """One metric over tasks in words: the mean over the tasks that did not diverge with its 95% CI,
    the diverged count and the median; a mean that one task dominates is not headlined."""
    median = "n/a" if v["median"] is None else f"{v['median']:.4f}"
    if v["mean"] is None:
        return f"diverged on {v['n_diverged']} of {v['n']} tasks; median {median}"
    diverged = f"; {v['n_diverged']} of {v['n']} tasks diverged (left out)" if v["n_diverged"] else ""
    if v.get("dominated"):
        return (
            f"median {median}; the mean over tasks ({v['mean']:.4g}) is dominated by one task "
            f"({v['max_share']:.0%} of the sum){diverged}"
        )
    return f"{v['mean']:.4f} ± {v['ci95']:.4f} (95% CI over {v['n'] - v['n_diverged']} tasks){diverged}"


def summary_markdown(
    metrics: dict[str, Any], files: list[str], sections: str = "", posterior: str = ""
) -> str:
    rows = markdown_table(
        ["metric", "over tasks"], [[k, metric_line(v)] for k, v in metrics["metrics"].items()]
    )
    text = (
        f"# Run `{metrics['name']}`\n\n"
        f"Method **{metrics['method']}** on task family **{metrics['family']}** "
        f"(evaluation: {metrics['eval_family']}), seed {metrics['seed']}, "
        f"{metrics['steps']} meta-training steps in {metrics['train_seconds']:.1f} s; "
        f"evaluation of {metrics['eval_tasks']} tasks in {metrics['eval_seconds']:.1f} s.\n\n"
        "## Held-out tasks (metric@test-time inner steps)\n\n"
        f"{rows}\n\n"
        "A task diverged when its adapted support loss ended above its value before adaptation, or "
        "is not finite (a method without an inner loop adapts nothing: when its predictions are not finite); "
        "the mean and its 95% CI are over the other tasks, the median over all of them "
        f"(metrics.json: `mean`, `ci95`, `n_diverged`, `median`, `mean_all`). A mean whose largest "
        f"task carries more than {DOMINANCE:.0%} of the sum is reported by its median.\n\n"
    )
    if posterior:
        text += (
            "## Posterior of the stochastic meta-parameters\n\nFrom the draws in inference.nc "
            "(per-weight ArviZ summary in posterior_summary.csv):\n\n" + posterior + "\n"
        )
    text += sections
    return text + (
        f"Final training loss (mean of the last 100 steps): {metrics['final_loss']:.4f}\n\n"
        "## Files\n\n" + "\n".join(f"- `{f}`" for f in files) + "\n"
    )


def write_report(
    run_dir: Path, dt: xr.DataTree | None = None, metrics: dict[str, Any] | None = None
) -> list[Path]:
    """(Re)write summary.md and plots from the run's files (or the given tree and metrics); a redraw
    from the files takes the run folder's lock (run.finish holds it when it passes the tree)."""
    run_dir = Path(run_dir)
    if dt is not None and metrics is not None:  # from run.finish, which holds the lock, into its staging
        write_json(run_dir / METRICS, metrics)
        return _write_report(run_dir, dt, metrics)
    with run_lock(run_dir, "bayesmeta report"):  # a redraw from the run's files
        if metrics is not None:
            write_json(run_dir / METRICS, metrics)
        dt = load_datatree(run_dir) if dt is None else dt
        metrics = read_metrics(run_dir) if metrics is None else metrics
        try:
            return _write_report(run_dir, dt, metrics)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # what they hold was not made here
            raise RunFileError(
                f"{run_dir}: {INFERENCE} or {METRICS} does not hold what a run writes "
                f"({type(e).__name__}: {_one_line(e)}); {_redo(run_dir)}"
            ) from None


def _write_report(run_dir: Path, dt: xr.DataTree, metrics: dict[str, Any]) -> list[Path]:
    """summary.md and the plots from a loaded tree and metrics."""
    plots = [
        plot_training(dt, run_dir / "plots" / "training.png"),
        plot_predictions(dt, run_dir / "plots" / "predictions.png"),
    ]
    files = [INFERENCE, "metrics.json", "summary.md", "config.toml", "checkpoint/state.npz"]
    files += [str(p.relative_to(run_dir)) for p in plots if p is not None]
    sections, section_plots = render_sections(metrics, run_dir)
    plots += section_plots
    files += [str(p.relative_to(run_dir)) for p in section_plots]
    posterior = ""
    if "posterior" in dt.children and dt["posterior"].data_vars:  # draws of stochastic meta-parameters
        plots.append(write_posterior_summary(dt, run_dir / "posterior_summary.csv"))
        files.append("posterior_summary.csv")
        posterior = posterior_table(dt)
    summary = write_text(run_dir / "summary.md", summary_markdown(metrics, files, sections, posterior))
    return [summary, *[p for p in plots if p is not None]]
