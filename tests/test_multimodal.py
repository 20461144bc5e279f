"""ARML's multi-family 2-D regression family: shapes, determinism, each family's formula and
parameter ranges, the uniform mix, the 1-D families on x2 = 1, and metrics per group of tasks."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from bayesmeta import registry
from bayesmeta.config import ConfigError
from bayesmeta.experiment import _stats, on_grid_line
from bayesmeta.predict import Evaluation
from bayesmeta.registry import make_family
from bayesmeta.report import summary_markdown
from bayesmeta.sections import GroupMetrics, group_metrics
from bayesmeta.stats import summarize
from bayesmeta.tasks import DenseGrid, GroundTruth, Groups
from bayesmeta.tasks.multimodal import FAMILIES, PARAMETERS

MM = "task.family='multimodal'"


def _family(*overrides):
    return make_family(registry.load_config(None, [MM, *overrides]).task)


def _sample(fam, seed, n):
    """family.sample jitted once, as numpy arrays (the checks below compute on the host)."""
    return jax.tree.map(np.asarray, jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(seed), n))


def formula(name, p, x1, x2):
    """Each family's function written out again (ARML data_generator.py), p: the task's parameters."""
    if name == "sine":
        return p["sine_amplitude"] * np.sin(p["sine_frequency"] * x1 + p["sine_phase"])
    if name == "line":
        return p["line_slope"] * x1 + p["line_intercept"]
    if name == "quadratic":
        return p["quadratic_a"] * x1**2 + p["quadratic_b"] * x1 + p["quadratic_c"]
    if name == "cubic":
        return p["cubic_a"] * x1**3 + p["cubic_b"] * x1**2 + p["cubic_c"] * x1 + p["cubic_d"]
    if name == "quadratic_surface":
        return p["surface_a"] * x1**2 + p["surface_b"] * x2**2
    return np.sin(-p["ripple_a"] * (x1**2 + x2**2)) + p["ripple_b"]


def test_shapes_capabilities_and_determinism_in_the_key():
    fam = _family("task.shots=7", "task.queries=4")
    assert (fam.x_dim, fam.y_dim) == (2, 1)
    assert isinstance(fam, GroundTruth) and isinstance(fam, DenseGrid) and isinstance(fam, Groups)
    b = _sample(fam, 0, 50)
    assert b.x_support.shape == (50, 7, 2) and b.y_support.shape == (50, 7, 1)
    assert b.x_query.shape == (50, 4, 2) and b.y_query.shape == (50, 4, 1)
    assert b.info["family"].shape == (50,) and b.info["family"].dtype == np.int32
    again, other = _sample(fam, 0, 50), _sample(fam, 1, 50)
    for a, c in zip(jax.tree.leaves(b), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, c)
    assert not np.array_equal(b.x_support, other.x_support)


@pytest.fixture(scope="module")
def noise_free():
    """(family, 3000 noise-free tasks of the full mix): one compilation serves every family's check."""
    fam = _family("task.params.noise_sd=0.0")
    return fam, _sample(fam, 3, 3000)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_familys_targets_are_its_formula(noise_free, name):
    """Noise-free tasks of one family: y is the formula at the inputs, the 1-D families sit on x2 = 1
    and the surfaces use both inputs, and every parameter lies in its range and spans it."""
    fam, b = noise_free
    mine = b.info["family"] == FAMILIES.index(name)
    x = np.concatenate([b.x_support, b.x_query], 1)[mine]
    y = np.concatenate([b.y_support, b.y_query], 1)[mine, :, 0]
    p = {k: v[mine, None] for k, v in b.info.items()}
    np.testing.assert_allclose(y, formula(name, p, x[..., 0], x[..., 1]), rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(x) <= 5.0) and x[..., 0].min() < -4.5 and x[..., 0].max() > 4.5
    if name in ("quadratic_surface", "ripple"):
        assert x[..., 1].std() > 2.0
    else:
        np.testing.assert_array_equal(x[..., 1], 1.0)
    for k in PARAMETERS[name]:
        low, high = getattr(fam.params, k)
        v = b.info[k][mine]
        assert v.min() >= low and v.max() <= high, k
        assert v.min() < low + 0.05 * (high - low) and v.max() > high - 0.05 * (high - low), k


