"""Posterior predictive sampling for one support set: from a CSV/NPZ file or a task of the run's family.

Draws S functions by numpyro.infer.Predictive (adapting to the support set each time), writes them to
an ArviZ DataTree (posterior_predictive, constant_data) and a PNG of the sampled functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from bayesmeta.io import atomic_write
from bayesmeta.predict import predictive
from bayesmeta.report import save_fig
from bayesmeta.tasks import TaskBatch


class SupportFileError(ValueError):
    """A support or query file that is missing, unreadable or of the wrong shape."""


def _read_array(path: Path, what: str, width: int) -> np.ndarray:
    """Rows of `width` numbers from CSV (optional header) or NPZ; x-only files have width x_dim."""
    if not path.is_file():
        raise SupportFileError(f"{what} file {path}: not found")
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                if what == "query":
                    if "x" not in z.files:
                        raise SupportFileError(f"query file {path}: expected an array named x, got {z.files}")
                    arr = np.asarray(z["x"], np.float32)
                else:
                    if not {"x", "y"} <= set(z.files):
                        raise SupportFileError(f"support file {path}: expected arrays x and y, got {z.files}")
                    x, y = (np.asarray(z[k], np.float32) for k in ("x", "y"))
                    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
                    if len(x) != len(y):
                        raise SupportFileError(f"support file {path}: x has {len(x)} rows, y has {len(y)}")
                    arr = np.concatenate([x, y], 1)
        else:
            text = path.read_text().strip().splitlines()
            if text and any(c.isalpha() for c in text[0].replace("e", "").replace("E", "")):
                text = text[1:]  # a header
            arr = np.array(
                [[float(v) for v in line.replace(";", ",").split(",")] for line in text if line], np.float32
            )
    except SupportFileError:
        raise
    except (ValueError, OSError) as e:
        raise SupportFileError(f"{what} file {path}: unreadable ({e})") from None
    arr = arr.reshape(len(arr), -1) if arr.size else arr.reshape(0, width)
    if arr.ndim != 2 or arr.shape[1] != width or len(arr) == 0:
        cols = "x" if what == "query" else "x, y"
        raise SupportFileError(
            f"{what} file {path}: expected shape (K, {width}) with K >= 1 ({cols}: {width} numbers per row), "
            f"got {arr.shape}"
        )
    return arr


def read_support(path: Path, x_dim: int, y_dim: int) -> tuple[np.ndarray, np.ndarray]:
    arr = _read_array(Path(path), "support", x_dim + y_dim)
    return arr[:, :x_dim], arr[:, x_dim:]


def read_query(path: Path, x_dim: int) -> np.ndarray:
    return _read_array(Path(path), "query", x_dim)


@dataclass
class Samples:
    x_support: np.ndarray  # (K, x_dim)
    y_support: np.ndarray  # (K, y_dim)
    x: np.ndarray  # (G, x_dim)
    f: np.ndarray  # (S, G, y_dim) sampled functions
    y: np.ndarray  # (S, G, y_dim) posterior predictive draws of y
    truth: np.ndarray | None = None  # (G, y_dim) when the task came from a family


def draw(
    method: object,
    params: dict,
    x_s: np.ndarray,
    y_s: np.ndarray,
    x: np.ndarray,
    n_samples: int,
    inner_steps: int,
    key: jax.Array,
    truth: np.ndarray | None = None,
) -> Samples:
    """S posterior predictive functions at inputs x after adapting to (x_s, y_s)."""
    batch = TaskBatch(jnp.asarray(x_s)[None], jnp.asarray(y_s)[None], jnp.asarray(x)[None], None, {})
    out = predictive(method, inner_steps, n_samples)(params, batch, key)
    return Samples(x_s, y_s, x, np.asarray(out["f"][:, 0]), np.asarray(out["y"][:, 0]), truth)


def to_datatree(s: Samples, attrs: dict) -> xr.DataTree:
    pp = xr.Dataset(
        {
            "f": (("chain", "draw", "point", "output"), s.f[None]),
            "y": (("chain", "draw", "point", "output"), s.y[None]),
        }
    )
    const = {
        "x": (("point", "input"), s.x),
        "x_support": (("support", "input"), s.x_support),
        "y_support": (("support", "output"), s.y_support),
    }
    if s.truth is not None:
        const["truth"] = (("point", "output"), s.truth)
    dt = xr.DataTree.from_dict({"posterior_predictive": pp, "constant_data": xr.Dataset(const)})
    dt.attrs.update(attrs)
    return dt


def plot(s: Samples, path: Path, title: str) -> Path:
    """The sampled functions (thin), their mean, the support points and, if known, the truth."""
    import matplotlib.pyplot as plt

    order = np.argsort(s.x[:, 0])
    x = s.x[order, 0]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for f in s.f[:, order, 0]:
        ax.plot(x, f, color="C0", alpha=min(1.0, 8 / len(s.f)), lw=0.8)
    ax.plot(x, s.f[:, order, 0].mean(0), color="C0", lw=2, label=f"mean of {len(s.f)} sampled functions")
    if s.truth is not None:
        ax.plot(x, s.truth[order, 0], color="k", ls="--", lw=1.2, label="truth")
    ax.scatter(s.x_support[:, 0], s.y_support[:, 0], color="C3", zorder=3, label="support")
    ax.set(xlabel="x" if s.x.shape[1] == 1 else "x[0]", ylabel="y", title=title)
    ax.legend(fontsize=8)
    return save_fig(fig, path)


def save(s: Samples, out_dir: Path, attrs: dict, title: str) -> list[Path]:
    dt = to_datatree(s, attrs)
    nc = atomic_write(out_dir / "samples.nc", lambda f: f.write(dt.to_netcdf(engine="h5netcdf")))
    return [nc, plot(s, out_dir / "samples.png", title)]
