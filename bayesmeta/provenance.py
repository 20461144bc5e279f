"""Where a number was computed: the CPU and the numerical packages, recorded beside every run's metrics.

XLA compiles for the host's instruction set and the packages change their kernels between releases, so
the same config and seed can train to other floats on another machine; a record that does not reproduce
can be told apart from a code change by comparing this."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "numpyro", "optax", "numpy")
ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")  # the x86 extensions XLA's CPU codegen uses


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none), read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in first.splitlines())}


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (/proc/cpuinfo), or 'model unknown'."""
    return _cpuinfo().get("model name") or "model unknown"


def cpu_features() -> list[str]:
    """Which of ISA the CPU reports (its /proc/cpuinfo flags)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in ISA if f in flags]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, object]:
    """{cpu, cpu_features, cores, xla_flags, <package>: version}: what a run's floats depend on besides
    its config and seed."""
    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **{p: _version(p) for p in PACKAGES},
    }