def test_the_mix_is_uniform_over_the_chosen_families_and_the_noise_sd_is_0_3():
    fam = _family()
    b = _sample(fam, 0, 6000)
    counts = np.bincount(b.info["family"], minlength=6)
    assert np.all(np.abs(counts - 1000) < 5 * math.sqrt(6000 * (1 / 6) * (5 / 6))), counts
    resid = b.y_query - np.asarray(jax.jit(fam.truth)(b.info, b.x_query))
    assert abs(resid.std() - 0.3) < 0.01
    sub = _sample(_family("task.params.families=['line', 'ripple']"), 0, 2000)
    counts = np.bincount(sub.info["family"], minlength=6)
    assert counts[[0, 2, 3, 4]].sum() == 0 and abs(counts[1] - 1000) < 5 * math.sqrt(500)


def test_grid_lays_1d_families_on_x2_1_and_surfaces_on_the_diagonal():
    fam = _family()
    info = {"family": np.array([0, 3, 4, 5])}
    g = np.asarray(fam.grid(info, 5))
    np.testing.assert_allclose(g[:, :, 0], np.tile(np.linspace(-5, 5, 5), (4, 1)))
    np.testing.assert_array_equal(g[:2, :, 1], 1.0)
    np.testing.assert_array_equal(g[2:, :, 1], g[2:, :, 0])


def test_unknown_or_repeated_families_are_config_errors():
    for bad in ("['sine', 'tanh']", "['line', 'line']", "[]"):
        with pytest.raises(ConfigError, match=r"params\.families"):
            _family(f"task.params.families={bad}")
    with pytest.raises(ConfigError, match=r"params\.cubic_a"):
        _family("task.params.cubic_a=[1.0, -1.0]")


def test_group_metrics_summarize_each_groups_tasks():
    """Per-task MSEs and groups written by hand: each group's summary is `summarize` of its own tasks
    (a diverged task left out), a group without tasks is absent, and an experiment reads a group's
    metric by its path."""
    fam = _family()
    mse = np.array([1.0, 2.0, 3.0, 10.0, 5.0, 7.0])
    group = np.array([0, 0, 4, 4, 4, 1])
    tasks = _sample(fam, 0, 6)._replace(info={"family": group})
    start, end = np.ones(6), np.array([0.5, 0.5, 0.5, 2.0, 0.5, 0.5])  # task 3's support loss rose
    ev = Evaluation({5: {"mse": mse}}, {}, tasks, {0: start, 5: end})
    out = group_metrics(fam, ev)
    assert list(out) == ["sine", "line", "quadratic_surface"]
    assert out["sine"]["mse@5"]["mean"] == 1.5 and out["line"]["mse@5"]["mean"] == 7.0
    assert out["quadratic_surface"]["mse@5"] == summarize(mse[2:5], np.array([False, True, False]))
    assert out["quadratic_surface"]["mse@5"]["mean"] == 4.0
    metrics = {"metrics": {}, "groups": out}
    assert _stats(metrics, "groups/quadratic_surface/mse@5")["mean"] == 4.0
    base = {
        "name": "r",
        "method": "maml",
        "family": "multimodal",
        "eval_family": "multimodal",
        "seed": 0,
        "steps": 1,
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
        "eval_tasks": 6,
        "final_loss": 0.0,
        "metrics": {"mse@5": summarize(mse)},
    }
    section = GroupMetrics()
    assert section.load(json.loads(json.dumps(section.dump(out)))) == out
    text = summary_markdown(base, [], section.markdown(out))
    assert "## Per group of tasks" in text and "| quadratic_surface | 3 |" in text


def test_only_support_points_on_the_plotted_line_are_drawn():
    """The 1-D families' points (x2 = 1) lie on their grid; a surface's off-diagonal points do not."""
    fam = _family()
    grid = np.asarray(fam.grid({"family": np.array([1, 4])}, 200))
    line = np.array([[-3.3, 1.0], [0.7, 1.0], [2.0, 1.5]])
    np.testing.assert_array_equal(on_grid_line(line, grid[0]), [True, True, False])
    surface = np.array([[-2.0, 3.0], [1.0, 1.0]])
    np.testing.assert_array_equal(on_grid_line(surface, grid[1]), [False, True])
