"""Many regression tasks from one NPZ or CSV file of the user's, read once per process (the `arrays`
task family's data; the formats are described in bayesmeta/tasks/arrays.py).

The file is checked before anything is kept: its size (at most MAX_BYTES, also the arrays an NPZ holds
once unpacked), its format, its shapes, and that every value is finite in float32. A problem is an
ArraysFileError whose message is one line, starting with the file's path.
"""

from __future__ import annotations

import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from bayesmeta.datasets import groups, one_line

MAX_BYTES = 1_000_000_000
"""Largest file (and largest total of an NPZ's unpacked arrays) read: the data is held in memory twice
(host and device), so a larger set of tasks belongs in a data pipeline of its own."""
CSV_EXAMPLE = "task,x0,x1,y0"


class ArraysFileError(ValueError):
    """A task file that is missing, unreadable, too big, or holds the wrong shapes or values."""


@dataclass(frozen=True)
class Tasks:
    """The file's points as float32 rows grouped by task (in order of task id): task g's points are
    rows start[g] : start[g] + count[g] of x (P, x_dim) and y (P, y_dim)."""

    x: np.ndarray
    y: np.ndarray
    start: np.ndarray
    count: np.ndarray

    @property
    def n_tasks(self) -> int:
        return len(self.count)


def read(path: str) -> Tasks:
    """The tasks in `path` (NPZ or CSV), read once per process for each version of the file (the cache
    key holds its modification time and size, so an edited file is read again)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ArraysFileError(f"{p}: is a directory; expected an NPZ or CSV file of tasks")
    if not p.is_file():
        raise ArraysFileError(f"{p}: not found")
    if p.suffix.lower() not in (".npz", ".csv"):
        raise ArraysFileError(f"{p}: expected a .npz or .csv file, got suffix {p.suffix!r}")
    stat = p.stat()
    if stat.st_size > MAX_BYTES:
        raise ArraysFileError(f"{p}: {stat.st_size} bytes, over the limit of {MAX_BYTES} bytes")
    return _read(str(p.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int, size: int) -> Tasks:
    """The tasks of one version of a file (mtime_ns and size only key the cache)."""
    p = Path(path)
    try:
        return _npz_tasks(p) if p.suffix.lower() == ".npz" else _csv_tasks(p)
    except OSError as e:
        raise ArraysFileError(f"{p}: unreadable ({e.strerror or one_line(e)})") from None


# ---------------------------------------------------------------------------------------------- NPZ
def _npz_tasks(p: Path) -> Tasks:
    """Dense arrays x (T, n, x_dim) and y (T, n, y_dim), or long ones with a `task` id per row."""
    arrays = _npz_arrays(p)
    for name, a in arrays.items():
        _check_finite(a, p, lambda i, name=name: f"array {name} at index {list(i)}")
    if "task" in arrays:
        return _long(p, arrays["task"], arrays["x"], arrays["y"], "array")
    x, y = arrays["x"], arrays["y"]
    if x.ndim not in (2, 3) or y.ndim not in (2, 3) or x.shape[:2] != y.shape[:2] or 0 in x.shape + y.shape:
        raise ArraysFileError(
            f"{p}: expected x (tasks, points, x_dim) and y (tasks, points, y_dim), all sizes >= 1 "
            f"(or a task array of ids), got x {x.shape} and y {y.shape}"
        )
    n_tasks, n = x.shape[:2]
    return Tasks(
        x.reshape(n_tasks * n, -1).astype(np.float32),
        y.reshape(n_tasks * n, -1).astype(np.float32),
        np.arange(n_tasks, dtype=np.int64) * n,
        np.full(n_tasks, n, np.int64),
    )


def _npz_arrays(p: Path) -> dict[str, np.ndarray]:
    """x, y and (if present) task from an NPZ, numbers only, never unpickling, each checked for size
    before it is unpacked."""
    if not zipfile.is_zipfile(p):
        raise ArraysFileError(f"{p}: not an NPZ archive (a zip of .npy arrays, as np.savez writes)")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [n for n in ("x", "y") if n not in z.files]
            if missing:
                raise ArraysFileError(f"{p}: expected arrays x and y (and optionally task), got {z.files}")
            names = [n for n in ("task", "x", "y") if n in z.files]
            unpacked = sum(z.zip.getinfo(f"{n}.npy").file_size for n in names)
            if unpacked > MAX_BYTES:
                raise ArraysFileError(
                    f"{p}: its arrays unpack to {unpacked} bytes, over the limit of {MAX_BYTES} bytes"
                )
            arrays = {n: z[n] for n in names}
    except ArraysFileError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        reason = "it holds pickled objects; save arrays of numbers" if "pickle" in str(e) else one_line(e)
        raise ArraysFileError(f"{p}: not a readable NPZ archive ({reason})") from None
    for name, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise ArraysFileError(f"{p}: array {name} has dtype {a.dtype}; expected numbers")
    return arrays


# ---------------------------------------------------------------------------------------------- CSV
def _csv_tasks(p: Path) -> Tasks:
    """A header naming the columns (task, x..., y...), then one row per point."""
    task, xs, ys = _header(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            rows = np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2, comments=None, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArraysFileError(f"{p}: not UTF-8 text (byte {e.start}); expected CSV") from None
    except ValueError:
        raise ArraysFileError(f"{p}: {_csv_problem(p)}") from None
    if len(rows) == 0:
        raise ArraysFileError(f"{p}: no rows of numbers after the header")
    _check_finite(rows, p, lambda i: _csv_cell(p, i))
    return _long(p, rows[:, task], rows[:, xs], rows[:, ys], "column")


COLUMN = re.compile(r"task|[xy].*")


def _names(p: Path) -> list[str]:
    """The column names on the CSV's first line."""
    with p.open("rb") as f:
        first = f.readline()
    try:
        return [c.strip() for c in first.decode("utf-8").split(",")]
    except UnicodeDecodeError as e:
        raise ArraysFileError(f"{p}: not UTF-8 text (byte {e.start}); expected CSV") from None


