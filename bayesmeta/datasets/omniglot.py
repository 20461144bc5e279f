"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015) as a TFDS dataset built from local archives.

Three builder configs: "minimal" (the background sets small1 and small2), "full" (the 964-character
background and 659-character evaluation sets) and "runs" (Lake's 20 within-alphabet 20-way one-shot
runs with their answer key). Records are written as array_record and read with `tfds.data_source`, so
neither preparing nor reading needs TensorFlow. Nothing is downloaded: archives are looked for in
task.params.archives, then $BAYESMETA_OMNIGLOT_DIR, then ../shared/data/omniglot next to the project.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
from filelock import FileLock

ARCHIVES = {
    "small1": "images_background_small1.zip",
    "small2": "images_background_small2.zip",
    "background": "images_background.zip",
    "evaluation": "images_evaluation.zip",
    "runs": "all_runs.zip",
}
SPLITS = {"minimal": ("small1", "small2"), "full": ("background", "evaluation"), "runs": ("runs",)}
ENV_ARCHIVES = "BAYESMETA_OMNIGLOT_DIR"
ENV_DATA = "BAYESMETA_DATA_DIR"
SIDE = 105  # the archives' image side in pixels
DEFAULT_DIRS = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot",)


class DataError(RuntimeError):
    """An archive is missing or corrupt; the message names the file and where it was looked for."""


def search_dirs(archives: str = "") -> list[Path]:
    """Where archives are looked for, in order: the configured directory, $BAYESMETA_OMNIGLOT_DIR,
    the project's ../shared/data/omniglot."""
    dirs = [Path(d).expanduser() for d in (archives, os.environ.get(ENV_ARCHIVES, "")) if d]
    return [*dirs, *(d.resolve() for d in DEFAULT_DIRS)]


def find_archive(split: str, dirs: list[Path]) -> Path:
    """The first `dirs` entry holding the split's archive, checked to be a readable zip file."""
    name = ARCHIVES[split]
    for d in dirs:
        path = d / name
        if path.is_file():
            check_archive(path)
            check_layout(path, split)
            return path
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(
        f"Omniglot archive {name} not found; looked in: {looked}. Put it in one of these, or set "
        f"task.params.archives or ${ENV_ARCHIVES} to its directory (nothing is downloaded)."
    )


def check_archive(path: Path) -> None:
    """Raise DataError unless `path` is a zip whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, zlib.error) as e:
        raise DataError(f"Omniglot archive {path} is corrupt ({e}); replace it with an intact copy") from e
    if bad is not None:
        raise DataError(f"Omniglot archive {path} is corrupt (member {bad} fails its CRC check)")


CHARACTER_MEMBER = re.compile(r"[^/]+/[^/]+/[^/]+/\d+_\d+\.png")
"""<set>/<alphabet>/<character>/<LLLL>_<DD>.png in images_background*.zip and images_evaluation.zip."""
RUN_MEMBER = re.compile(r"run\d+/(training/class\d+|test/item\d+)\.png")
"""runNN/training/classCC.png and runNN/test/itemII.png in all_runs.zip."""


def check_layout(path: Path, split: str) -> None:
    """Raise DataError unless every image of the archive sits where the official layout puts it (and,
    for the runs, every test item has an answer in its run's class_labels.txt)."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.lower().endswith(".png")]
        pattern = RUN_MEMBER if split == "runs" else CHARACTER_MEMBER
        example = "runNN/test/itemNN.png" if split == "runs" else "<set>/<alphabet>/<character>/LLLL_DD.png"
        if not names:
            raise DataError(f"Omniglot archive {path} holds no PNG images; expected {example}")
        bad = next((n for n in names if not pattern.fullmatch(n)), None)
        if bad is not None:
            raise DataError(
                f"Omniglot archive {path}: member {bad!r} is not laid out as {example}; "
                "use the official archive unchanged"
            )
        if split == "runs":
            _check_answer_keys(z, path, names)


def _check_answer_keys(z: zipfile.ZipFile, path: Path, names: list[str]) -> None:
    """Every run's class_labels.txt exists and names a class for each of its test items."""
    for run in sorted({n.split("/")[0] for n in names}):
        try:
            text = z.read(f"{run}/class_labels.txt").decode()
            key = {
                Path(item).stem for item, _ in (line.split() for line in text.splitlines() if line.strip())
            }
        except (KeyError, UnicodeDecodeError, ValueError):
            raise DataError(
                f"Omniglot archive {path}: {run}/class_labels.txt is missing or not lines of "
                f"'{run}/test/itemNN.png {run}/training/classNN.png'"
            ) from None
        items = {Path(n).stem for n in names if n.startswith(f"{run}/test/")}
        if not items <= key:
            raise DataError(
                f"Omniglot archive {path}: {run}/class_labels.txt has no answer for {sorted(items - key)[0]}"
            )


def _ink(png: bytes, name: str = "", path: Path | None = None) -> np.ndarray:
    """A 105x105 archive image as a boolean ink mask (True = stroke); a bad image is a DataError."""
    from PIL import Image, UnidentifiedImageError

    try:
        ink = ~np.asarray(Image.open(io.BytesIO(png)).convert("1"), dtype=bool)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"Omniglot archive {path}: member {name} is not a readable PNG image ({type(e).__name__}); "
            "use the official archive unchanged"
        ) from None
    if ink.shape != (SIDE, SIDE):
        raise DataError(
            f"Omniglot archive {path}: member {name} is {ink.shape}, expected {SIDE}x{SIDE} pixels"
        )
    return ink


