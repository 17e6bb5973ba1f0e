"""Fresh host buffers for large copies (embeddings), with their pages faulted in ahead of time.

Why: every embedding that crosses a process lands in a buffer of its own, because caches keep it
after the copy (the encoder's host copy of its output, the LLM side's read of a shared-memory slot).
A fresh 4.7 MB buffer is zero-filled by the kernel, page by page, on its first write: that, not the
copy, is most of such a read (1.8 ms on the H200 host, results/profile_shm_read.json; 2.5 ms on the
CPU VM against 0.9 ms into memory already faulted in), and it happens twice on an image's way to
its first token. `SpareBuffers` keeps a few buffers of each recently requested size faulted in,
filled by a background thread whenever one is handed out; the fill is one `madvise` (`populate`)
called through ctypes, which releases the GIL, so it does not stall the thread that serves requests.

A buffer is handed out once and never taken back: its owner drops it like any other object.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import mmap
import os
import threading

import numpy as np

HUGE_PAGE_BYTES = 2 << 20  # below this, a bytearray (pooling small buffers gains nothing)


def fresh_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A new zeroed writable buffer of ``nbytes``, not yet faulted in. From 2 MiB up: an anonymous
    mapping advised to use transparent huge pages (where the kernel offers them), so that filling
    a 4.7 MB embedding takes a few page faults rather than ~1,150 of 4 KiB; below that, a bytearray.
    Both support the buffer protocol (numpy / torch ``frombuffer``)."""
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return bytearray(nbytes)
    buffer = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    with contextlib.suppress(OSError):  # THP disabled: plain pages, still correct
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


_MADV_POPULATE_READ = 22  # Linux 5.14+: map a range's pages now, not one fault per 4 KiB later
_MADV_POPULATE_WRITE = 23  # the same, writable (allocated, for private or not yet touched memory)


def populate(buffer: mmap.mmap | bytearray, *, write: bool) -> bool:
    """Map every page of `buffer` now with one `madvise`, made through ctypes, which releases the GIL.
    Nothing is written. False where the kernel refuses the advice (older than 5.14) or `buffer` is
    gone (a racing close): the pages then fault in on first use, as they would have."""
    view = np.frombuffer(buffer, dtype=np.uint8)
    address, size = view.ctypes.data, view.nbytes
    del view  # hold no export: a mapping must stay closable
    advice = _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ
    return _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), advice) == 0


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _fault_in(buffer: mmap.mmap | bytearray) -> None:
    """Allocate every page of `buffer` without holding the GIL (memset of zeros, as it already reads,
    where the kernel has no populate advice)."""
    if populate(buffer, write=True):
        return
    anchor = ctypes.c_char.from_buffer(buffer)  # exports the buffer while we hold its address
    try:
        ctypes.memset(ctypes.addressof(anchor), 0, len(buffer))
    finally:
        del anchor


class SpareBuffers:
    """`take(nbytes)`: a zeroed buffer of exactly `nbytes`, faulted in when a spare of that size is
    ready (`hits`), else fresh (`misses`). Spares are kept for the `max_sizes` sizes taken most
    recently, up to `per_size` of each, all within `max_bytes`: the size taken most recently is
    filled first, making room by dropping spares of the sizes taken least recently. A size above
    `max_bytes` is never pooled. Thread-safe. The filling thread starts on the first pooled `take`."""

    def __init__(
        self, *, per_size: int = 4, max_sizes: int = 4, max_bytes: int = 128 << 20, min_bytes: int = HUGE_PAGE_BYTES
    ) -> None:
        if per_size < 1 or max_sizes < 1 or max_bytes < 0:
            raise ValueError("per_size and max_sizes must be >= 1 and max_bytes >= 0")
        self.per_size = per_size
        self.max_sizes = max_sizes
        self.max_bytes = max_bytes
        self.min_bytes = max(min_bytes, HUGE_PAGE_BYTES)
        self._spares: collections.OrderedDict[int, list[mmap.mmap]] = collections.OrderedDict()  # size -> ready
        self._wake = threading.Condition()
        self._filling = False  # the filling thread runs
        self._closed = False
        self.hits = 0
        self.misses = 0

    def take(self, nbytes: int) -> bytearray | mmap.mmap:
        if not self._pooled(nbytes):
            return fresh_buffer(nbytes)
        with self._wake:
            ready = self._spares.pop(nbytes, [])
            self._spares[nbytes] = ready  # most recently wanted last
            while len(self._spares) > self.max_sizes:
                self._spares.popitem(last=False)  # its spares are unmapped when collected
            buffer = ready.pop() if ready else None
            if buffer is None:
                self.misses += 1
            else:
                self.hits += 1
            self._start_filler()
            self._wake.notify()
        return buffer if buffer is not None else fresh_buffer(nbytes)

    def ready(self, nbytes: int) -> int:
        """Spares of `nbytes` ready now."""
        with self._wake:
            return len(self._spares.get(nbytes, ()))

    def close(self) -> None:
        """Stop the filling thread and drop the spares (takes still work: fresh buffers)."""
        with self._wake:
            self._closed = True
            self._spares.clear()
            self._wake.notify_all()

    def _pooled(self, nbytes: int) -> bool:
        return not self._closed and self.min_bytes <= nbytes <= self.max_bytes

    def after_fork_in_child(self) -> None:
        """A forked child has the parent's spares but not its thread (nor, maybe, a usable lock)."""
        self._wake = threading.Condition()
        self._spares = collections.OrderedDict()
        self._filling = False

    def _start_filler(self) -> None:  # with the lock held
        if self._filling:
            return
        self._filling = True
        threading.Thread(target=self._fill_loop, name="spare-host-buffers", daemon=True).start()

    def _depth(self, size: int) -> int:
        return min(self.per_size, self.max_bytes // size)

    def _next_to_fill(self) -> int | None:
        """With the lock held: the most recently taken size short of spares, for which room is made
        (spares of sizes taken less recently are dropped); None when nothing is to be filled."""
        for size in reversed(self._spares):
            if len(self._spares[size]) >= self._depth(size):
                continue
            held = sum(other * len(ready) for other, ready in self._spares.items())
            for other, ready in self._spares.items():  # only sizes taken less recently, oldest first
                if other == size:
                    break
                while ready and held + size > self.max_bytes:
                    ready.pop()
                    held -= other
            if held + size <= self.max_bytes:
                return size
        return None

    def _fill_loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (size := self._next_to_fill()) is None:
                    self._wake.wait()
                if self._closed:
                    return
            buffer = fresh_buffer(size)
            _fault_in(buffer)
            with self._wake:
                ready = self._spares.get(size)
                if ready is not None and len(ready) < self._depth(size):  # the size may have gone meanwhile
                    ready.append(buffer)


_SPARES = SpareBuffers()
os.register_at_fork(after_in_child=_SPARES.after_fork_in_child)


def private_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A zeroed writable buffer of ``nbytes`` for a copy to fill, owned by the caller: from the
    process's spares (faulted in ahead of time) when one of that size is ready, else fresh."""
    return _SPARES.take(nbytes)


__all__ = ["HUGE_PAGE_BYTES", "SpareBuffers", "fresh_buffer", "populate", "private_buffer"]
