"""The `tfds_images` family on a tiny TFDS image-classification dataset prepared here as array_record
(without TensorFlow: the builder yields PIL images, which TFDS encodes itself): episode shapes and
labels, class membership, no image in both sets, determinism, class ranges, resizing and channels,
one-line errors (a dataset that is not prepared is never downloaded), and a short ProtoNet run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import ClassVar

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import xarray as xr
from PIL import Image

from bayesmeta import registry, run
from bayesmeta.cli import main
from bayesmeta.config import ConfigError
from bayesmeta.datasets.tfds_images import read, to_size
from bayesmeta.registry import make_family

CLASSES, PER_CLASS, SIDE = 10, 6, 8


def tiny_image(split: str, label: int, i: int) -> np.ndarray:
    """The distinct random 8x8 grey image i of class `label` in `split`."""
    seed = [("train", "test").index(split), label, i]
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)


class TinyDigits(tfds.core.GeneratorBasedBuilder):
    """10 classes x 6 random 8x8 grey images in each of the splits train and test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar = {"1.0.0": "Test data."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(SIDE, SIDE, 1)),
            "label": tfds.features.ClassLabel(num_classes=CLASSES),
        }
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label")
        )

    def _split_generators(self, dl_manager: object) -> dict:
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        for label in range(CLASSES):
            for i in range(PER_CLASS):
                # a PIL image: TFDS encodes it with PIL (a NumPy array would need tf.image.encode_png)
                yield f"{label}_{i}", {"image": Image.fromarray(tiny_image(split, label, i)), "label": label}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tfds")
    TinyDigits(data_dir=str(d), file_format="array_record").download_and_prepare()
    return str(d)


BASE = [
    "task.family='tfds_images'",
    "task.params.name='tiny_digits'",
    f"task.params.image_size={SIDE}",
    "task.params.ways=3",
    "task.params.classes=[0, 6]",
    "task.shots=2",
    "task.queries=3",
    "model.likelihood='categorical'",
    "eval.task.params.classes=[6, 10]",
]


def family(tfds_dir: str, *overrides: str, section: str = "task"):
    cfg = registry.load_config(None, [*BASE, f"task.params.data_dir='{tfds_dir}'", *overrides])
    return make_family(cfg.eval.task if section == "eval" else cfg.task)


def identify(split: str) -> dict[bytes, tuple[int, int]]:
    """Image bytes -> (TFDS label, index) for every image of the split."""
    return {tiny_image(split, c, i).tobytes(): (c, i) for c in range(CLASSES) for i in range(PER_CLASS)}


def test_episodes_hold_one_tfds_class_per_label_and_no_image_twice(tfds_dir):
    fam = family(tfds_dir)
    assert (fam.x_dim, fam.y_dim, fam.n_classes, fam.query_points) == (64, 3, 6, 9)
    assert fam.class_labels.tolist() == [0, 1, 2, 3, 4, 5]
    b = jax.jit(fam.sample, static_argnums=1)(jax.random.PRNGKey(0), 40)
    assert b.x_support.shape == (40, 6, 64) and b.x_query.shape == (40, 9, 64)
    assert b.y_support.shape == (40, 6) and b.y_query.shape == (40, 9) and b.info["classes"].shape == (40, 3)
    known = identify("train")
    for t in range(40):
        assert np.bincount(np.asarray(b.y_support[t]), minlength=3).tolist() == [2, 2, 2]
        assert np.bincount(np.asarray(b.y_query[t]), minlength=3).tolist() == [3, 3, 3]
        classes = np.asarray(b.info["classes"][t])
        assert len(set(classes.tolist())) == 3
        seen = {}
        for x, y in ((b.x_support[t], b.y_support[t]), (b.x_query[t], b.y_query[t])):
            for image, label in zip(np.asarray(x), np.asarray(y), strict=True):
                tfds_label, i = known[np.rint(image * 255).astype(np.uint8).tobytes()]
                assert tfds_label == fam.class_labels[classes[label]]  # label j is the task's class j
                seen[(tfds_label, i)] = seen.get((tfds_label, i), 0) + 1
        assert max(seen.values()) == 1  # no image in the support set and the query set (or twice in either)
    again, other = fam.sample(jax.random.PRNGKey(0), 40), fam.sample(jax.random.PRNGKey(1), 40)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(b), jax.tree.leaves(again), strict=True))
    assert not np.array_equal(b.x_support, other.x_support)
    drawn = {(int(c), i) for c, i in seen}
    assert drawn <= {(c, i) for c in range(6) for i in range(PER_CLASS)}


def test_class_ranges_and_splits_select_the_images(tfds_dir):
    test = family(tfds_dir, "eval.task.params.split='test'", "eval.task.params.ways=4", section="eval")
    assert test.class_labels.tolist() == [6, 7, 8, 9] and test.n_classes == 4
    b = test.sample(jax.random.PRNGKey(0), 20)
    known = identify("test")
    labels = {
        known[np.rint(im * 255).astype(np.uint8).tobytes()][0] for im in np.asarray(b.x_query).reshape(-1, 64)
    }
    assert labels == {6, 7, 8, 9}
    assert family(tfds_dir, "task.params.classes=[]", "task.params.split='train+test'").n_classes == 10
    half = read("tiny_digits", tfds_dir, "train[:50%]", SIDE, True, "image", "label")  # split slicing
    assert half.images.shape == (30, SIDE, SIDE, 1) and half.labels.shape == (30,)


