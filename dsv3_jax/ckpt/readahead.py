"""Read-ahead for conversion: the converter's whole read plan, read in large requests by several threads ahead of
the threads that convert.

Why: the converting threads read one tensor (an expert weight: 15 MB) or one 32 MB chunk at a time and wait for
it, and the source disk of the development VM serves many requests in flight faster than a few: 32 parallel 4 MB
`O_DIRECT` reads ran at 1.40-1.45 GB/s where 8 of 64 MB ran at 1.15 (a 64 MB read is split into 16 device
requests, and its thread waits for the slowest before it issues the next), and 8 of 8-32 MB at 0.9-1.2 GB/s. Here
consecutive tensors of a file are coalesced into requests of up to REQUEST_BYTES, each read in PIECE_BYTES pieces
by STREAMS threads, as far ahead of the converters as BUFFERS allow — across block boundaries too.

A consumer `take`s its item by key: it waits while the item's request is being read and gets a view into the
request's buffer (valid until it `release`s it); an item whose request has not been issued yet is given up (the
consumer reads it itself, and the request skips it), so a consumer never waits on a request the budget holds back
and the read-ahead cannot deadlock the converter, whatever order the consumers go in. Buffers are reused (their
pages are faulted in once).
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

from dsv3_jax.ckpt import direct

REQUEST_BYTES = 64 << 20  # the largest request (items larger than this are not read ahead)
GAP_BYTES = 1 << 20  # items this close in a file share a request (the gap is read and dropped)
PIECE_BYTES = 4 << 20  # a request is read in pieces this large (one device request each: max_sectors_kb 4096)
STREAMS = 32  # pieces in flight: 32 x 4 MB read 1.40 GB/s where 8 x 64 MB read 1.15 (medians of 3, interleaved)
BUFFERS = 16  # request buffers (REQUEST_BYTES each): at most 1 GB read ahead and not yet released


@dataclasses.dataclass(eq=False)
class Item:
    """One planned read: `nbytes` at `offset` of a file, found by `key`."""

    key: tuple
    fd: int
    offset: int
    nbytes: int
    request: _Request | None = None
    given_up: bool = False  # its consumer came before the request was issued and read it itself


@dataclasses.dataclass(eq=False)
class _Request:
    fd: int
    items: list[Item]
    state: str = "planned"  # planned → reading → ready (or failed)
    start: int = 0  # file offset of the buffer's first byte
    span: int = 0
    buffer: direct.Arena | None = None
    unread: int = 0  # pieces not read yet
    pending: int = 0  # items taken or still to be taken, not yet released
    error: BaseException | None = None


def _requests(windows: list[list[Item]]) -> list[_Request]:
    """The requests, window after window (a window: a block's reads, in any order); inside a window in file
    order, items of one file close together sharing a request of at most REQUEST_BYTES."""
    out: list[_Request] = []
    for item in (i for window in windows for i in sorted(window, key=lambda i: (i.fd, i.offset))):
        if item.nbytes > REQUEST_BYTES:
            continue
        last = out[-1] if out else None
        end = last.items[-1].offset + last.items[-1].nbytes if last else 0
        if (last is not None and last.fd == item.fd and end <= item.offset <= end + GAP_BYTES
                and item.offset + item.nbytes - last.items[0].offset <= REQUEST_BYTES):
            last.items.append(item)
        else:
            out.append(_Request(item.fd, [item]))
        item.request = out[-1]
    return out


class ReadAhead:
    """Reads windows of items (window after window, each in file order) on STREAMS threads; `take(key)` /
    `release(item)` hand them to consumers."""

    def __init__(self, windows: list[list[Item]]) -> None:
        self._items = {item.key: item for window in windows for item in window}
        self._queue = _requests(windows)
        self._next = 0
        self._buffers = 0
        self._free: list[direct.Arena] = []
        self._pieces: collections.deque[tuple[_Request, int, int]] = collections.deque()  # of issued requests
        self._closed = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._work, name=f"dsv3-readahead-{i}", daemon=True)
                         for i in range(STREAMS)]
        for thread in self._threads:
            thread.start()

    def _issue(self) -> _Request | None:
        """The next request to read (its span accounted for and a buffer given), or None: none left, closed, or
        no buffer free now (under the lock)."""
        while not self._closed and self._next < len(self._queue):
            request = self._queue[self._next]
            request.items = [item for item in request.items if not item.given_up]
            if not request.items:
                self._next += 1
                continue
            if not self._free and self._buffers == BUFFERS:
                return None
            first, last = request.items[0], request.items[-1]
            request.start = first.offset - first.offset % direct.ALIGN
            request.span = direct.align_up(last.offset + last.nbytes - request.start)
            self._next += 1
            request.state, request.pending = "reading", len(request.items)
            request.buffer = self._free.pop() if self._free else self._new_buffer()
            return request
        return None

    def _next_piece(self) -> tuple[_Request, int, int] | None:
        """(request, first byte, end byte inside its span) of the next piece to read, issuing the next request
        when no piece is queued; waits for a free buffer; None when every request is issued (or closed) and no
        piece is left (under the lock)."""
        while True:
            if self._pieces:
                return self._pieces.popleft()
            request = self._issue()
            if request is not None:
                bounds = list(range(0, request.span, PIECE_BYTES)) or [0]  # one (empty) piece for empty items
                request.unread = len(bounds)
                self._pieces.extend((request, lo, min(lo + PIECE_BYTES, request.span)) for lo in bounds)
                continue
            if self._closed or self._next >= len(self._queue):
                return None
            self._cond.wait()

    def _new_buffer(self) -> direct.Arena:
        """A buffer that holds any request (a fixed size: one that grew would be mapped and faulted in again)."""
        self._buffers += 1
        buffer = direct.Arena()
        buffer.take(REQUEST_BYTES + 2 * direct.ALIGN)
        return buffer

    def _work(self) -> None:
        while True:
            with self._cond:
                piece = self._next_piece()
            if piece is None:
                return
            request, lo, hi = piece
            error = None
            try:
                view = memoryview(request.buffer.take(request.span))[lo:hi]
                got = direct.pread_all(request.fd, view, request.start + lo)
                last = request.items[-1]
                if lo + got < min(hi, last.offset + last.nbytes - request.start):
                    raise EOFError(f"file ended {lo + got} bytes into a read of {request.span} at byte "
                                   f"{request.start}")
            except (OSError, EOFError) as e:
                error = e
            with self._cond:
                request.error = request.error or error
                request.unread -= 1
                if request.unread == 0:
                    request.state = "failed" if request.error else "ready"
                    self._cond.notify_all()

    def take(self, key: tuple) -> tuple[np.ndarray, Item] | None:
        """(a uint8 view of the item's bytes, the item to `release`), or None: not planned, already taken, or not
        read yet (then given up: the caller reads it). Raises the read's error (OSError / EOFError)."""
        with self._cond:
            item = self._items.pop(key, None)
            if item is None:
                return None
            request = item.request
            if request is None or request.state == "planned":
                item.given_up = True
                return None
            while request.state == "reading":
                self._cond.wait()
            if request.error is not None:
                self._done(request)
                raise request.error
            lo = item.offset - request.start
            return request.buffer.take(request.span)[lo:lo + item.nbytes], item

    def release(self, item: Item) -> None:
        """The consumer is done with the item's view: its buffer is reused once every item of it is released."""
        with self._cond:
            self._done(item.request)

    def _done(self, request: _Request) -> None:
        request.pending -= 1
        if request.pending == 0 and request.buffer is not None:
            self._free.append(request.buffer)
            request.buffer = None
            self._cond.notify_all()

    def close(self) -> None:
        """Stop issuing, wait for the reads in flight, free the buffers (views must not be used afterwards)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        for request in self._queue:
            if request.buffer is not None:
                request.buffer.release()
        for buffer in self._free:
            buffer.release()
        self._free.clear()

