"""Task families: shapes, determinism and the protocols of METHODS sections 2 and 4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta import registry
from bayesmeta.registry import make_family


def _family(*overrides, section="task"):
    cfg = registry.load_config(None, list(overrides))
    return make_family(cfg.eval.task if section == "eval" else cfg.task)


def test_sinusoid_shapes_ranges_and_determinism():
    fam = _family("task.shots=5", "task.queries=7")
    b = fam.sample(jax.random.PRNGKey(0), 300)
    assert b.x_support.shape == (300, 5, 1) and b.y_query.shape == (300, 7, 1)
    assert jnp.all(jnp.abs(b.x_support) <= 5) and jnp.all(b.info["amplitude"] >= 0.1)
    assert jnp.all(b.info["amplitude"] <= 5) and jnp.all((b.info["phase"] >= 0) & (b.info["phase"] <= np.pi))
    np.testing.assert_allclose(
        b.y_support,
        b.info["amplitude"][:, None, None] * jnp.sin(b.x_support - b.info["phase"][:, None, None]),
        rtol=1e-6,
    )
    again = fam.sample(jax.random.PRNGKey(0), 300)
    assert all(jnp.array_equal(a, c) for a, c in zip(jax.tree.leaves(b), jax.tree.leaves(again), strict=True))
    other = fam.sample(jax.random.PRNGKey(1), 300)
    assert not jnp.array_equal(b.x_support, other.x_support)


def test_nme_training_tasks_are_memorizable():
    """Training one-hots name one of the first 16 amplitudes, and the amplitude is a function of it."""
    fam = _family("task.family='nme_sinusoid'")
    b = fam.sample(jax.random.PRNGKey(0), 2000)
    assert b.x_support.shape == (2000, 10, 21)
    idx = jnp.argmax(b.x_support[:, 0, 1:], -1)
    np.testing.assert_array_equal(idx, b.info["index"])
    assert int(idx.max()) == 15 and int(idx.min()) == 0
    np.testing.assert_allclose(b.info["amplitude"], jnp.linspace(0.1, 4, 20)[idx], rtol=1e-6)
    resid = b.y_query - b.info["amplitude"][:, None, None] * jnp.sin(b.x_query[..., :1])
    assert 0.09 < float(jnp.std(resid)) < 0.11  # noise sd 0.1


def test_nme_test_protocol():
    """Test tasks: continuous amplitude, a misleading training one-hot, queries on a grid over [-4.5, 4.5]."""
    fam = _family(
        "task.family='nme_sinusoid'",
        "eval.task.params.split='test'",
        "eval.task.shots=5",
        "eval.task.queries=200",
        section="eval",
    )
    b = fam.sample(jax.random.PRNGKey(0), 100)
    assert b.x_support.shape == (100, 5, 21) and b.x_query.shape == (100, 200, 21)
    np.testing.assert_allclose(b.x_query[0, :, 0], jnp.linspace(-4.5, 4.5, 200), rtol=1e-6)
    nearest = jnp.argmin(jnp.abs(b.info["amplitude"][:, None] - jnp.linspace(0.1, 4, 20)[None]), 1)
    assert not jnp.any(nearest == b.info["index"])
    assert int(b.info["index"].max()) <= 15  # a misleading one-hot, but on an input unit seen in training
    assert len(np.unique(np.asarray(b.info["index"]))) == 16
    assert len(np.unique(np.asarray(b.info["amplitude"]))) == 100
