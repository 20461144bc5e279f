"""The `arrays` family: tasks from a user's NPZ or CSV file (dense and long formats), its train/test
split, the uniform draws of distinct points, reading once per file version, one-line errors for bad
files, and a short training run."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from bayesmeta import registry, run
from bayesmeta.cli import main
from bayesmeta.config import ConfigError
from bayesmeta.datasets import arrays as data
from bayesmeta.registry import make_family
from bayesmeta.tasks.episodes import choose


def family(path: Path | str, *overrides: str, section: str = "task"):
    """The arrays family on `path`, 2 shots and 3 queries unless overridden."""
    base = ["task.family='arrays'", f"task.params.path='{path}'", "task.shots=2", "task.queries=3"]
    cfg = registry.load_config(None, [*base, *overrides])
    return make_family(cfg.eval.task if section == "eval" else cfg.task)


def dense_file(path: Path, n_tasks: int = 12, points: int = 9) -> Path:
    """Task t: y = (t + 1) * x0 + t at distinct inputs x (points, 2)."""
    x = np.random.default_rng(0).normal(size=(n_tasks, points, 2))
    t = np.arange(n_tasks)[:, None, None]
    np.savez(path, x=x, y=(t + 1) * x[..., :1] + t)
    return path


def uneven_rows(sizes: dict[int, int]) -> np.ndarray:
    """Rows (task, x0, x1, y0) of tasks with the given ids and point counts, shuffled: x0 = the point's
    index in its task, x1 = the task id, y0 = 100 * id + index."""
    rows = [(t, i, t, 100 * t + i) for t, n in sizes.items() for i in range(n)]
    return np.random.default_rng(1).permutation(np.array(rows, float))


def csv_file(path: Path, rows: np.ndarray, header: str = "task,x0,x1,y0") -> Path:
    path.write_text(header + "\n" + "\n".join(",".join(f"{v:g}" for v in r) for r in rows) + "\n")
    return path


def test_dense_npz_batches_hold_distinct_points_of_one_task(tmp_path):
    path = dense_file(tmp_path / "tasks.npz")
    fam = family(path, "task.shots=3", "task.queries=4", "task.params.split='all'")
    assert (fam.x_dim, fam.y_dim) == (2, 1)
    b = jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(0), 50)
    assert b.x_support.shape == (50, 3, 2) and b.y_query.shape == (50, 4, 1)
    t = b.info["task"][:, None, None].astype(jnp.float32)
    for x, y in ((b.x_support, b.y_support), (b.x_query, b.y_query)):
        np.testing.assert_allclose(y, (t + 1) * x[..., :1] + t, rtol=1e-5, atol=1e-5)  # the task's own points
    both = np.concatenate([b.x_support, b.x_query], 1)
    assert all(len(np.unique(both[i], axis=0)) == 7 for i in range(50))  # no point twice in a task
    again, other = fam.sample(jax.random.PRNGKey(0), 50), fam.sample(jax.random.PRNGKey(1), 50)
    assert all(np.array_equal(a, c) for a, c in zip(jax.tree.leaves(b), jax.tree.leaves(again), strict=True))
    assert not np.array_equal(b.x_support, other.x_support)


def test_train_and_test_tasks_are_disjoint_and_fixed(tmp_path):
    path = dense_file(tmp_path / "tasks.npz", n_tasks=20)
    split = ["task.params.test_fraction=0.25", "eval.task.params.split='test'"]
    train, test = family(path, *split), family(path, *split, section="eval")
    assert test.task_numbers.tolist() == [2, 4, 6, 13, 19]  # the seed-0 assignment, the same in every process
    assert sorted([*train.task_numbers, *test.task_numbers]) == list(range(20))
    drawn = np.asarray(test.sample(jax.random.PRNGKey(0), 200).info["task"])
    assert set(drawn.tolist()) == {2, 4, 6, 13, 19}  # uniform over the split: all of them, and only them
    assert set(np.asarray(train.sample(jax.random.PRNGKey(0), 200).info["task"]).tolist()).isdisjoint(drawn)
    assert len(family(path, "task.params.split='all'").task_numbers) == 20
    other = family(path, *split, "eval.task.params.split_seed=1", section="eval").task_numbers
    assert len(other) == 5 and other.tolist() != [2, 4, 6, 13, 19]


def test_csv_long_format_with_uneven_tasks_matches_the_long_npz(tmp_path):
    """Tasks of 5 to 9 points with ids 3, 7, 10, 42 in shuffled rows, columns in any order; the same
    points in a long NPZ give the same batches."""
    rows = uneven_rows({10: 5, 3: 9, 42: 6, 7: 7})
    path = csv_file(tmp_path / "tasks.csv", rows[:, [1, 3, 0, 2]], header="x0,y0,task,x1")
    fam = family(path, "task.shots=2", "task.queries=3", "task.params.split='all'")
    b = fam.sample(jax.random.PRNGKey(0), 64)
    ids = np.array([3, 7, 10, 42])[np.asarray(b.info["task"])]  # tasks are numbered in order of their id
    x, y = np.concatenate([b.x_support, b.x_query], 1), np.concatenate([b.y_support, b.y_query], 1)
    np.testing.assert_array_equal(x[..., 1], np.broadcast_to(ids[:, None], (64, 5)))
    np.testing.assert_array_equal(y[..., 0], 100 * ids[:, None] + x[..., 0])
    assert all(len(set(x[i, :, 0].tolist())) == 5 for i in range(64))
    assert int(x[ids == 3, :, 0].max()) == 8  # the 9-point task's last point is reachable
    np.savez(tmp_path / "long.npz", task=rows[:, 0].astype(int), x=rows[:, 1:3], y=rows[:, 3])
    c = family(tmp_path / "long.npz", "task.shots=2", "task.queries=3", "task.params.split='all'")
    d = c.sample(jax.random.PRNGKey(0), 64)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(b), jax.tree.leaves(d), strict=True))


def test_draws_are_uniform_subsets_in_uniform_order():
    """choose(key, n, k): every member equally likely in every position, for several n in one call."""
    n = jnp.array([3, 6, 10])
    draws = np.asarray(jax.vmap(lambda k: choose(k, n, 3))(jax.random.split(jax.random.PRNGKey(0), 6000)))
    for g, size in enumerate((3, 6, 10)):
        assert all(len(set(d.tolist())) == 3 for d in draws[:, g])
        for pos in range(3):
            freq = np.bincount(draws[:, g, pos], minlength=size) / len(draws)
            np.testing.assert_allclose(freq, 1 / size, atol=0.025)


def test_too_few_points_names_how_many_tasks(tmp_path):
    path = csv_file(tmp_path / "tasks.csv", uneven_rows({0: 2, 1: 5, 2: 5, 3: 3, 4: 8}))
    with pytest.raises(ConfigError) as e:
        family(path, "task.shots=2", "task.queries=3", "task.params.split='all'")
    assert str(e.value) == (
        f"task.shots: 2 of the 5 tasks in {path} have fewer than shots + queries = 5 points (fewest: 2)"
    )
    with pytest.raises(ConfigError, match=r"task.params.test_fraction: 1.0 of the 5 tasks .* no train task"):
        family(path, "task.shots=1", "task.queries=1", "task.params.test_fraction=1.0")
    with pytest.raises(ConfigError, match=r"^task.params.path: expected the path of an NPZ or CSV file"):
        family("")


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def _flipped(path: Path) -> Path:
    """A compressed NPZ with bytes flipped inside its first member's data."""
    np.savez_compressed(path, x=np.arange(4000.0).reshape(10, 40, 10), y=np.ones((10, 40, 1)))
    raw = bytearray(path.read_bytes())
    raw[200:220] = bytes(b ^ 0xFF for b in raw[200:220])
    path.write_bytes(bytes(raw))
    return path


