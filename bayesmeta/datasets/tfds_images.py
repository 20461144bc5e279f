"""Images and labels of any prepared TFDS image-classification dataset (the `tfds_images` family's data).

The dataset is opened with `tfds.builder(name, data_dir=...)`: a builder registered with TFDS (e.g.
"mnist") or, for a builder of the user's own that is not imported, the prepared files alone. It must
already be prepared in `data_dir` as array_record: it is read with `as_data_source`, which decodes
images with PIL and needs no TensorFlow, and nothing is ever downloaded or prepared here.

Preparing a dataset of one's own without TensorFlow works when its image feature receives PIL images,
encoded PNG/JPEG bytes or file paths (TFDS encodes those itself; NumPy arrays go through
tf.image.encode_png), or when images are stored as a uint8 `tfds.features.Tensor` (as
bayesmeta/datasets/omniglot.py does), with `file_format="array_record"`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bayesmeta.datasets import one_line
from bayesmeta.datasets.omniglot import data_dir as configured_data_dir

CHUNK = 1024  # records decoded per read


class ImageDataError(ValueError):
    """A dataset that is not prepared or not usable; `key` names the parameter to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Images:
    """Every image of a split at size x size, uint8 (M, size, size, channels), with its label (M,)."""

    images: np.ndarray
    labels: np.ndarray


def resolve_data_dir(configured: str = "") -> str:
    """The configured directory, else $BAYESMETA_DATA_DIR, else TFDS's default ($TFDS_DATA_DIR or
    ~/tensorflow_datasets)."""
    import tensorflow_datasets as tfds

    return configured_data_dir(configured) or os.path.expanduser(tfds.core.constants.DATA_DIR)


def prepared_builder(name: str, data_dir: str) -> object:
    """The TFDS builder of a dataset prepared in data_dir; anything else is an ImageDataError saying
    how to prepare it (it is never downloaded here)."""
    import tensorflow_datasets as tfds

    how = (
        f"prepare it once as array_record (nothing is downloaded at run time), e.g. `tfds build {name} "
        f"--data_dir={data_dir} --file_format=array_record`, or your builder's "
        f"download_and_prepare() with file_format='array_record'"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ImageDataError("name", f"TFDS dataset {name!r} is not prepared in {data_dir}; {how}") from None
    except ValueError as e:
        raise ImageDataError("name", f"TFDS dataset {name!r} in {data_dir}: {one_line(e)}") from None
    if not builder.is_prepared():
        raise ImageDataError("name", f"TFDS dataset {name!r} is not prepared in {data_dir}; {how}")
    return builder


def _source(builder: object, name: str, split: str) -> object:
    """The array_record data source of one split expression."""
    try:
        return builder.as_data_source(split)
    except NotImplementedError:
        raise ImageDataError(
            "name",
            f"TFDS dataset {name!r} in {builder.data_dir} is not stored as array_record, the format read "
            f"without TensorFlow; prepare it again with file_format='array_record'",
        ) from None
    except (ValueError, KeyError, AssertionError) as e:
        splits = sorted(builder.info.splits)
        message = f"{split!r} of TFDS dataset {name!r} (splits {splits}): {one_line(e)}"
        raise ImageDataError("split", message) from None


def to_size(image: np.ndarray, size: int, grey: bool) -> np.ndarray:
    """An image (h, w) or (h, w, c) as (size, size, c'): one grey channel (PIL's luma of RGB) when
    `grey`, else its own channels; each channel resized with Lanczos (stretched if not square)."""
    from PIL import Image

    a = image[..., None] if image.ndim == 2 else image
    if grey and a.shape[-1] >= 3:
        a = np.asarray(Image.fromarray(a[..., :3]).convert("L"))[..., None]
    elif grey:
        a = a[..., :1]  # grey, or grey and alpha
    if a.shape[:2] == (size, size):
        return a
    resized = [
        Image.fromarray(a[..., i]).resize((size, size), Image.Resampling.LANCZOS) for i in range(a.shape[-1])
    ]
    return np.stack([np.asarray(r) for r in resized], -1)


def _check_record(name: str, image_key: str, image: np.ndarray, label_key: str, label: np.ndarray) -> None:
    """An ImageDataError unless the record holds a uint8 image (h, w[, c]) and an integer label."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ImageDataError(
            "image_key",
            f"feature {image_key!r} of TFDS dataset {name!r} decodes to {image.dtype} {image.shape}; "
            "expected uint8 images (h, w) or (h, w, c)",
        )
    if label.ndim or label.dtype.kind not in "iu":
        raise ImageDataError(
            "label_key",
            f"feature {label_key!r} of TFDS dataset {name!r} decodes to {label.dtype} {label.shape}; "
            "expected an integer class label",
        )


@lru_cache(maxsize=4)
def read(
    name: str, data_dir: str, split: str, size: int, grey: bool, image_key: str, label_key: str
) -> Images:
    """Every image of a split of a prepared dataset, resized, with its label: read once per process."""
    builder = prepared_builder(name, data_dir)
    features = builder.info.features
    for key, feature in (("image_key", image_key), ("label_key", label_key)):
        if feature not in features:
            raise ImageDataError(
                key, f"TFDS dataset {name!r} has no feature {feature!r}; its features are {sorted(features)}"
            )
    source = _source(builder, name, split)
    images, labels = [], []
    for begin in range(0, len(source), CHUNK):
        for record in source.__getitems__(list(range(begin, min(begin + CHUNK, len(source))))):
            image, label = np.asarray(record[image_key]), np.asarray(record[label_key])
            _check_record(name, image_key, image, label_key, label)
            images.append(to_size(image, size, grey))
            labels.append(int(label))
    if not images:
        raise ImageDataError("split", f"{split!r} of TFDS dataset {name!r} holds no images")
    return Images(np.stack(images), np.array(labels, np.int64))
