"""Keep freed memory in the process heap, so that XLA's buffers are not page-faulted in at every step.

XLA's CPU backend allocates each execution's temporaries afresh (about 0.8 GiB for a step of conv
MAML at the standard protocol). glibc serves allocations above 32 MiB by mmap and unmaps them when
they are freed, so each execution touches its buffers page by page again: some 150,000 minor page
faults per step, all in the kernel's time. With one arena, no mmap and no trimming, freed buffers are
reused as they are. The one arena has a price: XLA's compiles, which allocate from several threads,
can take longer. experiments/bench/heap measures both on the Omniglot training steps; the effect
depends on the machine (2026-12-05: steps 16-25% faster on both cores, -10% to +9% pinned to one
core, compiles up to 36% longer; the machine before: steps 4-14% faster, compiles 57-74% longer), so
it is opt-in (BAYESMETA_RETAIN_MEMORY=1), for long runs whose time is in the steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
ENV = "BAYESMETA_RETAIN_MEMORY"


def retain_freed_memory() -> bool:
    """mallopt(M_ARENA_MAX = 1, M_MMAP_MAX = 0, M_TRIM_THRESHOLD = M_TOP_PAD = 2^31 - 1) on glibc:
    every allocation comes from the one main heap and freed memory stays in it for reuse, so the
    process keeps its peak memory. mallopt's int caps the trim threshold at 2 GiB, and Eigen's
    multi-threaded matmuls free more than that at the heap's top at times; the equal top pad makes
    such a trim keep 2 GiB. Must run before XLA's threads first allocate (bayesmeta's import does it).
    Only with BAYESMETA_RETAIN_MEMORY=1 and on glibc; otherwise a no-op returning False."""
    if os.environ.get(ENV, "0") != "1" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