def _header(p: Path) -> tuple[int, list[int], list[int]]:
    """The positions of the task column, the x columns and the y columns, from the first line."""
    names = _names(p)
    bad = [n for n in names if not COLUMN.fullmatch(n)]
    xs = [i for i, n in enumerate(names) if n.startswith("x")]
    ys = [i for i, n in enumerate(names) if n.startswith("y")]
    if bad or names.count("task") != 1 or not xs or not ys:
        shown = ",".join(names)[:80]
        raise ArraysFileError(
            f"{p}: expected a header naming a task column, x columns and y columns (e.g. {CSV_EXAMPLE}: "
            f"names starting with x are inputs, with y outputs), got {shown!r}"
        )
    return names.index("task"), xs, ys


def _data_lines(p: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank line after the header, as np.loadtxt reads them."""
    with p.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if number > 1 and line.strip():
                yield number, line.split(",")


def _csv_problem(p: Path) -> str:
    """Where the CSV stops being rows of numbers under its header (an error path: scans the file)."""
    names = _names(p)
    for number, cells in _data_lines(p):
        if len(cells) != len(names):
            return f"line {number} has {len(cells)} columns, the header {len(names)}"
        for name, cell in zip(names, cells, strict=True):
            try:
                float(cell)
            except ValueError:
                return f"line {number}, column {name}: {cell.strip()[:20]!r} is not a number"
    return "not rows of comma-separated numbers"


def _csv_cell(p: Path, index: tuple[int, ...]) -> str:
    """'line L, column NAME' for entry (row, column) of the CSV's numbers."""
    number = next(n for i, (n, _) in enumerate(_data_lines(p)) if i == index[0])
    return f"line {number}, column {_names(p)[index[1]]}"


# ------------------------------------------------------------------------------------------- shared
def _long(p: Path, task: np.ndarray, x: np.ndarray, y: np.ndarray, what: str) -> Tasks:
    """Rows with a task id each (task (P,), x (P[, x_dim]), y (P[, y_dim])) grouped by task id."""
    shapes_ok = (
        task.ndim == 1 and x.ndim in (1, 2) and y.ndim in (1, 2) and 0 not in x.shape[1:] + y.shape[1:]
    )
    if not shapes_ok or not len(task) == len(x) == len(y):
        raise ArraysFileError(
            f"{p}: expected task (P,), x (P, x_dim) and y (P, y_dim) with one row per point, got task "
            f"{task.shape}, x {x.shape} and y {y.shape}"
        )
    if len(task) == 0:
        raise ArraysFileError(f"{p}: holds no points")
    if task.dtype.kind == "f" and not np.all(task == np.round(task)):
        row = int(np.argmax(task != np.round(task)))
        raise ArraysFileError(
            f"{p}: task {what} holds {float(task[row])!r} (row {row}); task ids are integers"
        )
    order, _, start, count = groups(task)
    return Tasks(
        x[order].reshape(len(x), -1).astype(np.float32),
        y[order].reshape(len(y), -1).astype(np.float32),
        start.astype(np.int64),
        count.astype(np.int64),
    )


def _check_finite(a: np.ndarray, p: Path, where: Callable[[tuple[int, ...]], str]) -> None:
    """Refuse NaN and inf, also values beyond float32's range (inf once stored as float32)."""
    if a.dtype.kind != "f":
        return
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(a.astype(np.float32))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ArraysFileError(
            f"{p}: {where(index)} is {float(a[index])!r}; values must be finite in float32 (|v| < 3.4e38)"
        )
