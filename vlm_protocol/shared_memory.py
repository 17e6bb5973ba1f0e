"""Shared-memory transport of tensor bytes between services on one host (``Tensor.shared_memory``).

The encoder owns one POSIX shared-memory region (``/dev/shm/vlm-emb-<pid>-<32 hex>``) used as a ring
buffer: ``SharedMemoryRing`` writes each embedding into a 64-byte-aligned slot and hands out a
``SharedMemorySlice`` {region, offset, length, generation}; only that reference crosses gRPC. The LLM
service's ``SharedMemoryReader`` maps the region read-only and copies the bytes out.

Slot layout: a 64-byte header, then the payload (``offset`` points at the payload, the header is the 64
bytes before it). Header: magic ``VLMSLOT1``, state (EMPTY / WRITING / PUBLISHED), generation, length,
each a little-endian u64 after the 8-byte magic. Generations come from one counter per region that
never repeats, so a generation names one write.

Reuse is detected seqlock-style rather than prevented: before the ring hands out bytes that overlap
older slots it invalidates their headers (state EMPTY, generation 0), and the reader checks the header
(magic, PUBLISHED, generation, length) before and after copying. A reader whose slot was reused gets
``StaleSharedMemoryError`` (NOT_FOUND: the SDK resends the embedding as bytes) instead of torn data.
This relies on stores becoming visible to the other process in program order, which x86-64 (TSO)
guarantees; on weakly ordered CPUs (arm64) a read racing with a reuse of the very same slot is caught
only in the common case. Size the region so that a slot outlives the encoder -> client -> LLM hop by a
wide margin (it holds the last N embeddings written, N = region size / embedding size).

Limits of the design: Linux (``/dev/shm``, ``posix_fallocate``), little-endian hosts, writer and
readers running as users that can open the file (mode 0600 by default: the same uid, as in the
project's containers). A region left behind by a killed writer is removed by the next writer's start
(``remove_orphaned_regions``): live writers hold a shared ``flock`` on their region.

No torch here: the encoder copies tensors into the writable ``memoryview`` that ``reserve`` returns.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import sys
import threading
import time
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vlm_protocol.errors import (
    InvalidArgumentError,
    ResourceExhaustedError,
    SharedMemoryUnavailableError,
    StaleSharedMemoryError,
)
from vlm_protocol.host_buffers import populate, private_buffer

logger = logging.getLogger(__name__)

SHM_DIRECTORY = Path("/dev/shm")
REGION_PREFIX = "vlm-emb-"
# "vlm-emb-" + writer pid + "-" + 128 random bits in hex. Nothing else is ever opened: no paths, no
# dots, no other programs' regions.
REGION_NAME_PATTERN = re.compile(r"vlm-emb-[0-9]{1,10}-[0-9a-f]{32}")
SLOT_ALIGNMENT = 64
HEADER_BYTES = 64
MIN_REGION_BYTES = 4096
MAGIC = b"VLMSLOT1"
STATE_EMPTY = 0
STATE_WRITING = 1
STATE_PUBLISHED = 2
_HEADER = struct.Struct("<8sQQQ")  # magic, state, generation, length
_STATE_OFFSET = 8  # byte offset of `state` within the header
_PAGE_BYTES = 4096
_ORPHAN_MIN_AGE_S = 60.0  # a region this young may belong to a writer that has not locked it yet


@dataclass(frozen=True)
class SharedMemorySlice:
    """Where one tensor's bytes are: mirrors ``vlm.v1.SharedMemorySlice`` (``offset`` = payload start)."""

    region: str
    offset: int
    length: int
    generation: int


class SliceLike(Protocol):
    """A ``SharedMemorySlice`` or the protobuf message of the same name."""

    region: str
    offset: int
    length: int
    generation: int


def new_region_name() -> str:
    return f"{REGION_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"


def is_region_name(name: str) -> bool:
    return isinstance(name, str) and REGION_NAME_PATTERN.fullmatch(name) is not None