def test_resizing_and_channels():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    grey = to_size(rgb, 4, grey=True)
    expected = Image.fromarray(rgb).convert("L").resize((4, 4), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(grey[..., 0], np.asarray(expected))
    kept = to_size(rgb, 4, grey=False)
    np.testing.assert_array_equal(
        kept, np.asarray(Image.fromarray(rgb).resize((4, 4), Image.Resampling.LANCZOS))
    )
    assert to_size(rgb[..., 0], 6, grey=False).shape == (6, 6, 1)
    assert to_size(rgb[:6, :6], 6, grey=True).shape == (6, 6, 1)


def test_image_size_and_channels_set_the_inputs(tfds_dir):
    small = family(tfds_dir, "task.params.image_size=4")
    assert small.x_dim == 16 and small.sample(jax.random.PRNGKey(0), 2).x_support.shape == (2, 6, 16)
    assert family(tfds_dir, "task.params.channels='keep'").x_dim == 64  # the dataset is grey


def test_a_dataset_that_is_not_prepared_is_never_downloaded(tmp_path):
    """'mnist' is a registered TFDS builder: it is not prepared here, and nothing is fetched or written."""
    empty = tmp_path / "tfds"
    empty.mkdir()
    for name in ("mnist", "my_own_images"):
        with pytest.raises(ConfigError) as e:
            family(str(empty), f"task.params.name='{name}'")
        msg = str(e.value)
        assert msg.startswith(f"task.params.name: TFDS dataset '{name}' is not prepared in {empty}; ")
        assert f"tfds build {name} --data_dir={empty} --file_format=array_record" in msg and "\n" not in msg
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.params.name=''", r"task.params.name: expected a TFDS dataset name"),
        (
            "task.params.split='validation'",
            r"task.params.split: 'validation' of TFDS dataset 'tiny_digits' \(splits",
        ),
        (
            "task.params.image_key='img'",
            r"task.params.image_key: TFDS dataset 'tiny_digits' has no feature 'img'",
        ),
        (
            "task.params.ways=7",
            r"task.params.ways: expected <= 6 \(classes in split 'train' with labels in \[0, 6\)",
        ),
        (
            "task.shots=4",
            r"task.shots: 6 of the 6 classes .* fewer than shots \+ queries = 7 images \(fewest: 6\)",
        ),
        (
            "task.params.classes=[5, 5]",
            r"task.params.classes: expected \[\] or \[start, stop\] with start < stop",
        ),
        ("task.params.channels='rgb'", r"task.params.channels: expected one of 'grey', 'keep'"),
    ],
)
def test_config_errors_are_one_line(tfds_dir, override, message):
    with pytest.raises(ConfigError, match=message) as e:
        family(tfds_dir, override)
    assert "\n" not in str(e.value)


def test_protonet_trains_on_a_tfds_dataset(tfds_dir, tmp_path, capsys):
    """A tiny conv ProtoNet meta-trains 3-way on classes 0-5 and is evaluated 4-way on classes 6-9."""
    cfg = registry.load_config(
        None,
        [
            *BASE,
            f"task.params.data_dir='{tfds_dir}'",
            "eval.task.params.ways=4",
            "model.method='protonet'",
            "model.net.kind='conv4'",
            "model.net.filters=4",
            "model.net.conv='xla'",  # fewer ops than the patches path: model initialisation compiles faster
            "train.steps=20",
            "train.meta_batch=4",
            "train.log_every=20",
            "train.eval_every=20",
            "train.checkpoint_every=20",
            "train.eval_tasks=10",
            "eval.tasks=20",
            "eval.batch=10",
            "eval.inner_steps=[0]",
            "eval.plot_tasks=0",
            "eval.memorization_tasks=0",
        ],
    )
    _, metrics = run.train(cfg, tmp_path / "run", progress=False)
    accuracy = metrics["metrics"]["accuracy@0"]
    assert accuracy["n"] == 20
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["metrics"]["accuracy@0"]["mean"] == accuracy["mean"]
    # the evaluated episodes (inference.nc) are 4-way, 2 shots + 3 queries, of images of classes 6-9
    dt = xr.load_datatree(tmp_path / "run" / "inference.nc", engine="h5netcdf")
    f = dt["posterior_predictive"]["f"].values[0, 0, 0]  # (task, point, class) at inner step 0
    y_query = dt["observed_data"]["y"].values[0]
    data = dt["constant_data"]
    x_s, y_s, x_q = (data[k].values for k in ("x_support", "y_support", "x_query"))
    assert f.shape == (20, 12, 4) and x_s.shape == (20, 8, 64) and x_q.shape == (20, 12, 64)
    known = identify("train")
    for t in range(20):
        classes = {}  # episode label -> the TFDS labels of its images
        for x, y in ((x_s[t], y_s[t]), (x_q[t], y_query[t])):
            for image, label in zip(x, y, strict=True):
                classes.setdefault(int(label), set()).add(
                    known[np.rint(image * 255).astype(np.uint8).tobytes()][0]
                )
        assert sorted(classes) == [0, 1, 2, 3] and all(len(c) == 1 for c in classes.values()), classes
        assert set.union(*classes.values()) <= {6, 7, 8, 9} and len(set.union(*classes.values())) == 4
    # the reported accuracy is that of the saved predictions (no above-chance check: the images are
    # random, and a net after 1 step already scores ~0.37 on them, so it would not show learning)
    np.testing.assert_allclose(accuracy["mean"], np.mean(f.argmax(-1) == y_query), rtol=1e-6)
    # sample draws regression functions: refused for a classifier, in one line that says what to use
    assert main(["sample", str(tmp_path / "run")]) == 2
    assert "classification family; predict with bayesmeta.open_run" in capsys.readouterr().err
