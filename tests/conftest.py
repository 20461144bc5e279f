"""Shared helpers: small configs that compile and train in seconds."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

from bayesmeta import config, registry

os.environ.setdefault("MPLBACKEND", "Agg")

# XLA's persistent compilation cache, fresh for each test session (nothing is kept between sessions):
# tests build many identical programs in different closures (the same small config fitted, copied,
# evaluated, resumed), which jit's in-memory cache cannot share and this cache can. It cuts the
# suite's CPU time by about 40% (tests/test_run_folder.py: 86 s -> 51 s of user time). Set for this
# process and, through the environment, for the CLI subprocesses some tests start. One folder per
# pytest-xdist worker: sharing one needs JAX's size bound for its lock, and a bounded cache reads
# every entry's access time on each write (2026-12-05, under load: at 72% of the suite after 25
# minutes, against 18.6 minutes for all of it with one folder per worker).
#
# Programs compile at LLVM's -O0 (XLA's backend optimization level 0): compilation is most of the
# suite's time, and the small programs tests run spend theirs in XLA's library kernels (matmuls,
# convolutions), which the level does not touch (2026-12-05, under a load of 4 on the 2 cores: the
# suite took 1,117 s instead of 1,552 s). The programs are the same and their numbers equal up to
# rounding; experiments, benchmarks and users keep XLA's default.
XLA_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="bayesmeta-test-xla-cache-"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.update(XLA_CACHE)
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
jax.config.update("jax_compilation_cache_dir", XLA_CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

SMALL = [
    "train.steps=200",
    "train.meta_batch=8",
    "train.log_every=50",
    "train.eval_every=100",
    "train.eval_tasks=20",
    "train.checkpoint_every=100",
    "eval.tasks=40",
    "eval.batch=20",
    "eval.plot_tasks=4",
    "model.net.hidden=[16, 16]",
]


@pytest.fixture
def small_cfg():
    """registry.load_config(None, SMALL + overrides): the built-in default shrunk to a few seconds."""

    def make(*overrides: str) -> config.Config:
        return registry.load_config(None, [*SMALL, *overrides])

    return make


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(XLA_CACHE["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def temp_files_in_pytest_tree(tmp_path_factory):
    """Send tempfile's folders (and the TMPDIR of CLI subprocesses) into pytest's own temporary tree,
    which pytest prunes: TFDS leaves an empty 'tmp...tfds' folder in the temp dir each time it builds
    a new dataset's info (DatasetInfo.initialize_from_bucket), and smoke runs write to temp folders."""
    old_dir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    path = str(tmp_path_factory.mktemp("tempfile"))
    tempfile.tempdir, os.environ["TMPDIR"] = path, path
    yield
    tempfile.tempdir = old_dir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env