def _align(value: int) -> int:
    return -(-value // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


def slot_bytes(nbytes: int) -> int:
    """Ring bytes one item of ``nbytes`` takes: header plus the payload rounded up to the alignment."""
    return HEADER_BYTES + _align(max(nbytes, 1))


# --- writer -------------------------------------------------------------------------------------------


class SharedMemoryRingFullError(ResourceExhaustedError):
    """The item cannot get a slot now: larger than the region, or every place it could go holds a slot
    still being written or one the caller asked to keep. Callers send that item as bytes instead."""


@dataclass
class _Slot:
    start: int  # header offset
    end: int  # end of the aligned payload
    generation: int
    published: bool = False


class SharedMemoryRing:
    """The writer's region, used as a ring of slots. Thread-safe; close it (or use ``with``) to unlink.

    ``reserve(n)`` -> (slice, writable view of n bytes); fill the view, then ``publish(slice)`` (or
    ``abandon`` on failure). ``slot(n)`` does the same as a context manager; ``put(data)`` copies bytes.
    Allocation is sequential and wraps to offset 0 when the rest of the region is too short; every older
    slot the new one overlaps is invalidated first.

    Raises ``SharedMemoryUnavailableError`` (FAILED_PRECONDITION) when the region cannot be created or
    its pages cannot be reserved, e.g. a /dev/shm smaller than ``size_bytes`` (Docker's default is 64 MiB).
    """

    def __init__(
        self, size_bytes: int, *, directory: str | os.PathLike[str] | None = None, mode: int = 0o600
    ) -> None:
        if sys.byteorder != "little":
            raise SharedMemoryUnavailableError("the shared-memory transport needs a little-endian host")
        size_bytes = int(size_bytes)
        if size_bytes < MIN_REGION_BYTES:
            raise InvalidArgumentError(
                f"a shared-memory region needs at least {MIN_REGION_BYTES} bytes, got {size_bytes}"
            )
        self.directory = Path(directory) if directory is not None else SHM_DIRECTORY
        self.name = new_region_name()
        self.size_bytes = size_bytes
        self.path = self.directory / self.name
        remove_orphaned_regions(self.directory)
        fd, self._mmap = _create_region(self.path, size_bytes, mode)
        self._fd = fd  # kept open: holds the shared flock that marks the region as alive
        self._view = memoryview(self._mmap)
        self._lock = threading.Lock()
        self._live: collections.deque[_Slot] = collections.deque()
        self._head = 0
        self._next_generation = 1
        self._num_writing = 0  # slots reserved and not yet published or abandoned
        self._closed = False
        self._finalizer = weakref.finalize(self, _release, self.path, fd, self._view, self._mmap)

    @property
    def max_item_bytes(self) -> int:
        """The largest item that fits in one slot."""
        return (self.size_bytes - HEADER_BYTES) // SLOT_ALIGNMENT * SLOT_ALIGNMENT

    @property
    def closed(self) -> bool:
        return self._closed

    def reserve(self, nbytes: int, *, keep: Collection[int] = ()) -> tuple[SharedMemorySlice, memoryview]:
        """A new slot of ``nbytes``, marked as being written: its slice and a writable view of its payload.

        ``keep``: generations that must not be overwritten (e.g. earlier items of the same response).
        Raises ``SharedMemoryRingFullError`` when the item does not fit or would overwrite a slot in
        ``keep`` or one still being written.
        """
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes > self.max_item_bytes:
            raise SharedMemoryRingFullError(
                f"an item of {nbytes} bytes does not fit in the {self.size_bytes}-byte shared-memory region"
            )
        need = slot_bytes(nbytes)
        with self._lock:
            if self._closed:
                raise SharedMemoryUnavailableError("the shared-memory region is closed", self.name)
            start = self._head if self._head + need <= self.size_bytes else 0
            end = start + need
            overlapped = [s for s in self._live if s.start < end and start < s.end]
            for s in overlapped:
                if not s.published or s.generation in keep:
                    raise SharedMemoryRingFullError(
                        "the shared-memory region is full of slots in use; the item goes as bytes"
                    )
            for s in overlapped:
                self._invalidate(s.start)  # before any byte of the new slot is written
            if overlapped:
                gone = {id(s) for s in overlapped}
                self._live = collections.deque(s for s in self._live if id(s) not in gone)
            generation = self._next_generation
            self._next_generation += 1
            _HEADER.pack_into(self._view, start, MAGIC, STATE_WRITING, generation, nbytes)
            self._live.append(_Slot(start, end, generation))
            self._num_writing += 1
            self._head = end
        offset = start + HEADER_BYTES
        return SharedMemorySlice(self.name, offset, nbytes, generation), self._view[offset : offset + nbytes]

    def publish(self, slice_: SharedMemorySlice) -> None:
        """Mark a reserved slot readable. Its view must no longer be written (nor any tensor over it used).

        Raises ``SharedMemoryUnavailableError`` when the ring was closed meanwhile (send bytes instead).
        """
        with self._lock:
            slot = self._end_write(slice_)
            if self._closed:
                self._unmap_if_idle()
                raise SharedMemoryUnavailableError("the shared-memory region was closed", self.name)
            slot.published = True
            struct.pack_into("<Q", self._view, slot.start + _STATE_OFFSET, STATE_PUBLISHED)

    def abandon(self, slice_: SharedMemorySlice) -> None:
        """Give up a reserved slot (its write failed): invalidated, its bytes free for reuse."""
        with self._lock:
            slot = self._end_write(slice_)
            if self._closed:
                self._unmap_if_idle()
                return
            self._invalidate(slot.start)
            self._live.remove(slot)

    @contextlib.contextmanager
    def slot(
        self, nbytes: int, *, keep: Collection[int] = ()
    ) -> Iterator[tuple[SharedMemorySlice, memoryview]]:
        """``reserve``, then ``publish`` when the block ends normally (``abandon`` if it raises)."""
        slice_, view = self.reserve(nbytes, keep=keep)
        try:
            yield slice_, view
        except BaseException:
            view.release()
            self.abandon(slice_)
            raise
        view.release()
        self.publish(slice_)

    def put(self, data: bytes | bytearray | memoryview, *, keep: Collection[int] = ()) -> SharedMemorySlice:
        """Copy ``data`` into a new slot and publish it."""
        source = memoryview(data).cast("B")
        with self.slot(source.nbytes, keep=keep) as (slice_, view):
            view[:] = source
        return slice_

    def prefault(self) -> None:
        """Map every page of the region into this process now, so that the first pass of slots does not
        pay a page fault per 4 KiB (~1,150 per 4.7 MB embedding). Only before the first slot (where the
        kernel lacks the populate advice it writes zeros). One madvise without the GIL where it can
        (0.44 s for 512 MiB on the CPU VM, against 1.6 s writing a byte per page), so it may run in a
        thread beside the model load."""
        with self._lock:
            if self._live or self._closed:
                raise ValueError("prefault() is for a fresh ring, before any slot")
        if not populate(self._view, write=True):
            with self._lock:
                if self._live or self._closed:  # a slot was taken meanwhile: leave the rest to faults
                    return
                self._view[::_PAGE_BYTES] = bytes(len(range(0, self.size_bytes, _PAGE_BYTES)))

    def close(self) -> None:
        """Unlink the region and unmap it. Idempotent. Readers that mapped it keep their mapping.

        Slots being written keep the mapping until they are published or abandoned (a write in another
        thread must never hit an unmapped page); their ``publish`` then raises.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # now: no new reader can open it, whatever is still being written
            self._unmap_if_idle()

    def __enter__(self) -> SharedMemoryRing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _end_write(self, slice_: SharedMemorySlice) -> _Slot:
        start = slice_.offset - HEADER_BYTES
        for slot in reversed(self._live):  # the slot just reserved is usually the newest
            if slot.generation == slice_.generation and slot.start == start and not slot.published:
                self._num_writing -= 1
                return slot
        raise ValueError(f"slice {slice_} is not a slot of this ring being written")

    def _unmap_if_idle(self) -> None:
        if self._closed and self._num_writing == 0:
            self._live.clear()
            self._finalizer()

    def _invalidate(self, start: int) -> None:
        # state first: a reader that sees the old generation with state EMPTY already rejects the slot
        struct.pack_into("<QQ", self._view, start + _STATE_OFFSET, STATE_EMPTY, 0)


def _create_region(path: Path, size_bytes: int, mode: int) -> tuple[int, mmap.mmap]:
    """Create, reserve and map a new region; on any failure nothing is left behind."""
    if not path.parent.is_dir():
        raise SharedMemoryUnavailableError(
            f"{path.parent} does not exist: the shared-memory transport needs Linux POSIX shared memory "
            "(/dev/shm); run without --shared-memory-mb",
            path.name,
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise SharedMemoryUnavailableError(
            f"cannot create shared-memory region {path}: {exc.strerror}", path.name
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # "alive" marker for remove_orphaned_regions
        _reserve_pages(fd, path, size_bytes)
        region = mmap.mmap(fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd, region


def _reserve_pages(fd: int, path: Path, size_bytes: int) -> None:
    """Allocate every page now, so a full /dev/shm fails here and not as SIGBUS on a later write."""
    fallocate = getattr(os, "posix_fallocate", None)  # Linux; absent on macOS
    try:
        if fallocate is not None:
            fallocate(fd, 0, size_bytes)
            return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise SharedMemoryUnavailableError(_reserve_message(path, size_bytes, exc), path.name) from None
    # a file system without fallocate: write zeros (write(2) reports ENOSPC; stores to a mapping would not)
    os.ftruncate(fd, 0)
    chunk = bytes(1 << 20)
    written = 0
    try:
        while written < size_bytes:
            written += os.pwrite(fd, chunk[: min(len(chunk), size_bytes - written)], written)
    except OSError as exc:
        raise SharedMemoryUnavailableError(_reserve_message(path, size_bytes, exc), path.name) from None


def _reserve_message(path: Path, size_bytes: int, exc: OSError) -> str:
    free = ""
    with contextlib.suppress(OSError):
        st = os.statvfs(path.parent)
        free = f" ({st.f_bavail * st.f_frsize / 2**20:.0f} MiB free of {st.f_blocks * st.f_frsize / 2**20:.0f} MiB)"
    return (
        f"cannot reserve {size_bytes / 2**20:.0f} MiB of shared memory in {path.parent}{free}: "
        f"{exc.strerror or exc}. Enlarge {path.parent} (Docker: --shm-size or compose shm_size; its "
        "default is 64 MiB) or lower --shared-memory-mb"
    )


def _release(path: Path, fd: int, view: memoryview, region: mmap.mmap) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(BufferError, ValueError):
        view.release()
    with contextlib.suppress(BufferError, ValueError):
        region.close()  # BufferError: a tensor still views a slot; the mapping goes with it
    with contextlib.suppress(OSError):
        os.close(fd)


def remove_orphaned_regions(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Unlink ``vlm-emb-*`` regions whose writer is gone (killed before it could unlink them).

    A live writer holds a shared ``flock`` on its region, so a region on which an exclusive lock can be
    taken has no writer. Regions younger than a minute are left alone (the writer may be between
    creating and locking). Returns the names removed; regions of other users are skipped.
    """
    root = Path(directory) if directory is not None else SHM_DIRECTORY
    removed: list[str] = []
    try:
        names = [name for name in os.listdir(root) if is_region_name(name)]
    except OSError:
        return removed
    for name in names:
        path = root / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_ctime < _ORPHAN_MIN_AGE_S:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(name)
                logger.info("removed orphaned shared-memory region %s", path)
        finally:
            os.close(fd)
    return removed


# --- reader -------------------------------------------------------------------------------------------

def populate_in_background(region: mmap.mmap) -> threading.Thread:
    """Map every page of ``region`` (a reader's read-only mapping) in a daemon thread, without the
    GIL (`host_buffers.populate`), so the reader's process keeps serving meanwhile. Best effort: a
    read racing the thread faults as it would have; a region closed meanwhile makes the call fail
    harmlessly (it only maps pages, never writes)."""

    def run() -> None:
        if not populate(region, write=False):
            logger.debug("MADV_POPULATE_READ refused (errno %d): pages fault in on first read", ctypes.get_errno())

    thread = threading.Thread(target=run, name="shm-populate", daemon=True)
    thread.start()
    return thread


class _Mapping:
    def __init__(self, fd: int, region: mmap.mmap, size: int) -> None:
        self.fd = fd  # kept to notice a region truncated under us (fstat per read)
        self.region = region
        self.size = size

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.region.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SharedMemoryReader:
    """Reads slices of writers' regions: read-only mappings of at most ``max_open_regions`` regions
    (least recently used closed first), each read a private copy checked against the slot header.

    Thread-safe (reads are serialized). Errors: ``InvalidArgumentError`` for a malformed slice (bad
    region name, offset or length), ``SharedMemoryUnavailableError`` (FAILED_PRECONDITION) when the
    region cannot be opened here, ``StaleSharedMemoryError`` (NOT_FOUND) when the slot was reused.
    """

    def __init__(
        self,
        *,
        directory: str | os.PathLike[str] | None = None,
        max_open_regions: int = 8,
        populate: bool = True,
    ) -> None:
        if max_open_regions < 1:
            raise ValueError(f"max_open_regions must be >= 1, got {max_open_regions}")
        self.directory = Path(directory) if directory is not None else SHM_DIRECTORY
        self.max_open_regions = max_open_regions
        self.populate = populate  # map a region's pages in the background once it is opened
        self._mappings: collections.OrderedDict[str, _Mapping] = collections.OrderedDict()
        self._lock = threading.Lock()

    def read(
        self, slice_: SliceLike, *, expected_length: int | None = None, field: str = "shared_memory"
    ) -> bytearray | mmap.mmap:
        """A private, writable copy of the slice's bytes (a buffer: see ``private_buffer``).

        ``expected_length``: bytes the tensor's dtype and shape call for; the slice must have exactly
        that many. ``field`` prefixes error messages.
        """
        self.check(slice_, expected_length=expected_length, field=field)
        region, offset, length, generation = (
            slice_.region,
            int(slice_.offset),
            int(slice_.length),
            int(slice_.generation),
        )
        with self._lock:
            mapping = self._mapping(region)
            if offset + length > mapping.size:
                raise InvalidArgumentError(
                    f"{field}: bytes [{offset}, {offset + length}) lie outside region {region} "
                    f"({mapping.size} bytes)"
                )
            try:
                current = os.fstat(mapping.fd).st_size
            except OSError:
                current = -1
            if current < offset + length:  # shrunk under us: reading would fault (SIGBUS)
                self._drop(region)
                raise StaleSharedMemoryError(f"{field}: shared-memory region {region} was truncated")
            view = memoryview(mapping.region)
            try:
                header = _HEADER.unpack_from(view, offset - HEADER_BYTES)
                self._check_header(header, generation, length, region, field)
                data = private_buffer(length)
                data[:] = view[offset : offset + length]
                after = _HEADER.unpack_from(view, offset - HEADER_BYTES)
            finally:
                view.release()
            if after != header:
                raise StaleSharedMemoryError(
                    f"{field}: the shared-memory slot was reused while it was read; resend the embedding bytes"
                )
            return data

    @staticmethod
    def check(slice_: SliceLike, *, expected_length: int | None = None, field: str = "shared_memory") -> None:
        """The checks `read` makes of a slice before it opens anything: a region name of this system,
        a slot payload offset, and ``expected_length``; InvalidArgumentError naming ``field``."""
        region, offset, length = slice_.region, int(slice_.offset), int(slice_.length)
        if not is_region_name(region):
            raise InvalidArgumentError(
                f"{field}.region {region[:80]!r} is not a shared-memory region name of this system "
                "(vlm-emb-<pid>-<32 hex digits>)"
            )
        if expected_length is not None and length != expected_length:
            raise InvalidArgumentError(
                f"{field}.length is {length} bytes but the tensor's dtype and shape need {expected_length}"
            )
        if offset < HEADER_BYTES or offset % SLOT_ALIGNMENT:
            raise InvalidArgumentError(
                f"{field}.offset {offset} is not a slot payload offset (a multiple of {SLOT_ALIGNMENT}, "
                f">= {HEADER_BYTES})"
            )

    def prefault(self, region: str) -> None:
        """Map `region` now and touch every page (one read per page), so that first reads of its slots
        do not page-fault. Raises as `read` does for a region that cannot be opened."""
        if not is_region_name(region):
            raise InvalidArgumentError(f"{region[:80]!r} is not a shared-memory region name of this system")
        with self._lock:
            view = memoryview(self._mapping(region).region)
            try:
                bytes(view[::_PAGE_BYTES])
            finally:
                view.release()

    def close(self) -> None:
        with self._lock:
            for mapping in self._mappings.values():
                mapping.close()
            self._mappings.clear()

    @property
    def open_regions(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._mappings)

    @staticmethod
    def _check_header(header: tuple, generation: int, length: int, region: str, field: str) -> None:
        magic, state, slot_generation, slot_length = header
        if magic != MAGIC or state != STATE_PUBLISHED or slot_generation != generation:
            raise StaleSharedMemoryError(
                f"{field}: the shared-memory slot (region {region}, generation {generation}) was reused; "
                "resend the embedding bytes"
            )
        if slot_length != length:
            raise InvalidArgumentError(f"{field}.length is {length} bytes but the slot holds {slot_length}")

    def _mapping(self, region: str) -> _Mapping:
        mapping = self._mappings.get(region)
        if mapping is not None:
            self._mappings.move_to_end(region)
            return mapping
        path = self.directory / region
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SharedMemoryUnavailableError(
                f"shared-memory region {region} is not visible to this LLM service: run both services on "
                "one host with a shared /dev/shm (compose: ipc), or use bytes transport",
                region,
            ) from None
        except OSError as exc:
            raise SharedMemoryUnavailableError(
                f"shared-memory region {region} cannot be opened by this LLM service ({exc.strerror}): run "
                "both services as the same user on one host, or use bytes transport",
                region,
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < MIN_REGION_BYTES:
                raise SharedMemoryUnavailableError(
                    f"{path} is not a shared-memory region of this system", region
                )
            # Not MAP_POPULATE: mapping a 512 MiB region's pages at once took 259 ms of the first
            # request (H100 host) to save ~0.1-0.7 ms per read (benchmarks/profile_shm_read.py);
            # a background thread maps them instead
            region_map = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        mapping = _Mapping(fd, region_map, st.st_size)
        if self.populate:
            populate_in_background(region_map)
        self._drop_unlinked()  # a restarted encoder's old region: its pages stay allocated while mapped
        self._mappings[region] = mapping
        while len(self._mappings) > self.max_open_regions:
            _, oldest = self._mappings.popitem(last=False)
            oldest.close()
        return mapping

    def _drop_unlinked(self) -> None:
        for name, mapping in list(self._mappings.items()):
            try:
                gone = os.fstat(mapping.fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                self._drop(name)

    def _drop(self, region: str) -> None:
        mapping = self._mappings.pop(region, None)
        if mapping is not None:
            mapping.close()


__all__ = [
    "HEADER_BYTES",
    "REGION_NAME_PATTERN",
    "SHM_DIRECTORY",
    "SLOT_ALIGNMENT",
    "SharedMemoryReader",
    "SharedMemoryRing",
    "SharedMemoryRingFullError",
    "SharedMemorySlice",
    "SliceLike",
    "is_region_name",
    "new_region_name",
    "remove_orphaned_regions",
    "slot_bytes",
]
