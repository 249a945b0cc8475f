"""Settings of the host process the package makes for itself (documented in the README, each can be turned off).

`inline_cpu_dispatch()` and `keep_host_heap(one_arena)` — run when `dsv3_jax` is imported, before XLA starts its
threads (import dsv3_jax before running anything in JAX). XLA:CPU allocates each call's temp buffer afresh (hundreds
of MiB for a train step); glibc served it with a fresh mmap and unmapped it on free, so every call faulted every
page in again, zeroed by the kernel: 137k–225k minor faults and 0.3–0.9 s of kernel time per train step of the
"small" preset at 4x256 on the development machine, about a quarter of the step's CPU time. `keep_host_heap` (unless
`DSV3_KEEP_HOST_HEAP=0`) has glibc keep freed memory for reuse: no mmap'd chunks, no trimming, so the buffer is
reused; the process's resident memory stays at its peak. That holds for the main arena only: a thread on another of
glibc's arenas (heaps of at most 64 MiB) gets any larger block mmap'd whatever the settings. JAX's CPU client ran
programs on a worker thread, so the package used to put every thread on one arena; but XLA compiles kernels on two
threads, and on one arena they queued on its lock. `inline_cpu_dispatch` (unless `DSV3_INLINE_CPU_DISPATCH=0`) sets
JAX's `jax_cpu_enable_async_dispatch` to False for the process: a one-device CPU program runs in the thread that
calls it (the main thread: the main arena) and the other threads keep their own arenas. tiny_stdlib's train step
(MTP on) then compiled in 6.1–6.3 s instead of 8.4–8.5 and stepped in 240–243 ms instead of 294–304
(`experiments/bench_train.py`, MTP off: 9.0 -> 5.2–5.6 s and 249 -> 183–192 ms). Programs over several devices
dispatch as before, on worker threads, so a process with several CPU devices (`several_cpu_devices()`, read at
import: XLA_FLAGS' forced count or `jax_num_cpu_devices` set before; simulated meshes) keeps the one arena: on 8
devices with per-device arenas `experiments/bench_expert_parallel.py` ran 30-40% slower (expert-parallel forward +
backward 518 vs 369 ms, the replicated layout's forward 505 vs 343 ms). So does a process whose dispatch stays
asynchronous (turned off, or JAX's CPU backend already started when dsv3_jax is imported).

`compiler_options(platform)` — the XLA options the package's programs (train step, generate, stream, forward)
compile with, unless `DSV3_XLA_CPU_OPTIONS=0`: on the CPU, LLVM at O1 instead of O3 (`CPU_COMPILER_OPTIONS`).
XLA:CPU emits every distinct fused kernel as its own LLVM module and optimises each one separately: the tiny_stdlib
train step is 531 modules (plus 260 reused), and that per-module work, not the HLO passes (0.65 s), is what a cold
compile spends; O1 took `small`'s first `generate` call from 7.7 / 8.6 to 5.9 / 6.8 s. The train step kept O3 until
`inline_cpu_dispatch`: `small`'s step had run 5% slower at O1 (min 648 / 641 -> 684 / 681 ms,
`experiments/bench_train.py` interleaved). Since, in one process, in turn, medians of 14-18 steps: `small` 4x256 531
(O3) vs 511 ms (O1), tiny_stdlib 16x128 with MTP 239 vs 244 ms: level; its cold compile 0.4-0.6 s shorter in fresh
processes (tiny_stdlib+MTP 5.1-5.2 vs 5.6-5.8 s compile; `small` 4.3-4.7 vs 4.9-5.0 s), within this machine's noise
in `experiments/bench_compile.py` (6.9 s at O3, 6.5 / 7.2 s at O1). With DSV3_INLINE_CPU_DISPATCH=0 the step also
compiles at O1, where it had measured 5% slower; DSV3_XLA_CPU_OPTIONS=0 gives O3. An option also named in $XLA_FLAGS
is left to it.

`init_compiler_options(platform, num_params)` — the random initialisation runs once, so on the CPU a model of up
to `INIT_O0_MAX_PARAMS` parameters compiles it at LLVM O0 (`INIT_CPU_COMPILER_OPTIONS`; same switch and same
$XLA_FLAGS rule). On 2 cores, medians of 3, compile + run: tiny_stdlib 11.2 + 0.06 -> 6.5 + 0.4 s, `tiny`
13.7 + 0.02 -> 8.0 + 0.05 s. `small` (24.5M) would save 3 s of compile and lose 2 s of run, and larger models more,
so they keep the default.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc mallopt parameters (malloc.h)

CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}  # see the module docstring
INIT_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
INIT_O0_MAX_PARAMS = 1 << 24


def inline_cpu_dispatch() -> bool:
    """Turn JAX's asynchronous CPU dispatch off (see above); True if one-device CPU programs will run inline."""
    if os.environ.get("DSV3_INLINE_CPU_DISPATCH", "1") == "0":
        return False
    import jax  # a flag, not read from the environment: set here; importing jax starts no XLA threads
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return not jax.config.read("jax_cpu_enable_async_dispatch")


def several_cpu_devices() -> bool:
    """Whether this process asks for more than one CPU device (XLA_FLAGS or jax_num_cpu_devices)."""
    import jax

    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return (forced is not None and int(forced.group(1)) > 1) or jax.config.jax_num_cpu_devices > 1


def keep_host_heap(one_arena: bool) -> bool:
    """Apply the glibc settings above (every thread on one arena if `one_arena`); True if applied."""
    if os.environ.get("DSV3_KEEP_HOST_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    params = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)] + ([(_M_ARENA_MAX, 1)] if one_arena else [])
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in params)
    except (OSError, AttributeError):  # not glibc
        return False


def compiler_options(platform: str) -> dict | None:
    """`jax.jit(..., compiler_options=...)` for a program compiled for `platform`: CPU_COMPILER_OPTIONS on "cpu"
    (less any option $XLA_FLAGS sets), None elsewhere or when DSV3_XLA_CPU_OPTIONS=0."""
    return _cpu_only(platform, CPU_COMPILER_OPTIONS)


def init_compiler_options(platform: str, num_params: int) -> dict | None:
    """Options for compiling the random initialisation of `num_params` parameters: INIT_CPU_COMPILER_OPTIONS up to
    INIT_O0_MAX_PARAMS, by the same rules as `compiler_options`; None above it."""
    return _cpu_only(platform, INIT_CPU_COMPILER_OPTIONS) if num_params <= INIT_O0_MAX_PARAMS else None


def _cpu_only(platform: str, options: dict) -> dict | None:
    if platform != "cpu" or os.environ.get("DSV3_XLA_CPU_OPTIONS", "1") == "0":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in options.items() if f"--{k}=" not in flags} or None
