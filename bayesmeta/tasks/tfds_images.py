"""N-way K-shot episodes from any prepared TFDS image-classification dataset (what learn2learn's
TaskDataset does for torch datasets), drawn on device from images held in memory.

Options (`[task.params]`):

- `name`, `data_dir`: the TFDS dataset (e.g. "mnist", or the name of a builder of one's own) and the
  directory it is prepared in (else $BAYESMETA_DATA_DIR, else TFDS's default). It must be prepared
  there as array_record; nothing is downloaded (bayesmeta/datasets/tfds_images.py says how to prepare).
- `split`: the TFDS split expression whose images this family uses ("train", "test", "train[:80%]",
  "train+test"); `classes = [start, stop]` keeps the labels start..stop-1 ([] keeps all). Meta-train
  and meta-test on disjoint classes by giving [task] and [eval.task] different `classes` (and, if
  wanted, different splits).
- `ways` (N); `task.shots` (K) and `task.queries` (Q) count per class.
- `image_size`: images are resized (Lanczos; stretched if not square) to image_size x image_size.
- `channels = "grey"` (one channel, PIL's luma; what model.net.kind = "conv4" reads) or `"keep"` (the
  dataset's own channels, for an MLP).
- `image_key`, `label_key`: the features holding the image (uint8) and the integer class label.

Episodes: x (T, N*K, s*s*c) and (T, N*Q, s*s*c) with pixels / 255 in [0, 1], flattened (row, column,
channel); y the labels 0..N-1 in class order. A task takes N distinct classes and, per class, K + Q
distinct images in random order (no image is both a support and a query); info["classes"] (T, N) holds
the classes as indices into `class_labels` (the kept TFDS labels, sorted), label j being column j.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.config import opt
from bayesmeta.datasets import groups
from bayesmeta.datasets import tfds_images as data
from bayesmeta.tasks.base import TaskBatch
from bayesmeta.tasks.episodes import device, draw_members, episode, pick_classes


@dataclass(frozen=True)
class TFDSImages:
    """N-way episodes of a TFDS image-classification dataset (see the module docstring)."""

    @dataclass(frozen=True)
    class Params:
        name: str = opt("", doc="TFDS dataset name, e.g. 'mnist' or a builder of your own")
        data_dir: str = opt("", doc="TFDS data directory (else $BAYESMETA_DATA_DIR or TFDS's default)")
        split: str = opt("train", doc="TFDS split expression, e.g. 'train', 'test', 'train[:80%]'")
        classes: tuple[int, ...] = opt((), ge=0, doc="[start, stop]: keep labels start..stop-1; [] = all")
        ways: int = opt(5, ge=2, doc="classes per task (N)")
        image_size: int = opt(28, ge=4, le=512, doc="images are resized to this side")
        channels: str = opt("grey", choices=["grey", "keep"], doc="one grey channel or the dataset's own")
        image_key: str = opt("image", doc="feature holding the image")
        label_key: str = opt("label", doc="feature holding the class label")

    params: Params
    shots: int
    queries: int

    @cached_property
    def _read(self) -> data.Images:
        p = self.params
        return data.read(
            p.name,
            data.resolve_data_dir(p.data_dir),
            p.split,
            p.image_size,
            p.channels == "grey",
            p.image_key,
            p.label_key,
        )

    @cached_property
    def _groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(order, class_labels, start, count) of the kept images, grouped by label (groups())."""
        labels, classes = self._read.labels, self.params.classes
        kept = (
            np.flatnonzero((labels >= classes[0]) & (labels < classes[1]))
            if classes
            else np.arange(len(labels))
        )
        order, unique, start, count = groups(labels[kept])
        return kept[order], unique, start, count

    @property
    def class_labels(self) -> np.ndarray:
        """The TFDS label of each class index (the kept labels, sorted)."""
        return self._groups[1]

    @property
    def x_dim(self) -> int:
        return int(np.prod(self._read.images.shape[1:]))

    @property
    def y_dim(self) -> int:
        return self.params.ways

    @property
    def query_points(self) -> int:
        return self.params.ways * self.queries

    @property
    def n_classes(self) -> int:
        return len(self.class_labels)

    def check(self) -> str | None:
        p, need = self.params, self.shots + self.queries
        if not p.name:
            return "params.name: expected a TFDS dataset name, e.g. 'mnist'"
        if p.classes and (len(p.classes) != 2 or p.classes[0] >= p.classes[1]):
            return f"params.classes: expected [] or [start, stop] with start < stop, got {list(p.classes)}"
        try:
            n_classes = self.n_classes
        except data.ImageDataError as e:
            return f"params.{e.key}: {e}"
        kept = f"classes in split {p.split!r}" + (
            f" with labels in [{p.classes[0]}, {p.classes[1]})" if p.classes else ""
        )
        if p.ways > n_classes:
            return f"params.ways: expected <= {n_classes} ({kept} of {p.name!r}), got {p.ways}"
        count = self._groups[3]
        if (count < need).any():
            return (
                f"shots: {int((count < need).sum())} of the {n_classes} {kept} of {p.name!r} have fewer "
                f"than shots + queries = {need} images (fewest: {int(count.min())})"
            )
        return None

    @cached_property
    def _device(self) -> dict[str, jax.Array]:
        """The kept images on device, class after class (class i at start[i], count[i] images)."""
        order, _, start, count = self._groups
        arrays = {
            "images": self._read.images[order],
            "start": start.astype(np.int32),
            "count": count.astype(np.int32),
        }
        return {k: device(v) for k, v in arrays.items()}

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        return draw_episodes(key, self._device, n_tasks, self.params.ways, self.shots, self.queries)


@partial(jax.jit, static_argnums=(2, 3, 4, 5))
def draw_episodes(
    key: jax.Array, d: dict[str, jax.Array], n_tasks: int, ways: int, shots: int, queries: int
) -> TaskBatch:
    """n_tasks N-way episodes from the grouped images `d` (TFDSImages._device); jitted as one
    computation, since the engine also samples eagerly."""
    kc, kd = jax.random.split(key)
    classes = pick_classes(kc, n_tasks, d["count"].shape[0], ways)
    index = draw_members(kd, d["start"], d["count"], classes, shots + queries)  # (T, N, K+Q)
    x = d["images"][index].reshape(*index.shape, -1).astype(jnp.float32) / 255.0
    return episode(x, shots, classes)
