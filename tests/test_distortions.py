"""Koch et al.'s affine distortions on Omniglot (task.params.distort): the warp by hand (identity, an
integer shift, a quarter turn), the random components' ranges and probabilities, and the family's
episodes: distorted on the training split only, with the same classes and labels, jittable."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesmeta import registry
from bayesmeta.datasets import omniglot as data
from bayesmeta.registry import make_family
from bayesmeta.tasks.omniglot import affine_matrix, distort, random_affine, warp

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"


def test_warp_identity_shift_and_quarter_turn():
    img = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (7, 7)), jnp.float32)
    eye = jnp.eye(2)
    np.testing.assert_array_equal(warp(img, eye, jnp.zeros(2)), img)
    shifted = np.zeros((7, 7), np.float32)
    shifted[1:, 2:] = img[:-1, :-2]  # one row down, two columns right, blank ink coming in
    np.testing.assert_allclose(warp(img, eye, jnp.array([1.0, 2.0])), shifted, atol=1e-4)
    quarter = affine_matrix(jnp.asarray(np.pi / 2), jnp.zeros(2), jnp.ones(2))
    np.testing.assert_allclose(warp(img, quarter, jnp.zeros(2)), np.rot90(img), atol=1e-3)
    shear = affine_matrix(jnp.asarray(0.0), jnp.array([0.3, -0.1]), jnp.array([1.2, 0.8]))
    np.testing.assert_allclose(shear, [[1.2, 0.3 * 0.8], [-0.1 * 1.2, 0.8]], rtol=1e-6)


def test_random_distortions_have_koch_et_al_ranges_and_probabilities():
    """Each component is on with probability 1/2: translation absent in about half the draws, the
    matrix the identity in about 1/8; translations within 2 pixels of 105 (scaled to 28), determinants
    (1 - rho_x rho_y) s_x s_y within their ranges."""
    a, t = jax.jit(random_affine, static_argnums=(1, 2))(jax.random.PRNGKey(0), (4000,), 28)
    a, t = np.asarray(a), np.asarray(t)
    assert np.abs(t).max() <= 2 * 28 / 105 + 1e-6
    assert abs(np.mean(np.all(t == 0, -1)) - 0.5) < 0.04
    assert abs(np.mean(np.all(a == np.eye(2), (-2, -1))) - 0.125) < 0.03
    det = np.linalg.det(a)
    assert det.min() >= 0.8**2 * (1 - 0.09) - 1e-5 and det.max() <= 1.2**2 * 1.09 + 1e-5
    out = jax.jit(distort)(jax.random.PRNGKey(1), jnp.full((2, 3, 28, 28), 255.0))
    assert out.shape == (2, 3, 28, 28) and float(out.min()) >= 0 and float(out.max()) <= 255.0 + 1e-3


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tfds")
    data.prepare("minimal", str(SHARED), str(d))
    return str(d)


def family(tfds_dir: str, *overrides: str):
    cfg = registry.load_config(
        None,
        [
            "task.family='omniglot'",
            "model.likelihood='categorical'",
            "task.shots=1",
            "task.queries=2",
            f"task.params.data_dir='{tfds_dir}'",
            *overrides,
        ],
    )
    return make_family(cfg.task)


def test_omniglot_distorts_training_episodes_only(tfds_dir):
    """distort = true: the training split's episodes hold the same classes and labels with other
    images (deterministic in the key, drawn in a jitted sampler); the test split's are unchanged."""
    key = jax.random.PRNGKey(0)
    for split, changed in (("train", True), ("test", False)):
        plain = family(tfds_dir, f"task.params.split='{split}'")
        warped = family(tfds_dir, f"task.params.split='{split}'", "task.params.distort=true")
        a = plain.sample(key, 8)
        b = jax.jit(warped.sample, static_argnums=1)(key, 8)
        np.testing.assert_array_equal(a.info["classes"], b.info["classes"])
        np.testing.assert_array_equal(a.y_query, b.y_query)
        differ = np.any(np.abs(np.asarray(a.x_support) - np.asarray(b.x_support)) > 1e-3, -1)
        if changed:
            assert differ.mean() > 0.7  # all but the draws with every component off (1 in 16)
            again = jax.jit(warped.sample, static_argnums=1)(key, 8)
            np.testing.assert_array_equal(b.x_support, again.x_support)
            assert 0.0 <= float(b.x_support.min()) and float(b.x_support.max()) <= 1.0 + 1e-6
        else:
            np.testing.assert_allclose(a.x_support, b.x_support, atol=1e-7)
