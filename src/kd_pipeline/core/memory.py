"""Handing freed memory back to the operating system between stages.

A stage that frees a model (extraction's teacher, training's optimizer state, the student loaded
to log it) leaves that memory in the C allocator's free lists: glibc serves tensors of up to
32 MiB from its heaps and keeps their pages resident after `free`, so the next stage of the same
`kedro run` starts with the last one's high-water mark as its own floor (measured on the default
job: 504 MiB left by extraction when `distill` began). `release_unused_memory` collects Python's
cycles (a finished Trainer and its model reference each other) and asks glibc to return every
free page (`malloc_trim(0)`, which also releases pages inside its heaps, not only their tops).
Elsewhere than glibc it only collects.

The other source of growth is oneDNN, torch's CPU matmul library: it compiles a kernel per
matmul shape and keeps up to 1024 of them in each of two caches (its own primitive cache and the
ideep wrapper's), and every batch of a different sequence length is a new shape. On the default
job's training that held ~1.4 GiB by step 30 and kept it through evaluation
(docs/benchmarks.md, "Stop 22: bounded oneDNN kernel caches"). `bound_kernel_caches` caps both; it
must run before the process's first CPU matmul, so the package does it on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys
from functools import lru_cache

logger = logging.getLogger(__name__)


#: The environment variables oneDNN (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep
#: (LRU_CACHE_CAPACITY) read, on first use, for the number of compiled kernels each keeps.
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")

#: 64 kernels each: a bf16 Linear pair fed 125 row counts grew the RSS by 469 MiB at the default
#: 1024 and by 38 MiB at 64 (16: 7 MiB, at more recompilation when shapes repeat).
KERNEL_CACHE_CAPACITY = 64


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Cap oneDNN's and ideep's kernel caches at `capacity` entries each, unless the environment
    already sets them (a user's own value wins). Takes effect only before the process's first
    CPU matmul, when the libraries read the variables. Returns the values now in force."""
    if capacity < 1:
        raise ValueError(f"kernel cache capacity must be at least 1, got {capacity}")
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in KERNEL_CACHE_VARIABLES}


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library is not glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_bytes() -> int | None:
    """This process's resident set size (Linux `/proc/self/statm`), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_unused_memory(label: str = "", collect: bool = True) -> int | None:
    """Collect unreachable Python objects (unless `collect` is False: between training steps,
    where nothing becomes garbage in cycles and a full collection costs ~0.1 s) and return the
    allocator's free pages to the OS.

    Returns the resident bytes released (None where the RSS cannot be read); logs it at debug
    level with `label`."""
    before = resident_bytes()
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    after = resident_bytes()
    if before is None or after is None:
        return None
    logger.debug("%s: released %.0f MiB (RSS %.0f MiB)", label or "memory", (before - after) / 2**20,
                 after / 2**20)
    return before - after
