"""Page-cache-free file I/O for conversion: page-aligned reusable buffers and `O_DIRECT` positional reads/writes.

Why: converting the 689 GB release streams every byte through the kernel twice. Buffered I/O pays for the page
cache — copying, reclaim, writeback — and for zeroing every fresh page a new buffer touches; measured on the
development machine (`experiments/bench_convert.py`): a buffered, fsync'd 4 GB write ran at 0.36 GB/s with 10.6
CPU-s in the kernel, the same write with `O_DIRECT` at 2.1–2.7 GB/s with 0.2 CPU-s; a cold 4.9 GB read into a fresh
array 1.06 GB/s (6.4 CPU-s), into a reused buffer with `O_DIRECT` 1.97 GB/s (0.2 CPU-s). Converting a checkpoint
reads and writes each byte once, so the page cache buys nothing.

Where a filesystem refuses `O_DIRECT` (tmpfs, some network filesystems: `open` fails with EINVAL) every function
here falls back to buffered I/O with the same results. `DIRECT_IO = False` turns it off (tests use it to check
that both paths agree).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import mmap
import os
import threading

import numpy as np

ALIGN = 4096  # offsets, lengths and buffer addresses of O_DIRECT transfers are multiples of this
PIECE = 64 << 20  # bytes per transfer; large transfers go as several pieces in parallel
STREAMS = 4  # parallel transfers of one large read or write (the disk serves several at once faster)
KEEP_BYTES = 256 << 20  # a thread's read buffer larger than this is released after use, not kept
DIRECT_IO = hasattr(os, "O_DIRECT")


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Arena:
    """A page-aligned buffer that is reused: `take(n)` returns its first n bytes (uint8), growing it when needed.
    Reusing it is the point — its pages are faulted in (and zeroed by the kernel) once, not once per tensor."""

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._map is None else len(self._map)

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes > self.capacity:
            self.release()
            # private (not shmem-backed, as a shared anonymous map is) and in 4 KB pages, not huge ones: on the
            # development VM a fresh huge page came from memory the guest had handed back to the host (free page
            # reporting works on 2 MB blocks) and first touching 2 GiB of them cost 3.3-5.9 s of kernel time, against
            # 0.9-1.2 s in 4 KB pages (`perf`: 42% of a conversion's CPU was zeroing huge pages); the tiled
            # transposes that fill an arena ran as fast in 4 KB pages (1.77 vs 1.81 GB/s for a bf16 [8192, 7168]).
            # Not MAP_POPULATE (0.34 s per GiB against 0.43-0.54 touched page by page): it holds the process's
            # mmap lock while it faults, and the read-ahead's O_DIRECT reads stopped for that second
            self._map = mmap.mmap(-1, max(align_up(nbytes), ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                self._map.madvise(mmap.MADV_NOHUGEPAGE)
        return np.frombuffer(self._map, np.uint8, nbytes)

    def release(self) -> None:
        """Give the memory back (views taken from it must not be used afterwards)."""
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view is still alive: the mapping goes with the last view
                self._map.close()
            self._map = None


def open_direct(path: str, flags: int) -> tuple[int, bool]:
    """(fd, whether it is O_DIRECT): `flags` plus O_DIRECT, or without it where the filesystem refuses it."""
    if DIRECT_IO:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return os.open(path, flags, 0o666), False


def _pieces(nbytes: int) -> list[tuple[int, int]]:
    return [(start, min(start + PIECE, nbytes)) for start in range(0, nbytes, PIECE)]


_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def shared_pool(kind: str, threads: int = STREAMS) -> concurrent.futures.ThreadPoolExecutor:
    """The process's thread pool of a kind, made on first use and kept (their threads' buffers are reused):
    "read" and "write" pieces of large transfers (separate, so the next block's reads do not queue behind the
    previous block's writes), "chunks" of large tensors (`dsv3_jax.ckpt.blocks`)."""
    with _pool_lock:
        if kind not in _pools:
            _pools[kind] = concurrent.futures.ThreadPoolExecutor(threads, f"dsv3-{kind}")
        return _pools[kind]


def run_all(pool: concurrent.futures.Executor, fn, jobs) -> None:
    """fn(*job) for every job on `pool` (inline when there is one); the first failure is raised once every job
    has stopped (the ones not started are cancelled)."""
    if len(jobs) <= 1:
        for job in jobs:
            fn(*job)
        return
    futures = [pool.submit(fn, *job) for job in jobs]
    try:
        for future in futures:
            future.result()
    finally:
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)


def _parallel(jobs, fn, kind: str) -> None:
    run_all(shared_pool(kind), fn, jobs)