def character_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(key, record) for every image of a background/evaluation archive:
    <set>/<alphabet>/<character>/<LLLL>_<DD>.png with LLLL the global character index, DD the drawer."""
    with zipfile.ZipFile(path) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".png")):
            _, alphabet, character, file = name.split("/")
            label, drawer = Path(file).stem.split("_")
            record = {
                "image": _ink(z.read(name), name, path),
                "alphabet": alphabet,
                "character": character,
                "label": int(label),
                "drawer": int(drawer),
            }
            yield name, record


def run_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(key, record) for Lake's runs: runNN/training/classCC.png (one per class) and runNN/test/itemII.png
    with `answer` the class CC the answer key (runNN/class_labels.txt) gives the item."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        for run in sorted({n.split("/")[0] for n in names if n.startswith("run")}):
            key = {}
            for line in z.read(f"{run}/class_labels.txt").decode().split("\n"):
                if line.strip():
                    item, cls = line.split()
                    key[Path(item).stem] = int(Path(cls).stem.removeprefix("class"))
            for name in sorted(n for n in names if n.startswith(f"{run}/") and n.endswith(".png")):
                _, role, file = name.split("/")
                stem = Path(file).stem
                index = int(stem.removeprefix("class").removeprefix("item"))
                answer = index if role == "training" else key[stem]
                record = {
                    "image": _ink(z.read(name), name, path),
                    "run": int(run[3:]),
                    "role": role,
                    "index": index,
                }
                yield name, {**record, "answer": answer}


def _builder_class() -> type:
    """The TFDS builder, defined on first use so importing bayesmeta does not import TFDS."""
    import tensorflow_datasets as tfds

    class BayesmetaOmniglot(tfds.core.GeneratorBasedBuilder):
        """Omniglot from the local archives (see the module docstring)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: ClassVar = {"1.0.0": "Minimal, full and runs configs from the official archives."}
        BUILDER_CONFIGS: ClassVar = [
            tfds.core.BuilderConfig(name="minimal", description="background sets small1 and small2"),
            tfds.core.BuilderConfig(name="full", description="full background and evaluation sets"),
            tfds.core.BuilderConfig(name="runs", description="Lake's 20 one-shot runs with answer key"),
        ]
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            f"Copy the official Omniglot archives ({', '.join(ARCHIVES.values())}) into a directory "
            f"and set task.params.archives or ${ENV_ARCHIVES} to it."
        )

        def __init__(self, *, archives: dict[str, Path] | None = None, **kwargs: object) -> None:
            self._archives = archives or {}
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            image = tfds.features.Tensor(
                shape=(SIDE, SIDE), dtype=np.bool_, encoding=tfds.features.Encoding.ZLIB
            )
            if self.builder_config.name == "runs":
                features = {"image": image, "run": np.int32, "role": tfds.features.Text()}
                features |= {"index": np.int32, "answer": np.int32}
            else:
                features = {"image": image, "alphabet": tfds.features.Text()}
                features |= {"character": tfds.features.Text(), "label": np.int32, "drawer": np.int32}
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict(features),
                homepage="https://github.com/brendenlake/omniglot",
                citation="Lake, Salakhutdinov & Tenenbaum (2015), Science 350(6266).",
            )

        def _split_generators(self, dl_manager: object) -> dict:
            records = run_records if self.builder_config.name == "runs" else character_records
            return {split: records(self._archives[split]) for split in SPLITS[self.builder_config.name]}

        def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict]]:  # pragma: no cover
            raise NotImplementedError("_split_generators yields the examples directly")

    return BayesmetaOmniglot


@lru_cache(maxsize=1)
def builder_class() -> type:
    return _builder_class()


def data_dir(configured: str = "") -> str | None:
    """Where prepared datasets live: the configured directory, $BAYESMETA_DATA_DIR, or TFDS's default."""
    d = configured or os.environ.get(ENV_DATA, "")
    return str(Path(d).expanduser()) if d else None


