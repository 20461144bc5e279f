"""The Omniglot pose family (Yin et al. 2020's pose tasks on Omniglot characters): targets, splits,
canonical angles, the counterfactual swap of the memorization meter, the angle metric, and a tiny
MAML fit that must learn."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesmeta import registry
from bayesmeta.config import ConfigError
from bayesmeta.datasets import omniglot as data
from bayesmeta.diagnostics.memorization import support_dependence
from bayesmeta.likelihoods import make_likelihood
from bayesmeta.method import Method, no_guide
from bayesmeta.registry import make_family
from bayesmeta.sites import observe
from bayesmeta.tasks import Counterfactual, GroundTruth, TaskMetrics
from bayesmeta.tasks.pose import angle_metrics, canonical_angles, rotate_image, unit, wrap

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"
POSE = ["task.family='omniglot_pose'", "task.shots=4", "task.queries=3"]
N = 48  # tasks per draw: one shape, so one compiled sampler per split


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tfds")
    data.prepare("minimal", str(SHARED), str(d))
    return str(d)


def config(tfds_dir: str, *overrides: str):
    return registry.load_config(None, [*POSE, f"task.params.data_dir='{tfds_dir}'", *overrides])


def family(tfds_dir: str, *overrides: str):
    return make_family(config(tfds_dir, *overrides).task)


def test_rotation_by_a_quarter_turn_is_rot90():
    """A quarter turn maps the pixel grid to itself: the bilinear resample equals np.rot90 (counter-
    clockwise on screen), and a full turn is the identity."""
    img = np.random.default_rng(0).uniform(size=(9, 9)).astype(np.float32)
    np.testing.assert_allclose(rotate_image(jnp.asarray(img), jnp.pi / 2), np.rot90(img, 1), atol=1e-5)
    np.testing.assert_allclose(rotate_image(jnp.asarray(img), 2 * jnp.pi), img, atol=1e-5)


def test_targets_are_rotation_minus_canonical_whatever_the_draw(tfds_dir):
    fam = family(tfds_dir)
    assert (
        isinstance(fam, Counterfactual) and isinstance(fam, TaskMetrics) and not isinstance(fam, GroundTruth)
    )
    canon = canonical_angles(242, 0)
    seen: dict[int, set] = {}
    for k in range(3):  # three support draws; the same characters recur across them
        b = fam.sample(jax.random.PRNGKey(k), N)
        char = np.asarray(b.info["character"])
        np.testing.assert_allclose(b.info["canonical"], canon[char], rtol=1e-6)
        y = np.concatenate([b.y_support, b.y_query], 1)
        np.testing.assert_allclose(y, unit(b.info["rotation"] - canon[char][:, None]), atol=1e-5)
        # the rotation minus the target angle is the character's canonical angle, at every point
        offset = np.asarray(
            wrap(b.info["rotation"] - np.arctan2(y[..., 1], y[..., 0]) - canon[char][:, None])
        )
        np.testing.assert_allclose(offset, 0.0, atol=1e-4)
        for c, r in zip(char, np.asarray(b.info["rotation"])[:, 0], strict=True):
            seen.setdefault(int(c), set()).add(float(r))
    assert any(len(v) > 1 for v in seen.values())  # a character drawn twice, at different rotations
    # the inputs are one drawer's image turned by the rotations: turned back, two of a task's images
    # agree far better than as drawn
    img = jnp.concatenate([b.x_support, b.x_query], 1).reshape(N, 7, 28, 28)
    back = jax.vmap(jax.vmap(rotate_image))(img, -b.info["rotation"])
    err = lambda a: float(jnp.mean(jnp.square(a[:, 0] - a[:, 1])))  # noqa: E731
    assert err(back) < 0.3 * err(img)


def test_held_out_and_validation_characters_never_in_training_tasks(tfds_dir):
    train, val, test = (family(tfds_dir, f"task.params.split='{s}'") for s in ("train", "validation", "test"))
    c = data.characters("minimal", 28, "", tfds_dir)
    alphabet = {int(lab): a for lab, a in zip(c.label, c.alphabet, strict=True)}
    assert {alphabet[int(k)] for k in test.split_labels} == {"Early_Aramaic", "Korean"}
    assert {alphabet[int(k)] for k in val.split_labels} == {"Greek"}
    assert len(train.split_labels) + len(val.split_labels) + len(test.split_labels) == 242
    drawn = np.concatenate([train.sample(jax.random.PRNGKey(k), N).info["character"] for k in range(8)])
    assert not set(drawn.tolist()) & (set(test.split_labels.tolist()) | set(val.split_labels.tolist()))
    assert set(drawn.tolist()) <= set(train.split_labels.tolist())
    assert len(set(drawn.tolist())) > 100  # of the 156 training characters
    held = np.asarray(test.sample(jax.random.PRNGKey(1), N).info["character"])
    assert set(held.tolist()) <= set(test.split_labels.tolist())


def test_a_subset_of_training_characters_and_fixed_drawers(tfds_dir):
    """characters = n keeps a fixed subset of n training characters (the same in two builds, none held
    out) and tasks draw only from it; drawers = fixed gives a character one image up to rotation, the
    one a task with zero rotation shows."""
    sub = family(tfds_dir, "task.params.characters=20")
    full = family(tfds_dir)
    assert len(sub.split_labels) == 20 and set(sub.split_labels.tolist()) <= set(full.split_labels.tolist())
    np.testing.assert_array_equal(
        sub.split_labels, family(tfds_dir, "task.params.characters=20").split_labels
    )
    drawn = sub.sample(jax.random.PRNGKey(3), N).info["character"]
    assert set(np.asarray(drawn).tolist()) <= set(sub.split_labels.tolist())
    with pytest.raises(ConfigError, match=r"params\.characters"):
        make_family(config(tfds_dir, "task.params.characters=1000").task)

    fixed = family(tfds_dir, "task.params.drawers='fixed'", "task.params.characters=1")
    tasks = fixed.sample(jax.random.PRNGKey(4), 6)
    c = data.characters("minimal", 28, "", tfds_dir)
    first = c.images[np.flatnonzero(c.label == int(fixed.split_labels[0]))[0]].astype(np.float32) / 255.0
    x = np.concatenate([tasks.x_support, tasks.x_query], 1).reshape(-1, 28, 28)
    rot = np.asarray(tasks.info["rotation"]).reshape(-1)
    for img, r in zip(x, rot, strict=True):  # each image is the first drawer's, turned by its rotation
        np.testing.assert_allclose(img, rotate_image(jnp.asarray(first), r), atol=1e-5)


def test_canonical_angles_reproducible_from_the_seed(tfds_dir):
    a, b = canonical_angles(242, 0), canonical_angles(242, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, canonical_angles(242, 1))
    assert a.min() >= 0 and a.max() < 2 * math.pi
    # two families built apart agree; another seed moves every character's angle
    f1, f2 = family(tfds_dir), family(tfds_dir, "task.params.split='test'")
    np.testing.assert_array_equal(f1.canonical, f2.canonical)
    f3 = family(tfds_dir, "task.params.canonical_seed=1")
    b1, b3 = f1.sample(jax.random.PRNGKey(5), N), f3.sample(jax.random.PRNGKey(5), N)
    np.testing.assert_array_equal(b1.x_support, b3.x_support)  # same images and rotations
    assert not np.allclose(b1.y_support, b3.y_support)  # other targets


def test_counterfactual_is_the_same_character_under_another_canonical_angle(tfds_dir):
    fam = family(tfds_dir)
    b = fam.sample(jax.random.PRNGKey(2), N)
    swapped, truth = fam.counterfactual(jax.random.PRNGKey(3), b)
    np.testing.assert_array_equal(swapped.x_support, b.x_support)
    assert swapped.y_query is None
    rot = swapped.info["rotation"]
    new_c = swapped.info["canonical"][:, None]
    np.testing.assert_allclose(swapped.y_support, unit(rot[:, :4] - new_c), atol=1e-5)
    np.testing.assert_allclose(truth, unit(rot[:, 4:] - new_c), atol=1e-5)

    # the meter: an oracle that reads the support set's offset has D ~ 1 and slope ~ 1; one that
    # answers from the character alone (memorization) has D = 0
    def model(which: str):
        def fn(batch, inner_steps=None, training=True):
            # the support's canonical angle: rotation minus target angle (read from info for the oracle)
            ys = batch.y_support[:, 0]
            c = batch.info["rotation"][:, 0] - jnp.arctan2(ys[:, 1], ys[:, 0])
            if which == "memorizer":
                c = jnp.asarray(fam.canonical)[batch.info["character"]]
            f = unit(batch.info["rotation"][:, 4:] - c[:, None])
            observe(make_likelihood(config(tfds_dir).model), f, batch.y_query)

        return Method(which, fn, no_guide, likelihood=make_likelihood(config(tfds_dir).model))

    oracle = support_dependence(model("oracle"), {}, fam, b, 0, jax.random.PRNGKey(1))
    memo = support_dependence(model("memorizer"), {}, fam, b, 0, jax.random.PRNGKey(1))
    assert oracle["support_dependence"] == pytest.approx(1.0, abs=1e-4)
    assert oracle["truth_slope"] == pytest.approx(1.0, abs=1e-4)
    assert memo["support_dependence"] == pytest.approx(0.0, abs=1e-10)


def test_angle_metric_in_the_reference_units():
    """A prediction a tenth of a turn (36 degrees) off, either way and across the wrap, scores 1 unit^2."""
    truth = jnp.array([0.1, 3.0, -3.1, 6.2])
    y = unit(truth)[None]
    for sign in (1, -1):
        m = angle_metrics(2.5 * unit(truth + sign * 2 * math.pi / 10)[None], y)  # the norm is irrelevant
        np.testing.assert_allclose(m["angle_mse"], [1.0], rtol=1e-5)
        np.testing.assert_allclose(m["angle_error"], [36.0], rtol=1e-5)
    half = angle_metrics(unit(truth + math.pi)[None], y)
    np.testing.assert_allclose(half["angle_mse"], [25.0], rtol=1e-5)  # the worst: half a turn


def test_tiny_maml_fit_lowers_its_loss(tfds_dir):
    """Second-order MAML (an MLP on 10x10 images of the 24 validation characters) must explain part of
    the targets' variance: the loss is the mean over points of the summed squared error plus log(pi)
    (Gaussian sd sqrt(1/2) per output), and predicting 0 scores 1 + log(pi)."""
    from bayesmeta.fit import fit
    from bayesmeta.registry import build_method

    cfg = config(
        tfds_dir,
        "task.params.image_size=10",
        "task.params.split='validation'",
        "model.net.kind='mlp'",
        "model.net.hidden=[32]",
        "model.inner_steps=1",
        "model.inner_lr=0.1",
        "train.steps=400",
        "train.log_every=200",
        "train.eval_every=400",
        "train.checkpoint_every=400",
        "train.meta_batch=8",
        "train.lr=1e-2",
    )
    fam = make_family(cfg.task)
    result = fit(build_method(cfg.model, fam.x_dim, fam.y_dim), fam, cfg.train, seed=0, progress=False)
    sq = np.asarray(result.trace.loss) - math.log(math.pi)  # the squared-error part
    assert np.isfinite(sq).all() and 0.8 < sq[:50].mean() < 1.2
    assert sq[-50:].mean() < 0.85 * sq[:50].mean(), (sq[:50].mean(), sq[-50:].mean())
