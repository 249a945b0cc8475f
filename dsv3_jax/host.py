"""Settings of the host process the package makes for itself (documented in the README, each can be turned off).

`keep_host_heap()` — run when `dsv3_jax` is imported, unless `DSV3_KEEP_HOST_HEAP=0`: glibc keeps freed memory for
reuse (one arena, no mmap'd chunks, no trimming). XLA:CPU allocates each call's temp buffer afresh (hundreds of
MiB for a train step); glibc served it with a fresh mmap and unmapped it on free, so every call faulted every page
in again, zeroed by the kernel: 137k–225k minor faults and 0.3–0.9 s of kernel time per train step of the "small"
preset at 4x256 on the development machine, about a quarter of the step's CPU time; kept in the heap the buffer is
reused and the faults go to zero. It must run before XLA starts its threads (each attaches to an arena at its
first malloc): import dsv3_jax before running anything in JAX. The process's resident memory then stays at its
peak (freed memory is reused, not returned). Linux with glibc only; a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc mallopt parameters (malloc.h)


def keep_host_heap() -> bool:
    """Apply the glibc settings above; True if applied."""
    if os.environ.get("DSV3_KEEP_HOST_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    except (OSError, AttributeError):  # not glibc
        return False