def prepare(config: str, archives: str = "", data: str = "") -> object:
    """The prepared TFDS builder for config "minimal" | "full" | "runs", preparing it from the archives
    when it is not there yet. A prepared dataset is reused without reading the archives, so a missing
    or corrupt archive can never damage it; archives are checked before anything is written. Processes
    preparing the same config at once take turns under a file lock, and all get the one prepared copy."""
    if config not in SPLITS:
        raise ValueError(f"config: expected one of {sorted(SPLITS)}, got {config!r}")
    cls = builder_class()
    builder = cls(config=config, data_dir=data_dir(data), file_format="array_record")
    if builder.is_prepared():
        return builder
    dirs = search_dirs(archives)
    paths = {split: find_archive(split, dirs) for split in SPLITS[config]}
    lock = Path(builder.data_dir).parent.with_suffix(".lock")  # <data>/bayesmeta_omniglot/<config>.lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock, thread_local=False):  # one process prepares; the others wait, then reuse it
        builder = cls(config=config, data_dir=data_dir(data), file_format="array_record", archives=paths)
        if builder.is_prepared():
            return builder
        import tensorflow_datasets as tfds

        tfds.display_progress_bar(sys.stderr.isatty())  # bars on a terminal, not in logs or output
        try:
            builder.download_and_prepare()
        except BaseException:
            _remove_partial(Path(builder.data_dir))
            raise
    return builder


def _remove_partial(version_dir: Path) -> None:
    """Delete what a failed preparation left (an unfinished version folder, TFDS's incomplete.* folders),
    so the next attempt starts clean; a prepared version (with dataset_info.json) is never touched."""
    if version_dir.is_dir() and not (version_dir / "dataset_info.json").is_file():
        shutil.rmtree(version_dir, ignore_errors=True)
    for partial in version_dir.parent.glob(f"incomplete.*_{version_dir.name}"):
        shutil.rmtree(partial, ignore_errors=True)


@dataclass(frozen=True)
class Characters:
    """Images of one or more splits at `size` x `size`: ink in [0, 255] (uint8), with per image its
    alphabet, character label, drawer and the split (archive) it came from."""

    images: np.ndarray
    alphabet: np.ndarray
    label: np.ndarray
    drawer: np.ndarray
    subset: np.ndarray


def resize(ink: np.ndarray, size: int) -> np.ndarray:
    """A boolean ink mask down-sampled to size x size grey levels (Lanczos, as in MAML's preprocessing)."""
    from PIL import Image

    if ink.shape == (size, size):
        return ink.astype(np.uint8) * 255
    return np.asarray(Image.fromarray(ink.astype(np.uint8) * 255).resize((size, size), Image.LANCZOS))


@lru_cache(maxsize=4)
def characters(config: str, size: int = 28, archives: str = "", data: str = "") -> Characters:
    """Every image of the config's splits once (small1 and small2 share the Greek and Latin images),
    sorted by (alphabet, character, drawer); `label` numbers the distinct characters in that order."""
    if config not in ("minimal", "full"):
        raise ValueError(f"characters: expected config 'minimal' or 'full', got {config!r}")
    builder = prepare(config, archives, data)
    seen: dict[tuple[str, str, int], tuple] = {}
    for split in SPLITS[config]:
        source = builder.as_data_source(split)
        for i in range(len(source)):
            r = source[i]
            key = (_text(r["alphabet"]), _text(r["character"]), int(r["drawer"]))
            seen.setdefault(key, (r["image"], split))
    keys = sorted(seen)
    names = sorted({k[:2] for k in keys})
    label = {name: i for i, name in enumerate(names)}
    return Characters(
        images=np.stack([resize(seen[k][0], size) for k in keys]),
        alphabet=np.array([k[0] for k in keys]),
        label=np.array([label[k[:2]] for k in keys], np.int32),
        drawer=np.array([k[2] for k in keys], np.int32),
        subset=np.array([seen[k][1] for k in keys]),
    )


@dataclass(frozen=True)
class Runs:
    """Lake's runs as arrays: support (R, 20, s, s) in class order 1..20, query (R, 20, s, s) in item
    order, and the answer (R, 20): the 0-based support class of each query."""

    support: np.ndarray
    query: np.ndarray
    answer: np.ndarray


@lru_cache(maxsize=2)
def runs(size: int = 28, archives: str = "", data: str = "") -> Runs:
    """The 20 runs, read from the prepared "runs" config."""
    source = prepare("runs", archives, data).as_data_source("runs")
    rec = [source[i] for i in range(len(source))]
    n_runs = max(int(r["run"]) for r in rec)
    ways = max(int(r["index"]) for r in rec)
    support = np.zeros((n_runs, ways, size, size), np.uint8)
    query = np.zeros_like(support)
    answer = np.zeros((n_runs, ways), np.int32)
    for r in rec:
        run, i = int(r["run"]) - 1, int(r["index"]) - 1
        if _text(r["role"]) == "training":
            support[run, i] = resize(r["image"], size)
        else:
            query[run, i] = resize(r["image"], size)
            answer[run, i] = int(r["answer"]) - 1
    return Runs(support, query, answer)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
