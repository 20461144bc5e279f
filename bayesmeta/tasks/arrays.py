"""Regression tasks from the user's own arrays: one NPZ or CSV file holding many tasks.

File formats (`task.params.path`; the suffix selects the reader):

- NPZ, dense: arrays `x` (tasks, points, x_dim) and `y` (tasks, points, y_dim), every task with the
  same number of points; (tasks, points) means a dimension of 1.
- NPZ, long: `task` (P,) integer ids, `x` (P, x_dim) and `y` (P, y_dim), one row per point ((P,) means a
  dimension of 1); tasks may have different numbers of points.
- CSV, long: a header, then one row per point: a `task` column of integer ids, the inputs in columns
  whose names start with x and the outputs in columns whose names start with y, in header order
  (e.g. `task,x0,x1,y0`); blank lines are skipped; tasks may have different numbers of points.

Tasks are numbered 0..T-1 in order of their ids (for a dense NPZ, their position). NPZ files are read
with allow_pickle=False; every value must be finite in float32; files over 1 GB (or NPZ arrays that
unpack to more) are refused. The file is read once per process, again only when it changes.

A task batch draws its tasks uniformly (with replacement) from the split's tasks and, within each,
`shots + queries` distinct points in random order: the first `shots` are the support set, the rest the
queries; a task with fewer points is a config error. `info["task"]` holds the drawn tasks' numbers.

`split = "train" | "test"` takes the tasks a fixed random assignment (`split_seed`) puts on each side
of `test_fraction`, so train and test tasks are disjoint and the same in every process; `"all"` uses
every task (e.g. when training and evaluation tasks come in separate files).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import jax
import numpy as np

from bayesmeta.config import SEED_MAX, opt
from bayesmeta.datasets import arrays as data
from bayesmeta.tasks.base import TaskBatch
from bayesmeta.tasks.episodes import device, draw_members


def split_tasks(n_tasks: int, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """The sorted task numbers of a split: round(test_fraction * n_tasks) tasks of a seeded random
    permutation are "test", the rest "train"; "all" is every task."""
    if split == "all":
        return np.arange(n_tasks)
    perm = np.random.default_rng(seed).permutation(n_tasks)
    n_test = round(test_fraction * n_tasks)
    return np.sort(perm[:n_test] if split == "test" else perm[n_test:])


@dataclass(frozen=True)
class Arrays:
    """Tasks from an NPZ or CSV file (see the module docstring): x (T, n, x_dim), y (T, n, y_dim)."""

    @dataclass(frozen=True)
    class Params:
        path: str = opt("", doc="NPZ or CSV file holding the tasks")
        split: str = opt("train", choices=["train", "test", "all"], doc="which of the file's tasks")
        test_fraction: float = opt(0.2, ge=0, le=1, doc="share of the file's tasks in the test split")
        split_seed: int = opt(0, ge=0, le=SEED_MAX, doc="seed of the fixed train/test assignment")

    params: Params
    shots: int
    queries: int

    @cached_property
    def _tasks(self) -> data.Tasks:
        return data.read(self.params.path)

    @property
    def x_dim(self) -> int:
        return self._tasks.x.shape[1]

    @property
    def y_dim(self) -> int:
        return self._tasks.y.shape[1]

    @cached_property
    def task_numbers(self) -> np.ndarray:
        """The split's tasks, numbered as in the file."""
        p = self.params
        return split_tasks(self._tasks.n_tasks, p.split, p.test_fraction, p.split_seed)

    def check(self) -> str | None:
        p = self.params
        if not p.path:
            return "params.path: expected the path of an NPZ or CSV file of tasks"
        try:
            tasks = self._tasks
        except data.ArraysFileError as e:
            return f"params.path: {e}"
        numbers, need = self.task_numbers, self.shots + self.queries
        if len(numbers) == 0:
            return (
                f"params.test_fraction: {p.test_fraction} of the {tasks.n_tasks} tasks in {p.path} leaves "
                f"no {p.split} task"
            )
        count, which = tasks.count[numbers], "" if p.split == "all" else f"{p.split} "
        if (count < need).any():
            return (
                f"shots: {int((count < need).sum())} of the {len(numbers)} {which}tasks in {p.path} have "
                f"fewer than shots + queries = {need} points (fewest: {int(count.min())})"
            )
        return None

    @cached_property
    def _device(self) -> dict[str, jax.Array]:
        """The split's points on device, grouped by task (split task i at start[i], count[i] rows),
        with `number` mapping split task i back to its number in the file."""
        t, numbers = self._tasks, self.task_numbers
        count = t.count[numbers]
        start = np.cumsum(count) - count
        rows = np.repeat(t.start[numbers] - start, count) + np.arange(count.sum())
        arrays = {"x": t.x[rows], "y": t.y[rows], "start": start, "count": count, "number": numbers}
        return {k: device(v.astype(np.int32) if v.dtype.kind == "i" else v) for k, v in arrays.items()}

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        return draw_tasks(key, self._device, n_tasks, self.shots, self.queries)


@partial(jax.jit, static_argnums=(2, 3, 4))
def draw_tasks(key: jax.Array, d: dict[str, jax.Array], n_tasks: int, shots: int, queries: int) -> TaskBatch:
    """n_tasks tasks drawn uniformly from the grouped points `d` (Arrays._device), each with shots +
    queries distinct points; jitted as one computation, since the engine also samples eagerly."""
    kt, kp = jax.random.split(key)
    task = jax.random.randint(kt, (n_tasks,), 0, d["count"].shape[0])
    rows = draw_members(kp, d["start"], d["count"], task, shots + queries)
    x, y = d["x"][rows], d["y"][rows]
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], {"task": d["number"][task]})
