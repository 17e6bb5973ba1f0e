"""vlm_protocol.shared_memory: the encoder's ring of slots and the LLM service's checked reader.

Real POSIX shared memory (/dev/shm); skipped where there is none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vlm.v1 import common_pb2

from tests.unit.memory_maps import POPULATE_ADVICE, mapped_kib
from vlm_protocol import shared_memory as shm
from vlm_protocol.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SharedMemoryUnavailableError,
    StaleSharedMemoryError,
)
from vlm_protocol.shared_memory import (
    HEADER_BYTES,
    SharedMemoryReader,
    SharedMemoryRing,
    SharedMemoryRingFullError,
    SharedMemorySlice,
)
from vlm_protocol.tensor_codec import (
    TensorFormatError,
    decode_numpy,
    decode_torch,
    encode_torch,
    shared_memory_reference,
)

pytestmark = pytest.mark.skipif(not shm.SHM_DIRECTORY.is_dir(), reason="no /dev/shm on this host")


@pytest.fixture
def ring():
    with SharedMemoryRing(64 * 1024) as r:
        yield r


@pytest.fixture
def reader():
    r = SharedMemoryReader()
    yield r
    r.close()


def _pattern(seed: int, nbytes: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def test_round_trip_is_a_private_copy(ring, reader):
    data = _pattern(1, 5000)
    slice_ = ring.put(data)
    assert slice_.region == ring.name and shm.is_region_name(ring.name)
    assert slice_.offset % shm.SLOT_ALIGNMENT == 0 and slice_.offset >= HEADER_BYTES
    assert slice_.length == len(data) and slice_.generation >= 1
    copy = reader.read(slice_, expected_length=len(data))
    assert bytes(copy) == data
    copy[:10] = b"\0" * 10  # ours alone: the region is unchanged
    assert bytes(reader.read(slice_)) == data
    # the protobuf message works as the slice too
    message = common_pb2.SharedMemorySlice(
        region=slice_.region, offset=slice_.offset, length=slice_.length, generation=slice_.generation
    )
    assert bytes(reader.read(message)) == data


def test_slot_context_manager_publishes_only_on_success(ring, reader):
    with ring.slot(16) as (slice_, view):
        with pytest.raises(StaleSharedMemoryError):
            reader.read(slice_)  # being written: not readable yet
        view[:] = b"0123456789abcdef"
    assert bytes(reader.read(slice_)) == b"0123456789abcdef"

    with pytest.raises(RuntimeError), ring.slot(16) as (failed, view):
        view[:4] = b"half"
        raise RuntimeError("copy failed")
    with pytest.raises(StaleSharedMemoryError):
        reader.read(failed)


def test_generations_strictly_increase(ring):
    generations = [ring.put(b"x" * n).generation for n in (1, 100, 3000, 7, 20000, 5)]
    assert generations == sorted(set(generations))


def test_wrap_around_invalidates_every_overlapped_older_slot(reader):
    with SharedMemoryRing(8192) as ring:
        a = ring.put(_pattern(1, 1000))  # [0, 1088)
        b = ring.put(_pattern(2, 3000))  # [1088, 4160)
        c = ring.put(_pattern(3, 3000))  # [4160, 7232)
        assert all(reader.read(s) for s in (a, b, c))
        d, view = ring.reserve(1500)  # no room at the end: wraps to 0 and overlaps a and b
        assert d.offset == HEADER_BYTES
        for stale in (a, b):  # invalidated before a byte of d is written
            with pytest.raises(StaleSharedMemoryError):
                reader.read(stale)
        view[:] = _pattern(4, 1500)
        view.release()
        ring.publish(d)
        for stale in (a, b):
            with pytest.raises(StaleSharedMemoryError) as info:
                reader.read(stale)
            assert isinstance(info.value, NotFoundError)  # NOT_FOUND: the SDK resends the bytes
            assert "reused" in str(info.value)
        assert bytes(reader.read(c)) == _pattern(3, 3000)  # not overlapped: still valid
        assert bytes(reader.read(d)) == _pattern(4, 1500)


def test_a_slot_reused_during_the_copy_is_detected(ring, reader, monkeypatch):
    slice_ = ring.put(_pattern(6, 3000))

    def buffer_while_the_writer_reuses_the_slot(nbytes):
        for _ in range(40):  # the writer goes round the ring and over this slot meanwhile
            ring.put(b"\2" * 3000)
        return bytearray(nbytes)

    monkeypatch.setattr(shm, "private_buffer", buffer_while_the_writer_reuses_the_slot)
    with pytest.raises(StaleSharedMemoryError, match="reused while it was read"):
        reader.read(slice_)


def test_a_slot_is_never_reused_while_being_written_or_kept(reader):
    with SharedMemoryRing(8192) as ring:
        slice_, view = ring.reserve(5000)
        with pytest.raises(SharedMemoryRingFullError) as info:
            ring.reserve(5000)  # would overwrite the slot still being written
        assert isinstance(info.value, ResourceExhaustedError)
        view[:] = _pattern(5, 5000)
        view.release()
        ring.publish(slice_)
        with pytest.raises(SharedMemoryRingFullError):
            ring.reserve(5000, keep=[slice_.generation])  # an earlier item of the same response
        ring.reserve(5000)  # otherwise it may go
        with pytest.raises(StaleSharedMemoryError):
            reader.read(slice_)


def test_item_larger_than_the_region_is_refused(ring):
    assert ring.max_item_bytes < ring.size_bytes
    ring.put(b"y" * ring.max_item_bytes)  # the largest item fits
    with pytest.raises(SharedMemoryRingFullError, match="does not fit"):
        ring.reserve(ring.max_item_bytes + 1)


def test_concurrent_writers_and_a_reader_never_see_torn_data():
    num_threads, per_thread = 6, 150
    results: list[list[tuple[SharedMemorySlice, bytes]]] = [[] for _ in range(num_threads)]
    errors: list[BaseException] = []
    done = threading.Event()
    # ~4 MB written through a 1 MiB ring: it wraps several times, and a writer descheduled mid-write
    # (its slot blocks the others: RingFull) is rare enough that most writes land even on a loaded host
    with SharedMemoryRing(1024 * 1024) as ring:
        reader = SharedMemoryReader()

        def write(index: int) -> None:
            try:
                rng = np.random.default_rng(index)
                for k in range(per_thread):
                    data = bytes([index * 16 + k % 16]) * int(rng.integers(1, 9000))
                    # full: another thread's slot is being written where this one would go
                    with contextlib.suppress(SharedMemoryRingFullError):
                        results[index].append((ring.put(data), data))
            except BaseException as exc:
                errors.append(exc)

        def read() -> None:
            checked = 0
            try:
                while not done.is_set() or checked == 0:
                    for items in results:
                        for slice_, data in items[-3:]:
                            try:
                                assert bytes(reader.read(slice_)) == data
                                checked += 1
                            except StaleSharedMemoryError:
                                pass
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(num_threads)]
        watcher = threading.Thread(target=read)
        watcher.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        watcher.join()
        reader.close()
        assert not errors, errors
        generations = [s.generation for items in results for s, _ in items]
        assert len(generations) == len(set(generations)) > num_threads * per_thread // 4
        # once the writers are done, every thread's last item is either intact or cleanly stale
        final = SharedMemoryReader()
        intact = 0
        for items in results:
            slice_, data = items[-1]
            try:
                assert bytes(final.read(slice_)) == data
                intact += 1
            except StaleSharedMemoryError:
                pass
        final.close()
        assert intact >= 1


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/dev/shm/vlm-emb-1-" + "a" * 32,
        "vlm-emb-1-" + "a" * 32 + "/../x",
        "vlm-emb-1-" + "a" * 31,
        "vlm-emb-1-" + "A" * 32,
        "vlm-emb-x-" + "a" * 32,
        "vlm-emb-1-" + "a" * 32 + "\n",
        "psm_12345",
        "sem.vlm-emb-1-" + "a" * 32,
        "",
    ],
)
def test_only_our_region_names_are_opened(reader, name):
    bad = SimpleNamespace(region=name, offset=64, length=8, generation=1)
    with pytest.raises(InvalidArgumentError, match="not a shared-memory region name"):
        reader.read(bad)
    assert reader.open_regions == ()


def test_out_of_bounds_and_misaligned_slices_are_refused(ring, reader):
    slice_ = ring.put(b"z" * 100)

    def at(**fields):
        values = {
            "region": slice_.region,
            "offset": slice_.offset,
            "length": slice_.length,
            "generation": slice_.generation,
        }
        return SimpleNamespace(**{**values, **fields})

    with pytest.raises(InvalidArgumentError, match="outside region"):
        reader.read(at(offset=ring.size_bytes))
    with pytest.raises(InvalidArgumentError, match="outside region"):
        reader.read(at(length=ring.size_bytes))
    with pytest.raises(InvalidArgumentError, match="outside region"):
        reader.read(at(offset=2**63, length=2**63))
    with pytest.raises(InvalidArgumentError, match="not a slot payload offset"):
        reader.read(at(offset=slice_.offset + 8))
    with pytest.raises(InvalidArgumentError, match="not a slot payload offset"):
        reader.read(at(offset=0))
    with pytest.raises(InvalidArgumentError, match="dtype and shape need 96"):
        reader.read(slice_, expected_length=96)
    with pytest.raises(InvalidArgumentError, match="the slot holds 100"):
        reader.read(at(length=64))
    with pytest.raises(StaleSharedMemoryError):
        reader.read(at(generation=slice_.generation + 1))
    assert bytes(reader.read(slice_)) == b"z" * 100  # the good slice still reads


def test_missing_region_is_failed_precondition(reader):
    name = "vlm-emb-1-" + "0" * 32
    with pytest.raises(SharedMemoryUnavailableError) as info:
        reader.read(SimpleNamespace(region=name, offset=64, length=8, generation=1))
    assert isinstance(info.value, FailedPreconditionError)
    assert info.value.region == name
    assert "not visible to this LLM service" in str(info.value) and "ipc" in str(info.value)


def test_reserving_pages_fails_clearly_and_leaves_nothing_behind(monkeypatch):
    before = {n for n in os.listdir(shm.SHM_DIRECTORY) if n.startswith(shm.REGION_PREFIX)}

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shm.os, "posix_fallocate", no_space)
    with pytest.raises(SharedMemoryUnavailableError) as info:
        SharedMemoryRing(64 * 1024 * 1024)
    message = str(info.value)
    assert "cannot reserve 64 MiB" in message and "shm_size" in message and "--shared-memory-mb" in message
    after = {n for n in os.listdir(shm.SHM_DIRECTORY) if n.startswith(shm.REGION_PREFIX)}
    assert after == before


def test_file_systems_without_fallocate_get_zero_filled_pages(monkeypatch, reader):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(shm.os, "posix_fallocate", unsupported)
    with SharedMemoryRing(16 * 1024) as ring:
        assert os.stat(ring.path).st_size == 16 * 1024
        assert bytes(reader.read(ring.put(b"ok"))) == b"ok"


def test_close_unlinks_and_is_idempotent(reader):
    ring = SharedMemoryRing(8192)
    slice_ = ring.put(b"abc")
    assert ring.path.exists() and (ring.path.stat().st_mode & 0o777) == 0o600
    ring.close()
    assert not ring.path.exists()
    ring.close()
    with pytest.raises(SharedMemoryUnavailableError):
        ring.reserve(8)
    with pytest.raises(SharedMemoryUnavailableError, match="not visible"):
        reader.read(slice_)


def test_close_waits_for_a_write_in_progress(reader):
    ring = SharedMemoryRing(8192)
    slice_, view = ring.reserve(4)
    ring.close()
    assert not ring.path.exists()  # unlinked at once
    view[:] = b"late"  # still mapped: a writer in another thread never hits an unmapped page
    view.release()
    with pytest.raises(SharedMemoryUnavailableError):
        ring.publish(slice_)  # the caller falls back to bytes


def test_truncated_region_is_stale_not_a_crash(reader):
    with SharedMemoryRing(16 * 1024) as ring:
        slice_ = ring.put(b"q" * 8000)
        assert reader.read(slice_)
        os.truncate(ring.path, 4096)  # a misbehaving process: reading past EOF would be SIGBUS
        with pytest.raises(StaleSharedMemoryError, match="truncated"):
            reader.read(slice_)


def test_reader_keeps_a_bounded_number_of_regions():
    reader = SharedMemoryReader(max_open_regions=2)
    rings = [SharedMemoryRing(8192) for _ in range(3)]
    try:
        slices = [r.put(b"r%d" % i) for i, r in enumerate(rings)]
        for i, s in enumerate(slices):
            assert bytes(reader.read(s)) == b"r%d" % i
        assert reader.open_regions == (rings[1].name, rings[2].name)
        assert bytes(reader.read(slices[0])) == b"r0"  # reopened on demand
    finally:
        reader.close()
        for r in rings:
            r.close()


def test_reader_releases_regions_their_writer_unlinked(reader):
    old, new = SharedMemoryRing(8192), SharedMemoryRing(8192)
    try:
        assert reader.read(old.put(b"old")) and reader.open_regions == (old.name,)
        old.close()  # the encoder restarted: a new region, the old one unlinked
        assert reader.read(new.put(b"new")) and reader.open_regions == (new.name,)
    finally:
        new.close()


def test_orphaned_regions_of_dead_writers_are_removed(monkeypatch):
    monkeypatch.setattr(shm, "_ORPHAN_MIN_AGE_S", 0.0)
    orphan = shm.SHM_DIRECTORY / shm.new_region_name()
    orphan.write_bytes(b"\0" * 4096)  # as a killed writer leaves it: nobody holds its lock
    try:
        with SharedMemoryRing(8192) as live:
            assert not orphan.exists()  # removed when the new ring started
            assert orphan.name not in shm.remove_orphaned_regions()
            assert shm.remove_orphaned_regions() == [] and live.path.exists()  # a live ring is kept
    finally:
        orphan.unlink(missing_ok=True)


# --- tensor codec ------------------------------------------------------------------------------------


def _shared_tensor(ring: SharedMemoryRing, value: torch.Tensor) -> common_pb2.Tensor:
    message = encode_torch(value)
    slice_ = ring.put(message.data)
    message.data = b""
    message.shared_memory.region = slice_.region
    message.shared_memory.offset = slice_.offset
    message.shared_memory.length = slice_.length
    message.shared_memory.generation = slice_.generation
    return message


def test_codec_reads_shared_memory_through_the_reader_bit_exact(ring, reader):
    value = torch.randn(5, 7).to(torch.bfloat16)
    message = _shared_tensor(ring, value)
    decoded = decode_torch(message, shared_memory=reader, expected_shape=(-1, 7))
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded.view(torch.int16), value.view(torch.int16))
    decoded[0, 0] = 1.0  # owns its memory: writable, the region is unchanged
    assert torch.equal(decode_torch(message, shared_memory=reader), value)
    array = decode_numpy(message, shared_memory=reader, writable=True)
    assert array.shape == (5, 7) and array.flags.writeable


def test_codec_refuses_shared_memory_without_a_reader(ring):
    message = _shared_tensor(ring, torch.zeros(2, 3))
    with pytest.raises(SharedMemoryUnavailableError) as info:
        decode_torch(message, field="embedding.features")
    assert isinstance(info.value, FailedPreconditionError) and info.value.region == ring.name
    assert "embedding.features" in str(info.value)


def test_codec_refuses_data_and_shared_memory_together(ring, reader):
    message = _shared_tensor(ring, torch.zeros(2, 3))
    message.data = b"\0" * 24
    with pytest.raises(TensorFormatError, match="both data and shared_memory"):
        decode_torch(message, shared_memory=reader)


def test_codec_checks_the_slice_length_against_dtype_and_shape(ring, reader):
    message = _shared_tensor(ring, torch.zeros(2, 3))
    message.shape[:] = [2, 4]
    with pytest.raises(InvalidArgumentError, match="need 32"):
        decode_torch(message, shared_memory=reader)


def test_stale_slice_through_the_codec_is_not_found(reader):
    with SharedMemoryRing(8192) as ring:
        message = _shared_tensor(ring, torch.ones(500))  # 2000 bytes
        for _ in range(4):
            ring.put(b"\1" * 3000)  # wraps and overwrites it
        with pytest.raises(StaleSharedMemoryError):
            decode_torch(message, shared_memory=reader)


def test_codec_describes_a_shared_memory_tensor_without_reading_it(ring):
    """What the LLM service forwards to its engine process: checked like a read, nothing read."""
    value = torch.randn(3, 4).to(torch.bfloat16)
    message = _shared_tensor(ring, value)
    assert shared_memory_reference(message, field="f") == ("bfloat16", (3, 4))
    assert shared_memory_reference(encode_torch(value)) is None  # sent as bytes
    message.shape[:] = [3, 5]
    with pytest.raises(InvalidArgumentError, match="f.shared_memory.length is 24 bytes but .* need 30"):
        shared_memory_reference(message, field="f")
    message.shape[:] = [3, 4]
    message.shared_memory.region = "../etc/passwd"
    with pytest.raises(InvalidArgumentError, match="not a shared-memory region name"):
        shared_memory_reference(message, field="f")
    message = _shared_tensor(ring, value)
    message.shared_memory.offset += 1
    with pytest.raises(InvalidArgumentError, match="not a slot payload offset"):
        shared_memory_reference(message)
    message = _shared_tensor(ring, value)
    message.data = b"\0" * 24
    with pytest.raises(TensorFormatError, match="both data and shared_memory"):
        shared_memory_reference(message)


def test_region_paths_stay_in_the_shm_directory():
    name = shm.new_region_name()
    assert Path(shm.SHM_DIRECTORY / name).parent == shm.SHM_DIRECTORY
    assert name.startswith(f"{shm.REGION_PREFIX}{os.getpid()}-")


@pytest.mark.skipif(not POPULATE_ADVICE, reason="MADV_POPULATE_READ needs Linux 5.14")
def test_a_readers_new_mapping_is_populated_in_the_background_and_stays_closable():
    with SharedMemoryRing(16 << 20) as ring:
        ring.prefault()
        slice_ = ring.put(_pattern(9, 4096))
        reader = SharedMemoryReader(populate=False)
        assert bytes(reader.read(slice_)) == _pattern(9, 4096)
        region = reader._mappings[slice_.region].region
        assert mapped_kib(region) < 1024  # only the pages read so far
        shm.populate_in_background(region).join()
        assert mapped_kib(region) == 16 << 10  # every page mapped, none written
        assert bytes(reader.read(slice_)) == _pattern(9, 4096)
        reader.close()
        assert region.closed  # the thread held no export of the mapping


def test_readers_populate_by_default(monkeypatch):
    started = []
    monkeypatch.setattr(shm, "populate_in_background", started.append)
    with SharedMemoryRing(1 << 20) as ring:
        slice_ = ring.put(_pattern(3, 100))
        reader = SharedMemoryReader()
        reader.read(slice_)
        reader.read(slice_)  # the mapping is opened (and populated) once
        assert len(started) == 1
        reader.close()
        assert not SharedMemoryReader(populate=False).populate


@pytest.mark.parametrize("advice", [True, False], ids=["populate", "touch"])
def test_ring_prefault_maps_every_page_with_or_without_the_populate_advice(advice, monkeypatch):
    if advice and not POPULATE_ADVICE:
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    if not advice:
        monkeypatch.setattr(shm, "populate", lambda buffer, *, write: False)  # an older kernel
    with SharedMemoryRing(8 << 20) as ring:
        assert mapped_kib(ring._view) < 1024
        ring.prefault()
        assert mapped_kib(ring._view) == 8 << 10
        slice_ = ring.put(_pattern(5, 5000))
        assert bytes(SharedMemoryReader(populate=False).read(slice_)) == _pattern(5, 5000)
