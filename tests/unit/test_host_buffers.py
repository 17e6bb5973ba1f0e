"""SpareBuffers: large buffers handed out faulted in, each to one owner, zeroed, of the exact size."""

from __future__ import annotations

import mmap
import os
import time

import pytest

from tests.unit.memory_maps import POPULATE_ADVICE, mapped_kib
from vlm_protocol.host_buffers import HUGE_PAGE_BYTES, SpareBuffers, fresh_buffer, populate, private_buffer

SIZE = 3 * HUGE_PAGE_BYTES + 4096  # not a multiple of the huge page: the tail is ordinary pages


def wait_ready(spares: SpareBuffers, nbytes: int, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while spares.ready(nbytes) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{spares.ready(nbytes)} spares of {nbytes} bytes ready, expected {count}")
        time.sleep(0.005)


@pytest.fixture
def spares():
    pool = SpareBuffers(per_size=2, max_sizes=2, max_bytes=8 * SIZE)
    yield pool
    pool.close()


def test_a_miss_is_fresh_then_spares_are_filled_and_handed_out(spares):
    first = spares.take(SIZE)
    assert (spares.hits, spares.misses) == (0, 1)
    assert isinstance(first, mmap.mmap) and len(first) == SIZE
    wait_ready(spares, SIZE, 2)
    second = spares.take(SIZE)
    assert (spares.hits, spares.misses) == (1, 1)
    assert len(second) == SIZE and bytes(second[:16]) == bytes(16) and bytes(second[-16:]) == bytes(16)
    wait_ready(spares, SIZE, 2)  # the one handed out is replaced


def test_each_buffer_has_one_owner(spares):
    spares.take(SIZE)
    wait_ready(spares, SIZE, 2)
    a, b = spares.take(SIZE), spares.take(SIZE)
    assert spares.hits == 2
    a[:4] = b"\x01\x02\x03\x04"
    b[-4:] = b"\xff\xff\xff\xff"
    assert bytes(b[:4]) == bytes(4) and bytes(a[-4:]) == bytes(4)  # distinct memory


def test_small_and_oversized_requests_are_never_pooled(spares):
    small = spares.take(HUGE_PAGE_BYTES - 1)
    assert isinstance(small, bytearray) and len(small) == HUGE_PAGE_BYTES - 1
    huge = spares.take(8 * SIZE + 1)  # above max_bytes
    assert len(huge) == 8 * SIZE + 1
    assert (spares.hits, spares.misses) == (0, 0)
    time.sleep(0.05)
    assert spares.ready(8 * SIZE + 1) == 0


def test_a_size_near_the_budget_keeps_as_many_spares_as_fit(spares):
    spares.take(3 * SIZE)  # max_bytes = 8 * SIZE: per_size=2 of these fit
    wait_ready(spares, 3 * SIZE, 2)
    spares.take(5 * SIZE)  # one fits, once a spare of the older size makes room
    wait_ready(spares, 5 * SIZE, 1)
    time.sleep(0.1)  # and it stays: the older size may not take its room back
    assert spares.ready(5 * SIZE) == 1 and spares.ready(3 * SIZE) == 1


def test_only_the_most_recent_sizes_keep_spares(spares):
    sizes = [SIZE, SIZE + 4096, SIZE + 8192]  # max_sizes=2
    for size in sizes[:2]:
        spares.take(size)
        wait_ready(spares, size, 2)
    spares.take(sizes[2])
    wait_ready(spares, sizes[2], 2)
    assert spares.ready(sizes[0]) == 0 and spares.ready(sizes[1]) == 2


def test_the_size_taken_last_is_filled_first_within_the_byte_budget():
    pool = SpareBuffers(per_size=2, max_sizes=4, max_bytes=3 * SIZE)
    try:
        pool.take(SIZE)
        wait_ready(pool, SIZE, 2)
        pool.take(SIZE + 4096)
        wait_ready(pool, SIZE + 4096, 2)  # room made by dropping the older size's spares
        assert pool.ready(SIZE) == 0
    finally:
        pool.close()


def test_closed_pool_still_hands_out_fresh_buffers(spares):
    spares.take(SIZE)
    wait_ready(spares, SIZE, 2)
    spares.close()
    assert spares.ready(SIZE) == 0
    assert len(spares.take(SIZE)) == SIZE


def test_fresh_buffer_and_private_buffer_sizes():
    assert isinstance(fresh_buffer(100), bytearray)
    assert len(fresh_buffer(SIZE)) == SIZE
    buffer = private_buffer(SIZE)
    buffer[:] = b"\x07" * SIZE  # writable, exactly SIZE bytes
    assert len(buffer) == SIZE


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        SpareBuffers(per_size=0)


def test_a_forked_child_fills_its_own_spares():
    from vlm_protocol import host_buffers

    private_buffer(SIZE)  # the parent's filler runs
    pid = os.fork()
    if pid == 0:  # child: no filler thread was inherited, so one must start here
        code = 1
        try:
            private_buffer(SIZE)
            wait_ready(host_buffers._SPARES, SIZE, 1)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(not POPULATE_ADVICE, reason="MADV_POPULATE_WRITE needs Linux 5.14")
def test_populate_maps_every_page_without_writing():
    buffer = fresh_buffer(SIZE)
    buffer[:4] = b"\x01\x02\x03\x04"
    assert mapped_kib(buffer) < SIZE >> 10
    assert populate(buffer, write=True)
    assert mapped_kib(buffer) == SIZE >> 10
    assert bytes(buffer[:4]) == b"\x01\x02\x03\x04" and bytes(buffer[4:64]) == bytes(60)


def test_spares_are_faulted_in_even_without_the_populate_advice(monkeypatch):
    from vlm_protocol import host_buffers

    monkeypatch.setattr(host_buffers, "populate", lambda buffer, *, write: False)  # an older kernel: memset
    pool = SpareBuffers(per_size=1, max_bytes=2 * SIZE)
    try:
        pool.take(SIZE)
        wait_ready(pool, SIZE, 1)
        spare = pool.take(SIZE)
        assert pool.hits == 1 and mapped_kib(spare) == SIZE >> 10
    finally:
        pool.close()