X, Y = np.zeros((3, 4, 2)), np.zeros((3, 4, 1))
BAD_FILES = {
    "missing": (lambda d: d / "none.npz", "not found"),
    "directory": (lambda d: d, "is a directory"),
    "suffix": (lambda d: _npz(d / "t.npz").rename(d / "t.txt"), r"expected a \.npz or \.csv file"),
    "not a zip": (lambda d: _bytes(d / "t.npz", b"garbage" * 10), "not an NPZ archive"),
    "corrupt": (lambda d: _flipped(d / "t.npz"), "not a readable NPZ archive"),
    "pickle": (
        lambda d: _npz(d / "t.npz", x=np.array([{}], dtype=object), y=Y),
        r"not a readable NPZ archive \(it holds pickled objects",
    ),
    "no y": (
        lambda d: _npz(d / "t.npz", x=X),
        r"expected arrays x and y \(and optionally task\), got \['x'\]",
    ),
    "text": (lambda d: _npz(d / "t.npz", x=np.array(["a"]), y=Y), "array x has dtype <U1; expected numbers"),
    "nan": (
        lambda d: _npz(d / "t.npz", x=np.where(np.arange(24).reshape(3, 4, 2) == 13, np.nan, X), y=Y),
        r"array x at index \[1, 2, 1\] is nan; values must be finite",
    ),
    "float32 overflow": (
        lambda d: _npz(d / "t.npz", x=X, y=Y + 1e39),
        r"array y at index \[0, 0, 0\] is 1e\+39; values must be finite in float32",
    ),
    "shapes": (
        lambda d: _npz(d / "t.npz", x=X, y=np.zeros((3, 5, 1))),
        r"got x \(3, 4, 2\) and y \(3, 5, 1\)",
    ),
    "1-d": (
        lambda d: _npz(d / "t.npz", x=np.zeros(3), y=np.zeros(3)),
        r"expected x \(tasks, points, x_dim\)",
    ),
    "long rows": (
        lambda d: _npz(d / "t.npz", task=np.arange(4), x=np.zeros((3, 1)), y=np.zeros(4)),
        "with one row per point, got task",
    ),
    "no header": (lambda d: csv_file(d / "t.csv", np.zeros((2, 4)), "0,1,2,3"), "expected a header naming"),
    "unknown column": (
        lambda d: csv_file(d / "t.csv", np.zeros((2, 4)), "task,x0,z,y0"),
        "got 'task,x0,z,y0'",
    ),
    "bad cell": (
        lambda d: _text(d / "t.csv", "task,x0,y0\n0,1,2\n\n0,abc,3\n"),
        "line 4, column x0: 'abc' is not a number",
    ),
    "ragged": (
        lambda d: _text(d / "t.csv", "task,x0,y0\n0,1,2\n0,1\n"),
        "line 3 has 2 columns, the header 3",
    ),
    "inf cell": (
        lambda d: _text(d / "t.csv", "task,x0,y0\n0,1,2\n\n1,2,inf\n"),
        "line 4, column y0 is inf",
    ),
    "fractional id": (
        lambda d: _text(d / "t.csv", "task,x0,y0\n0,1,2\n1.5,2,3\n"),
        r"task column holds 1.5 \(row 1\); task ids are integers",
    ),
    "header only": (lambda d: _text(d / "t.csv", "task,x0,y0\n"), "no rows of numbers"),
    "latin-1": (lambda d: _bytes(d / "t.csv", b"task,x\xe9,y0\n0,1,2\n"), "not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_config_error_naming_key_and_file(tmp_path, case):
    make, problem = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ConfigError) as e:
        family(path, "task.shots=1", "task.queries=1")
    msg = str(e.value)
    assert msg.startswith(f"task.params.path: {path}: ") and "\n" not in msg, msg
    assert len(msg) < 400, msg
    assert re.search(problem, msg), msg


def test_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_BYTES", 5000)
    path = dense_file(tmp_path / "big.npz", n_tasks=40)
    with pytest.raises(ConfigError, match=r"big.npz: \d+ bytes, over the limit of 5000 bytes"):
        family(path)
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((10, 100, 2)), y=np.zeros((10, 100, 1)))
    assert (tmp_path / "bomb.npz").stat().st_size < 5000
    with pytest.raises(
        ConfigError, match=r"bomb.npz: its arrays unpack to \d+ bytes, over the limit of 5000"
    ):
        family(tmp_path / "bomb.npz")


