"""Posterior predictive sampling for one support set: from a CSV/NPZ file or a task of the run's family.

Draws S functions by numpyro.infer.Predictive (adapting to the support set each time), writes them to
an ArviZ DataTree (posterior_predictive, constant_data) and a PNG of the sampled functions, under a new
numbered name per call.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.io import write_new
from bayesmeta.predict import predictive
from bayesmeta.report import save_fig, support_set_tree
from bayesmeta.tasks import TaskBatch

MAX_ABS_VALUE = 1e6
"""Largest |value| accepted in support and query files: the float32 training data of meta-learners live
at O(1)-O(100), and values far beyond that overflow the inner loop's squared loss (NaN samples)."""
MAX_FILE_BYTES = 10_000_000
"""Largest support/query file read: a support set is a few (K <= ~1000) rows; a larger file is a mistake
and is refused before it is read into memory."""


class SupportFileError(ValueError):
    """A support or query file that is missing, unreadable or of the wrong shape."""


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _parse_csv(path: Path, what: str) -> tuple[np.ndarray, list[int]]:
    """Rows of numbers and their 1-based line numbers; a first row with non-numeric text is a header."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SupportFileError(f"{what} file {path}: not UTF-8 text (byte {e.start}); expected CSV") from None
    rows = [
        (i, [c.strip() for c in line.replace(";", ",").split(",")])
        for i, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]
    if rows and not any(_is_number(c) for c in rows[0][1]):
        rows = rows[1:]  # a header: text that does not parse as numbers ("nan" and "inf" are numbers)
    values, lines = [], []
    for i, cells in rows:
        if len(cells) != len(rows[0][1]):
            raise SupportFileError(
                f"{what} file {path}: line {i} has {len(cells)} columns, line {rows[0][0]} has "
                f"{len(rows[0][1])}; every row needs the same number of columns"
            )
        for j, c in enumerate(cells, 1):
            if not _is_number(c):
                raise SupportFileError(
                    f"{what} file {path}: line {i}, column {j}: {c[:20]!r} is not a number"
                )
        values.append([float(c) for c in cells])
        lines.append(i)
    return np.array(values, np.float64).reshape(len(values), len(values[0]) if values else 0), lines


def _check_values(arr: np.ndarray, where: Callable[[tuple[int, ...]], str], path: Path, what: str) -> None:
    """Refuse NaN, inf and |value| > MAX_ABS_VALUE, naming the first offending entry."""
    bad = ~np.isfinite(arr) | (np.abs(np.nan_to_num(arr, nan=0.0)) > MAX_ABS_VALUE)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SupportFileError(
            f"{what} file {path}: {where(index)} is {float(arr[index])!r}; values must be finite with "
            f"|value| <= {MAX_ABS_VALUE:g}"
        )


def _npz_arrays(path: Path, what: str) -> dict[str, np.ndarray]:
    """The arrays a support (x, y) or query (x) NPZ must hold, as float64, without unpickling."""
    names = ("x",) if what == "query" else ("x", "y")
    if not zipfile.is_zipfile(path):
        raise SupportFileError(f"{what} file {path}: not an NPZ archive (a zip of .npy arrays, np.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in names if n not in z.files]
            if missing:
                raise SupportFileError(
                    f"{what} file {path}: expected array{'s' * (len(names) > 1)} {' and '.join(names)}, "
                    f"got {sorted(z.files)!r}"
                )
            for n in names:
                size = z.zip.getinfo(f"{n}.npy").file_size
                if size > MAX_FILE_BYTES:
                    raise SupportFileError(
                        f"{what} file {path}: array {n} holds {size} bytes, over the limit of "
                        f"{MAX_FILE_BYTES} bytes"
                    )
            arrays = {n: z[n] for n in names}
    except SupportFileError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        reason = "it holds pickled objects" if "pickle" in str(e) else _one_line(e)
        raise SupportFileError(f"{what} file {path}: not a readable NPZ archive ({reason})") from None
    for n, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise SupportFileError(f"{what} file {path}: member {n}.npy is not a NumPy array (np.savez)")
        if a.dtype.kind not in "biuf":
            raise SupportFileError(f"{what} file {path}: array {n} has dtype {a.dtype}; expected numbers")
    return {n: a.astype(np.float64) for n, a in arrays.items()}


def _rows(a: np.ndarray) -> np.ndarray:
    """An array as rows: (K, ...) -> (K, prod(...)); a scalar is one row of one value."""
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(len(a), int(np.prod(a.shape[1:], dtype=np.int64)))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _read_array(path: Path, what: str, width: int) -> np.ndarray:
    """Rows of `width` finite numbers (|v| <= MAX_ABS_VALUE) from CSV (optional header) or NPZ; x-only
    files have width x_dim."""
    if path.is_dir():
        raise SupportFileError(f"{what} file {path}: is a directory; expected a CSV or NPZ file")
    if not path.is_file():
        raise SupportFileError(f"{what} file {path}: not found")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SupportFileError(f"{what} file {path}: {size} bytes, over the limit of {MAX_FILE_BYTES} bytes")
    try:
        if path.suffix.lower() == ".npz":
            arrays = _npz_arrays(path, what)
            for n, a in arrays.items():
                _check_values(a, lambda i, n=n: f"array {n} at index {list(i)}", path, what)
            flat = [_rows(a) for a in arrays.values()]
            if len({len(a) for a in flat}) > 1:
                raise SupportFileError(f"{what} file {path}: x has {len(flat[0])} rows, y has {len(flat[1])}")
            arr = np.concatenate(flat, 1)
        else:
            arr, lines = _parse_csv(path, what)
            _check_values(arr, lambda i: f"line {lines[i[0]]}, column {i[1] + 1}", path, what)
    except OSError as e:
        raise SupportFileError(f"{what} file {path}: unreadable ({e.strerror or _one_line(e)})") from None
    if arr.ndim != 2 or arr.shape[1] != width or len(arr) == 0:
        cols = "x" if what == "query" else "x, y"
        raise SupportFileError(
            f"{what} file {path}: expected shape (K, {width}) with K >= 1 ({cols}: {width} numbers per row), "
            f"got {arr.shape}"
        )
    return arr.astype(np.float32)


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
    blown_up: int | None = None  # draws whose support loss rose in adaptation (methods that check)


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
    blown_up: str = "keep",
) -> Samples:
    """S posterior predictive functions at inputs x after adapting to (x_s, y_s); `blown_up` as in
    predict.predictive (the count is of the draws before any rejection)."""
    batch = TaskBatch(jnp.asarray(x_s)[None], jnp.asarray(y_s)[None], jnp.asarray(x)[None], None, {})
    out = predictive(method, inner_steps, n_samples, blown_up=blown_up)(params, batch, key)
    count = int(out["blown_up"].sum()) if "blown_up" in out else None
    return Samples(x_s, y_s, x, np.asarray(out["f"][:, 0]), np.asarray(out["y"][:, 0]), truth, count)


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
    """sample_<n>.nc (ArviZ: posterior_predictive, constant_data) and sample_<n>.png in out_dir, with the
    first n free: every call keeps the samples of earlier ones."""
    dt = support_set_tree({"f": s.f, "y": s.y}, s.x_support, s.y_support, s.x, False, attrs, s.truth)
    nc = write_new(
        lambda n: out_dir / f"sample_{n:03d}.nc",
        lambda f: f.write(dt.to_netcdf(engine="h5netcdf")),
        taken=lambda path: path.with_suffix(".png").exists(),
    )
    return [nc, plot(s, nc.with_suffix(".png"), title)]
