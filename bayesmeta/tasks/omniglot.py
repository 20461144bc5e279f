"""N-way K-shot Omniglot episodes drawn on device from images held in memory (METHODS 2 and 4).

Each character (optionally each of its four 90-degree rotations, MAML's augmentation) is a class.
Characters are split by alphabet: the minimal source keeps `held_out` alphabets for meta-test, the
full source meta-trains on the background set and tests on the evaluation set. A task picks N classes
and, per class, K support and Q query drawers without replacement, so no query image is in the
support set. Labels are either shuffled per task ("standard") or fixed per class ("nme": each training
class keeps one label in 0..N-1 across tasks, so a network can memorize them, Yin et al. 2020).

`distort` augments the meta-training split with Koch et al.'s (2015) random affine distortions, drawn
per image on device: rotation theta in [-10, 10] degrees, shears rho_x, rho_y in [-0.3, 0.3], scales
s_x, s_y in [0.8, 1.2] and translations t_x, t_y in [-2, 2] pixels of their 105-pixel images (scaled to
image_size), each component included with probability 1/2; images are resampled bilinearly about their
centre with blank ink outside. The held-out split (split = "test") is never distorted, so an [eval.task]
that inherits the option still tests on the original images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from bayesmeta.config import opt
from bayesmeta.datasets import omniglot as data
from bayesmeta.tasks.base import TaskBatch
from bayesmeta.tasks.episodes import device, episode, pick_classes

DRAWERS = 20  # every Omniglot character is drawn by 20 people
NME_SEED = 0  # the fixed class-to-label assignment of the nme regime
ARCHIVE_SIDE = 105  # the archives' image side, in whose pixels Koch et al. give their translations
DISTORTIONS = {"rotation": 10.0, "shear": 0.3, "scale": (0.8, 1.2), "translation": 2.0, "p": 0.5}
"""Koch et al. (2015): theta in [-10, 10] degrees, rho in [-0.3, 0.3], s in [0.8, 1.2], t in [-2, 2]
pixels (at 105 x 105), each component of the transformation included with probability 0.5."""


def rotate(images: jax.Array, k: jax.Array) -> jax.Array:
    """images (..., s, s) rotated by k (...) quarter turns counter-clockwise, k traced."""
    turns = jnp.stack([jnp.rot90(images, i, axes=(-2, -1)) for i in range(4)])
    return jnp.take_along_axis(turns, k[None, ..., None, None], 0)[0]


def affine_matrix(theta: jax.Array, rho: jax.Array, scale: jax.Array) -> jax.Array:
    """A = R(theta) [[1, rho_x], [rho_y, 1]] diag(s_x, s_y) in (row, column) coordinates: rotation by
    theta radians, shear rho (2,), scale (2,); leading axes are broadcast: (..., 2, 2)."""
    c, s = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)
    one = jnp.ones_like(rho[..., 0])
    shear = jnp.stack([jnp.stack([one, rho[..., 0]], -1), jnp.stack([rho[..., 1], one], -1)], -2)
    return rot @ shear @ (scale[..., None, :] * jnp.eye(2))


def warp(image: jax.Array, a: jax.Array, t: jax.Array) -> jax.Array:
    """The image (s, s) moved by p -> A (p - centre) + centre + t (pixel coordinates (row, column)):
    out(p) = image(A^-1 (p - centre - t) + centre), bilinear, 0 outside the image."""
    side = image.shape[-1]
    centre = (side - 1) / 2.0
    grid = jnp.stack(jnp.meshgrid(jnp.arange(side), jnp.arange(side), indexing="ij"), 0).astype(image.dtype)
    src = jnp.einsum("ij,jhw->ihw", jnp.linalg.inv(a), grid - centre - t[:, None, None]) + centre
    return jax.scipy.ndimage.map_coordinates(image, [src[0], src[1]], order=1, mode="constant", cval=0.0)


def random_affine(key: jax.Array, shape: tuple[int, ...], side: int) -> tuple[jax.Array, jax.Array]:
    """Koch et al.'s random distortion (DISTORTIONS) for `shape` images of `side` pixels: matrices
    (*shape, 2, 2) and translations (*shape, 2) in pixels; each of the four components (rotation,
    shear, scale, translation) is drawn with probability p, else the identity."""
    d = DISTORTIONS
    k = jax.random.split(key, 5)
    on = jax.random.bernoulli(k[0], d["p"], (4, *shape))
    theta = jnp.deg2rad(jax.random.uniform(k[1], shape, minval=-d["rotation"], maxval=d["rotation"]))
    rho = jax.random.uniform(k[2], (*shape, 2), minval=-d["shear"], maxval=d["shear"])
    scale = jax.random.uniform(k[3], (*shape, 2), minval=d["scale"][0], maxval=d["scale"][1])
    shift = d["translation"] * side / ARCHIVE_SIDE
    t = jax.random.uniform(k[4], (*shape, 2), minval=-shift, maxval=shift)
    a = affine_matrix(
        jnp.where(on[0], theta, 0.0),
        jnp.where(on[1][..., None], rho, 0.0),
        jnp.where(on[2][..., None], scale, 1.0),
    )
    return a, jnp.where(on[3][..., None], t, 0.0)


def distort(key: jax.Array, images: jax.Array) -> jax.Array:
    """Every image of images (..., s, s) under its own random affine distortion (random_affine)."""
    flat = images.reshape(-1, *images.shape[-2:])
    a, t = random_affine(key, flat.shape[:1], images.shape[-1])
    return jax.vmap(warp)(flat, a, t).reshape(images.shape)


@dataclass(frozen=True)
class Omniglot:
    """Omniglot episodes: x (T, N*n, s*s) ink in [0, 1], y (T, N*n) class labels; shots and queries
    are per class; info["classes"] (T, N) holds the split's class ids (label j is column j)."""

    @dataclass(frozen=True)
    class Params:
        source: str = opt("minimal", choices=["minimal", "full"], doc="archives: minimal or full sets")
        split: str = opt("train", choices=["train", "test"], doc="meta-train or held-out alphabets")
        held_out: tuple[str, ...] = opt(
            ("Early_Aramaic", "Korean"), doc="minimal source: alphabets kept for meta-test"
        )
        ways: int = opt(5, ge=2, doc="classes per task (N)")
        labels: str = opt("standard", choices=["standard", "nme"], doc="shuffled per task or fixed")
        rotations: bool = opt(True, doc="rotations by 90, 180, 270 degrees are extra classes")
        image_size: int = opt(28, ge=4, le=105, doc="images are resized to this side")
        distort: bool = opt(False, doc="Koch et al.'s random affine distortions (train split only)")
        archives: str = opt("", doc="directory of the Omniglot zip files (else $BAYESMETA_OMNIGLOT_DIR)")
        data_dir: str = opt("", doc="TFDS data directory (else $BAYESMETA_DATA_DIR or TFDS's default)")

    params: Params
    shots: int
    queries: int

    @property
    def x_dim(self) -> int:
        return self.params.image_size**2

    @property
    def y_dim(self) -> int:
        return self.params.ways

    @property
    def query_points(self) -> int:
        return self.params.ways * self.queries

    @cached_property
    def _characters(self) -> data.Characters:
        p = self.params
        return data.characters(p.source, p.image_size, p.archives, p.data_dir)

    @cached_property
    def _split_labels(self) -> np.ndarray:
        """The split's character labels, sorted."""
        c, p = self._characters, self.params
        # the full source tests on its evaluation set, the minimal one on the held-out alphabets
        keep = c.subset == "evaluation" if p.source == "full" else np.isin(c.alphabet, p.held_out)
        keep = keep if p.split == "test" else ~keep
        return np.unique(c.label[keep])

    @cached_property
    def _pool(self) -> jax.Array:
        """(characters, 20) image indices of the split's characters, drawer order."""
        c = self._characters
        rows = [np.flatnonzero(c.label == lab) for lab in self._split_labels]
        return device(np.stack(rows).astype(np.int32))

    @cached_property
    def _images(self) -> jax.Array:
        return device(self._characters.images)

    @property
    def n_characters(self) -> int:
        return int(self._pool.shape[0])

    @property
    def n_classes(self) -> int:
        return self.n_characters * (4 if self.params.rotations else 1)

    @cached_property
    def _nme_groups(self) -> jax.Array:
        """(N, G): the classes holding label j in the nme regime, a fixed random partition (the
        n_classes mod N classes left over are not used)."""
        n, g = self.params.ways, self.n_classes // self.params.ways
        perm = np.random.default_rng(NME_SEED).permutation(self.n_classes)[: n * g]
        return device(perm.reshape(g, n).T.astype(np.int32))

    def check(self) -> str | None:
        p = self.params
        if self.shots + self.queries > DRAWERS:
            return f"shots: shots + queries must be <= {DRAWERS} drawers, got {self.shots} + {self.queries}"
        alphabets = sorted(set(self._characters.alphabet.tolist()))
        unknown = [a for a in p.held_out if a not in alphabets]
        if unknown and p.source == "minimal":
            return f"params.held_out: unknown alphabets {unknown}; the {p.source} source has {alphabets}"
        if p.ways > self.n_classes:
            return f"params.ways: expected <= {self.n_classes} classes in the {p.split} split, got {p.ways}"
        return None

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        p, n = self.params, self.params.ways
        kc, kd = jax.random.split(key)
        if p.labels == "nme":
            pick = jax.random.randint(kc, (n_tasks, n), 0, self._nme_groups.shape[1])
            classes = self._nme_groups[jnp.arange(n)[None], pick]
        else:
            classes = pick_classes(kc, n_tasks, self.n_classes, n)
        turns = 4 if p.rotations else 1
        per_class = self.shots + self.queries
        order = jnp.argsort(jax.random.uniform(kd, (n_tasks, n, DRAWERS)), -1)[..., :per_class]
        index = self._pool[(classes // turns)[..., None], order]  # (T, N, K+Q)
        images = rotate(self._images[index], jnp.broadcast_to((classes % turns)[..., None], index.shape))
        images = images.astype(jnp.float32)
        if p.distort and p.split == "train":
            images = distort(jax.random.fold_in(key, 1), images)
        x = images.reshape(n_tasks, n, per_class, -1) / 255.0
        return episode(x, self.shots, classes)


@dataclass(frozen=True)
class OmniglotRuns:
    """Lake's 20 within-alphabet 20-way one-shot runs (fixed tasks; the key is ignored): task i is run
    i mod 20, support = the 20 training images in class order, query = the 20 test items with their
    answer-key labels."""

    @dataclass(frozen=True)
    class Params:
        image_size: int = opt(28, ge=4, le=105, doc="images are resized to this side")
        archives: str = opt("", doc="directory of all_runs.zip (else $BAYESMETA_OMNIGLOT_DIR)")
        data_dir: str = opt("", doc="TFDS data directory (else $BAYESMETA_DATA_DIR or TFDS's default)")

    params: Params
    shots: int
    queries: int
    y_dim: int = 20

    @property
    def x_dim(self) -> int:
        return self.params.image_size**2

    @property
    def query_points(self) -> int:
        return self.y_dim

    @property
    def n_classes(self) -> int:
        """Each run has its own 20 classes."""
        return self.y_dim * self._runs.support.shape[0]

    @cached_property
    def _runs(self) -> data.Runs:
        p = self.params
        return data.runs(p.image_size, p.archives, p.data_dir)

    def check(self) -> str | None:
        if (self.shots, self.queries) != (1, 1):
            return "shots: Lake's runs are 1-shot with 1 query per class; set shots = queries = 1"
        return None

    def sample(self, key: jax.Array, n_tasks: int) -> TaskBatch:
        r = self._runs
        idx = np.arange(n_tasks) % r.support.shape[0]
        flat = lambda a: jnp.asarray(a[idx].reshape(n_tasks, a.shape[1], -1), jnp.float32) / 255.0  # noqa: E731
        y_s = jnp.broadcast_to(jnp.arange(self.y_dim, dtype=jnp.int32), (n_tasks, self.y_dim))
        info = {"run": jnp.asarray(idx + 1, jnp.int32)}
        return TaskBatch(flat(r.support), y_s, flat(r.query), jnp.asarray(r.answer[idx]), info)
