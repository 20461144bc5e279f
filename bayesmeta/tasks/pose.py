"""Pose regression on Omniglot characters: the structure of Yin et al.'s (2020) Pascal3D pose tasks
(their section 4.2) rebuilt on images we have.

Every character k has a hidden canonical angle c_k ~ U[0, 2 pi), drawn once per character (by its global
label) from `canonical_seed`. A task is one character; its inputs are that character's images rotated by
angles r ~ U[0, 2 pi) (counter-clockwise on screen, bilinear resampling about the centre, blank ink
outside; `drawers = "one"` rotates one drawer's image, as the paper renders one object, "random" draws
each image's drawer, "fixed" always rotates the character's first drawer's image, so that a character
has one appearance up to rotation, as a rendered object has), and its targets are the angles relative to
the canonical one, r - c_k, given as the unit vector y = (cos(r - c_k), sin(r - c_k)) (y_dim 2; the
model predicts (cos, sin) under the Gaussian likelihood, i.e. a squared loss on the 2-vector).
Characters are split by alphabet: `split = "test"` uses the `held_out` alphabets, "validation" the
`validation` ones (for choosing hyper-parameters), "train" the rest (or `characters` of them, a fixed
random subset, to make memorizing them easier: the paper trains on 50 objects); with the full source the
evaluation set is the test split. A network that memorizes each training character's canonical angle
from its appearance can solve training tasks without their support sets, and fails on held-out
characters unless it uses them.

Scores (TaskMetrics) beside the likelihood's MSE of (cos, sin):

  angle_mse   mean over query points of (10 / (2 pi) * wrap(atan2(f) - atan2(y)))^2: the squared angle
              error in the reference's label units (pose_data/data_gen.py divides the angle by 2 pi,
              pose_code/maml_bbb.py get_batch multiplies by 10, so one unit is a tenth of a turn, 36
              degrees), taken the short way round the circle (the reference's scalar label is not
              wrapped); wrap maps to [-pi, pi). A prediction independent of the truth scores 100/12 = 8.33.
  angle_error mean absolute wrapped error in degrees.

Counterfactual tasks (the memorization meter): the same images with every target turned by one
delta ~ U[0, 2 pi) per task, which is the task of the same character under canonical angle c_k - delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, partial

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.config import opt
from bayesmeta.datasets import omniglot as data
from bayesmeta.tasks.base import TaskBatch
from bayesmeta.tasks.episodes import device
from bayesmeta.tasks.omniglot import DRAWERS, affine_matrix, warp

UNITS_PER_TURN = 10.0  # the reference's label scale: angle / (2 pi) * 10


def canonical_angles(n_characters: int, seed: int) -> np.ndarray:
    """c_k ~ U[0, 2 pi) for every global character label k = 0..n-1, from `seed` alone."""
    return np.random.default_rng(seed).uniform(0.0, 2 * math.pi, n_characters)


def rotate_image(image: jax.Array, angle: jax.Array) -> jax.Array:
    """The image (s, s) turned by `angle` radians counter-clockwise on screen about its centre (bilinear,
    0 outside): omniglot.warp with A = R(angle) in (row, column) coordinates."""
    a = affine_matrix(angle, jnp.zeros(2, image.dtype), jnp.ones(2, image.dtype))
    return warp(image, a, jnp.zeros(2, image.dtype))


def unit(angle: jax.Array) -> jax.Array:
    """(cos a, sin a) on a new last axis."""
    return jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)


def wrap(angle: jax.Array) -> jax.Array:
    """angle mapped to [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def angle_metrics(mean: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Per-task angle_mse (reference units, a tenth of a turn) and angle_error (degrees) of predicted
    (cos, sin) means (T, n, 2) against the targets (T, n, 2), wrapped errors (module docstring)."""
    err = wrap(jnp.arctan2(mean[..., 1], mean[..., 0]) - jnp.arctan2(y[..., 1], y[..., 0]))
    return {
        "angle_mse": jnp.mean(jnp.square(err * UNITS_PER_TURN / (2 * math.pi)), -1),
        "angle_error": jnp.mean(jnp.abs(jnp.rad2deg(err)), -1),
    }


@dataclass(frozen=True)
class OmniglotPose:
    """Omniglot pose tasks (module docstring): x (T, n, s*s) rotated ink in [0, 1], y (T, n, 2) the
    (cos, sin) of the angle relative to the character's canonical angle; info holds "character"
    (global label, T), "canonical" (T) and "rotation" (T, shots + queries) in radians."""

    @dataclass(frozen=True)
    class Params:
        source: str = opt("minimal", choices=["minimal", "full"], doc="archives: minimal or full sets")
        split: str = opt(
            "train",
            choices=["train", "validation", "test"],
            doc="meta-train, validation or held-out alphabets",
        )
        held_out: tuple[str, ...] = opt(
            ("Early_Aramaic", "Korean"), doc="minimal source: alphabets kept for meta-test"
        )
        validation: tuple[str, ...] = opt(
            ("Greek",), doc="alphabets kept out of meta-training for choosing hyper-parameters"
        )
        canonical_seed: int = opt(0, ge=0, doc="seed of the characters' hidden canonical angles")
        drawers: str = opt(
            "one",
            choices=["one", "random", "fixed"],
            doc="a task rotates one drawer's image, each image's own, or always the character's first",
        )
        characters: int = opt(
            0, ge=0, doc="train split: only this many characters, a fixed random subset (0: all of them)"
        )
        noise_sd: float = opt(0.0, ge=0, doc="sd of Gaussian noise on the targets (cos, sin)")
        image_size: int = opt(28, ge=4, le=105, doc="images are resized to this side")
        archives: str = opt("", doc="directory of the Omniglot zip files (else $BAYESMETA_OMNIGLOT_DIR)")
        data_dir: str = opt("", doc="TFDS data directory (else $BAYESMETA_DATA_DIR or TFDS's default)")

    params: Params
    shots: int
    queries: int
    y_dim: int = 2

    @property
    def x_dim(self) -> int:
        return self.params.image_size**2

    @cached_property
    def _characters(self) -> data.Characters:
        p = self.params
        return data.characters(p.source, p.image_size, p.archives, p.data_dir)

    @cached_property
    def split_labels(self) -> np.ndarray:
        """The global labels of the split's characters, sorted."""
        c, p = self._characters, self.params
        test = c.subset == "evaluation" if p.source == "full" else np.isin(c.alphabet, p.held_out)
        val = np.isin(c.alphabet, p.validation) & ~test
        keep = {"test": test, "validation": val, "train": ~test & ~val}[p.split]
        labels = np.unique(c.label[keep])
        if p.split == "train" and 0 < p.characters < len(labels):
            pick = np.random.default_rng(p.canonical_seed).permutation(len(labels))[: p.characters]
            labels = np.sort(labels[pick])
        return labels

    @cached_property
    def canonical(self) -> np.ndarray:
        """Every character's canonical angle, indexed by global label (the same in every split)."""
        return canonical_angles(int(self._characters.label.max()) + 1, self.params.canonical_seed)

    @cached_property
    def _device(self) -> dict[str, jax.Array]:
        c = self._characters
        pool = np.stack([np.flatnonzero(c.label == lab) for lab in self.split_labels]).astype(np.int32)
        arrays = {
            "images": c.images,
            "pool": pool,
            "labels": self.split_labels.astype(np.int32),
            "canonical": self.canonical[self.split_labels].astype(np.float32),
        }
        return {k: device(v) for k, v in arrays.items()}

    @property
    def n_characters(self) -> int:
        return len(self.split_labels)

    def check(self) -> str | None:
        p = self.params
        alphabets = sorted(set(self._characters.alphabet.tolist()))
        for name in ("held_out", "validation"):
            unknown = [a for a in getattr(p, name) if a not in alphabets]
            if unknown and not (name == "held_out" and p.source == "full"):
                return f"params.{name}: unknown alphabets {unknown}; the {p.source} source has {alphabets}"
        if self.n_characters == 0:
            return f"params.split: no characters in the {p.split!r} split"
        if p.split == "train" and p.characters > self.n_characters:
            return f"params.characters: at most {self.n_characters}, the train split's characters"
        return None

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p = self.params
        return draw_pose_tasks(key, self._device, n_tasks, self.shots, self.queries, p.drawers, p.noise_sd)

    def task_metrics(self, mean: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        return angle_metrics(mean, y)

    def counterfactual(self, key: jax.Array, tasks: TaskBatch) -> tuple[TaskBatch, jax.Array]:
        """Every task's targets turned by its own delta ~ U[0, 2 pi): the same character's task under
        canonical angle c - delta; the truth at the query inputs is unit(r* - c + delta)."""
        delta = jax.random.uniform(key, (tasks.n_tasks,), maxval=2 * math.pi)
        c, y = jnp.cos(delta)[:, None], jnp.sin(delta)[:, None]
        ys = tasks.y_support
        turned = jnp.stack([c * ys[..., 0] - y * ys[..., 1], y * ys[..., 0] + c * ys[..., 1]], -1)
        info = {**tasks.info, "canonical": tasks.info["canonical"] - delta}
        truth = unit(tasks.info["rotation"][:, self.shots :] - info["canonical"][:, None])
        return tasks._replace(y_support=turned, y_query=None, info=info), truth


@partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def draw_pose_tasks(
    key: jax.Array,
    d: dict[str, jax.Array],
    n_tasks: int,
    shots: int,
    queries: int,
    drawers: str,
    noise_sd: float,
) -> TaskBatch:
    """n_tasks pose tasks from the split's device arrays `d` (OmniglotPose._device), one jitted
    computation (the rotations are an affine resample)."""
    kc, kd, kr, ke = jax.random.split(key, 4)
    n = shots + queries
    char = jax.random.randint(kc, (n_tasks,), 0, d["pool"].shape[0])
    if drawers == "fixed":  # the character's first drawer
        drawer = jnp.zeros((n_tasks, n), jnp.int32)
    else:
        shape = (n_tasks, 1) if drawers == "one" else (n_tasks, n)
        drawer = jnp.broadcast_to(jax.random.randint(kd, shape, 0, DRAWERS), (n_tasks, n))
    images = d["images"][d["pool"][char[:, None], drawer]].astype(jnp.float32) / 255.0  # (T, n, s, s)
    rotation = jax.random.uniform(kr, (n_tasks, n), maxval=2 * math.pi)
    rotated = jax.vmap(rotate_image)(images.reshape(-1, *images.shape[-2:]), rotation.reshape(-1))
    x = rotated.reshape(n_tasks, n, -1)
    canonical = d["canonical"][char]
    y = unit(rotation - canonical[:, None])
    if noise_sd > 0:
        y = y + noise_sd * jax.random.normal(ke, y.shape)
    info = {"character": d["labels"][char], "canonical": canonical, "rotation": rotation}
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], info)
