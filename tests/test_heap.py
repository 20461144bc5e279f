"""bayesmeta.heap: with BAYESMETA_RETAIN_MEMORY=1, after `import bayesmeta` a freed 64 MiB block is
reused without page faults, in the main thread and in a new one (one arena); by default (and with =0)
glibc keeps its mmap per block."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

PROBE = r"""
import ctypes, ctypes.util, json, resource, threading
import bayesmeta  # noqa: F401  (sets the heap up at import)

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 64 << 20

def faults_touching_a_fresh_block():
    p = libc.malloc(n)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    libc.memset(p, 1, n)
    after = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    libc.free(p)
    return after - before

def second_block(out, key):
    faults_touching_a_fresh_block()
    out[key] = faults_touching_a_fresh_block()

out = {}
second_block(out, "main")
t = threading.Thread(target=second_block, args=(out, "thread"))
t.start(); t.join()
print(json.dumps(out))
"""


def probe(retain: str | None) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "BAYESMETA_RETAIN_MEMORY"}
    if retain is not None:
        env["BAYESMETA_RETAIN_MEMORY"] = retain
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_faults_in_every_thread():
    pages = (64 << 20) // 4096
    retained, default = probe("1"), probe(None)
    assert retained["main"] < pages // 100 and retained["thread"] < pages // 100, retained
    assert default["main"] > pages // 2 and default["thread"] > pages // 2, default
