"""`freeze_startup_objects`: what is alive is left out of garbage collection, what comes later is not."""

import gc
import logging
import weakref

import pytest

from vlm_protocol.gc_freeze import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the rest of the test process keeps a normal collector


def _in_collected_generations(obj) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_objects_alive_at_the_call_are_frozen_and_later_ones_are_collected(unfrozen, caplog):
    before = _Node()
    assert _in_collected_generations(before)
    with caplog.at_level(logging.INFO, logger="vlm_protocol.gc_freeze"):
        frozen = freeze_startup_objects("test service")
    assert frozen > 0 and gc.get_freeze_count() > 0
    assert not _in_collected_generations(before)  # full collections no longer walk it
    assert "test service" in caplog.text and "frozen out of garbage collection" in caplog.text

    later = _Node()
    assert _in_collected_generations(later)
    gone = weakref.ref(later)
    del later
    gc.collect()
    assert gone() is None  # cyclic garbage made after the freeze is still collected


def test_garbage_alive_before_the_call_is_collected_not_frozen(unfrozen):
    cycle = _Node()
    gone = weakref.ref(cycle)
    del cycle  # unreachable, but only a collection frees it
    freeze_startup_objects("test service")
    assert gone() is None