def test_file_is_read_once_per_version(tmp_path):
    path = dense_file(tmp_path / "tasks.npz")
    data._read.cache_clear()
    first = family(path, "task.params.split='all'")
    family(path, "task.params.split='all'", "task.shots=2").sample(jax.random.PRNGKey(0), 3)
    assert data._read.cache_info().misses == 1
    x = np.ones((12, 9, 2))
    np.savez(path, x=x, y=x[..., :1])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later version, also on coarse clocks
    second = family(path, "task.params.split='all'")
    assert data._read.cache_info().misses == 2
    assert float(second.sample(jax.random.PRNGKey(0), 2).x_query.min()) == 1.0
    assert float(first.sample(jax.random.PRNGKey(0), 2).x_query.min()) < 0  # a built family keeps its data


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("task,x0,y0\n0,1,nan\n")
    assert main(["fit", "--set", "task.family='arrays'", "--set", f"task.params.path='{path}'"]) == 2
    err = capsys.readouterr().err
    problem = "line 2, column y0 is nan; values must be finite in float32 (|v| < 3.4e38)"
    assert err == f"bayesmeta: config error: task.params.path: {path}: {problem}\n"


def test_maml_trains_on_a_file_of_tasks(tmp_path):
    """A short MAML run meta-trains on the file's train tasks and evaluates on its test tasks."""
    path = dense_file(tmp_path / "tasks.npz", n_tasks=30, points=12)
    cfg = registry.load_config(
        None,
        [
            "task.family='arrays'",
            f"task.params.path='{path}'",
            "eval.task.params.split='test'",
            "task.shots=4",
            "task.queries=8",
            "train.steps=20",
            "train.meta_batch=4",
            "train.log_every=20",
            "train.eval_every=20",
            "train.checkpoint_every=20",
            "train.eval_tasks=10",
            "eval.tasks=20",
            "eval.batch=10",
            "eval.inner_steps=[1]",
            "model.net.hidden=[8]",
        ],
    )
    _, metrics = run.train(cfg, tmp_path / "run", progress=False)
    mse = metrics["metrics"]["mse@1"]
    assert np.isfinite(mse["mean"]) and mse["n"] == 20
    assert (tmp_path / "run" / "metrics.json").is_file()
    # the evaluated tasks (inference.nc) are the file's test tasks: each point found in the file, in a
    # test task (round(0.2 * 30) = 6 of them, the seed-0 assignment), with the file's y at its x
    dt = xr.load_datatree(tmp_path / "run" / "inference.nc", engine="h5netcdf")
    saved = dt["constant_data"]
    x_s, y_s, x_q = (saved[k].values for k in ("x_support", "y_support", "x_query"))
    y_q = dt["observed_data"]["y"].values[0]
    f = dt["posterior_predictive"]["f"].values[0, 0, 0]  # (task, point, output) after 1 inner step
    assert x_s.shape == (20, 4, 2) and x_q.shape == (20, 8, 2) and y_q.shape == f.shape == (20, 8, 1)
    x_file = np.load(path)["x"]
    where = {x_file[t, i].astype(np.float32).tobytes(): t for t in range(30) for i in range(12)}
    test_tasks = {2, 4, 10, 11, 21, 26}
    evaluated = set()
    for task in range(20):
        (t,) = {where[p.tobytes()] for p in (*x_s[task], *x_q[task])}  # all points of one file task
        evaluated.add(t)
        for x, y in ((x_s[task], y_s[task]), (x_q[task], y_q[task])):
            np.testing.assert_allclose(y, (t + 1) * x[:, :1] + t, rtol=1e-5, atol=1e-4)
    assert evaluated <= test_tasks and len(evaluated) >= 3, evaluated
    # the reported mse@1 is that of the saved predictions on these queries (20 steps are too few to
    # beat a trivial baseline: mse ~657 vs ~658 for predicting 0 and ~452 for the support mean)
    np.testing.assert_allclose(mse["mean"], np.mean((f - y_q) ** 2), rtol=1e-4)
    # sample draws on a file task's own query inputs: the family has neither a grid nor a ground truth
    assert main(["sample", str(tmp_path / "run"), "--samples", "3", "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("*.nc"))) == 1