def pread_all(fd: int, view: memoryview, offset: int) -> int:
    """Read into all of `view` from `offset`; returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            break
        done += got
    return done


_local = threading.local()


def thread_arena(kind: str) -> Arena:
    """This thread's reusable buffer of a kind: "temp" (what `read_range` returns), "piece" (`read_into`'s
    bounce buffer; separate, so a `read_into` never overwrites a `read_range` result still in use)."""
    arenas = _local.__dict__.setdefault("arenas", {})
    return arenas.setdefault(kind, Arena())


def _span(offset: int, nbytes: int, direct: bool) -> tuple[int, int]:
    """(first byte, length) of the transfer covering [offset, offset + nbytes): aligned for O_DIRECT."""
    if not direct:
        return offset, nbytes
    start = offset - offset % ALIGN
    return start, align_up(offset + nbytes - start)


def _truncated(offset: int, nbytes: int, got: int) -> EOFError:
    return EOFError(f"file ended {got} bytes into the {nbytes} at byte {offset} (truncated)")


def read_range(fd: int, offset: int, nbytes: int, direct: bool) -> np.ndarray:
    """Bytes [offset, offset + nbytes) of the file as a uint8 view into this thread's reusable buffer, read
    straight into it (valid until this thread's next `read_range`: copy out what must stay). `direct`: `fd` is
    O_DIRECT (the aligned span around the range is read; the view starts inside it)."""
    start, span = _span(offset, nbytes, direct)
    buf = thread_arena("temp").take(span)
    view, need = memoryview(buf), offset - start + nbytes

    def piece(lo: int, hi: int) -> None:
        got = pread_all(fd, view[lo:hi], start + lo)
        if lo + got < min(hi, need):
            raise _truncated(offset, nbytes, start + lo + got - offset)

    _parallel(_pieces(span), piece, "read")
    return buf[offset - start:need]


def read_into(fd: int, offset: int, out: np.ndarray, direct: bool) -> None:
    """Fill `out` (any C-contiguous array) with the file's bytes from `offset`, in parallel pieces, each read
    through its I/O thread's reusable buffer (O_DIRECT) or straight into `out` (buffered)."""
    dst = out.reshape(-1).view(np.uint8)
    if not direct:
        def piece(lo: int, hi: int) -> None:
            if pread_all(fd, memoryview(dst[lo:hi]), offset + lo) < hi - lo:
                raise _truncated(offset, len(dst), lo)
    else:
        def piece(lo: int, hi: int) -> None:
            start, span = _span(offset + lo, hi - lo, True)
            buf = thread_arena("piece").take(span)
            need = offset + hi - start
            if pread_all(fd, memoryview(buf), start) < need:
                raise _truncated(offset, len(dst), lo)
            dst[lo:hi] = buf[offset + lo - start:need]

    _parallel(_pieces(len(dst)), piece, "read")


def done_reading() -> None:
    """Release this thread's `read_range` buffer if it grew past KEEP_BYTES (a one-off large tensor)."""
    arena = thread_arena("temp")
    if arena.capacity > KEEP_BYTES:
        arena.release()


def write_file(path: str, head: bytes, arena: Arena, nbytes: int) -> None:
    """Write `head` then the first `nbytes` of `arena` to a new file `path`, and fsync it. `len(head)` must be a
    multiple of ALIGN (the data then starts aligned). O_DIRECT writes whole aligned pieces: the last one runs
    into the arena's slack (its capacity is a multiple of ALIGN), and the file is cut to its size after."""
    if len(head) % ALIGN:
        raise ValueError(f"header of {len(head)} bytes is not a multiple of {ALIGN}")
    fd, direct = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        head_buf = Arena()
        head_buf.take(len(head))[:] = np.frombuffer(head, np.uint8)
        os.pwrite(fd, memoryview(head_buf.take(len(head))), 0)
        head_buf.release()
        view = memoryview(arena.take(align_up(nbytes) if direct else nbytes))

        def piece(lo: int, hi: int) -> None:
            done = lo
            while done < hi:
                done += os.pwrite(fd, view[done:hi], len(head) + done)

        _parallel(_pieces(len(view)), piece, "write")
        if direct:
            os.ftruncate(fd, len(head) + nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def packed(items: list[tuple[str, tuple[int, ...], np.dtype]]) -> tuple[dict[str, int], int]:
    """Byte offsets of arrays laid out back to back, widest dtype first (each offset stays a multiple of its
    itemsize), then by name; and the total size."""
    offsets, pos = {}, 0
    for key, shape, dtype in sorted(items, key=lambda t: (-np.dtype(t[2]).itemsize, t[0])):
        offsets[key] = pos
        pos += np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    return offsets, pos


def view_at(arena: Arena, offset: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array of `shape` and `dtype` at byte `offset` of the arena (no copy)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return arena.take(offset + count * dtype.itemsize)[offset:].view(dtype).reshape(shape)
