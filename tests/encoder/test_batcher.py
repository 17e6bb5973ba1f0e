"""MicroBatcher: batching by size and delay, bounded queue, errors, cancellation, off-loop execution."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from encoder_service.batcher import MicroBatcher
from vlm_protocol.errors import ResourceExhaustedError, UnavailableError


class Recorder:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.gate: threading.Event | None = None

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append(list(items))
        return [item * 10 for item in items]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_concurrent_submissions_share_batches_and_results_match_items():
    async def scenario():
        recorder = Recorder(delay_s=0.01)
        batcher = MicroBatcher(recorder, max_batch_size=4, max_queue_delay_s=0.05, max_queue_size=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()
        assert [r.output for r in results] == [i * 10 for i in range(10)]
        assert batcher.num_batches == len(recorder.batches) < 10
        assert max(len(b) for b in recorder.batches) <= 4
        assert sorted(i for b in recorder.batches for i in b) == list(range(10))
        assert all(r.batch_size >= 1 and r.queue_s >= 0 and r.run_s > 0 for r in results)
        # The model ran in the batcher's own thread, never on the event loop's.
        assert recorder.threads and threading.current_thread().name not in recorder.threads
        assert len(recorder.threads) == 1

    _run(scenario())


def test_a_lone_item_runs_after_the_queue_delay():
    async def scenario():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=10)
        batcher.start()
        started = time.perf_counter()
        result = await batcher.submit(3)
        elapsed = time.perf_counter() - started
        await batcher.close()
        assert result.output == 30 and recorder.batches == [[3]]
        assert 0.04 <= elapsed < 2.0

    _run(scenario())


def test_without_a_delay_items_arriving_during_a_batch_form_the_next_one():
    async def scenario():
        recorder = Recorder()
        recorder.gate = threading.Event()
        batcher = MicroBatcher(recorder, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=100)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        while not recorder.threads:  # the lone first item runs at once, without waiting for others
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        assert recorder.batches == [[0], [1, 2, 3, 4, 5]]
        assert [r.output for r in results] == [0, 10, 20, 30, 40, 50]

    _run(scenario())


def test_full_queue_is_resource_exhausted():
    async def scenario():
        recorder = Recorder()
        recorder.gate = threading.Event()
        batcher = MicroBatcher(recorder, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(0))  # taken by the model thread, blocks on the gate
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhaustedError, match="queue is full"):
            await batcher.submit(3)
        recorder.gate.set()
        assert [r.output for r in await asyncio.gather(running, *queued)] == [0, 10, 20]
        await batcher.close()

    _run(scenario())


def test_errors_reach_every_caller_of_the_batch_and_the_loop_survives():
    async def scenario():
        calls = {"n": 0}

        def flaky(items: list[int]) -> list[int]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("model exploded")
            return items

        batcher = MicroBatcher(flaky, max_batch_size=4, max_queue_delay_s=0.02, max_queue_size=10)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert (await batcher.submit(7)).output == 7
        await batcher.close()

    _run(scenario())


def test_cancelled_callers_leave_the_queue_and_never_run():
    async def scenario():
        recorder = Recorder()
        recorder.gate = threading.Event()
        batcher = MicroBatcher(recorder, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        assert batcher.queue_size == 1
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.queue_size == 0  # the slot is free again at once
        recorder.gate.set()
        assert (await first).output == 10
        assert (await batcher.submit(3)).output == 30
        await batcher.close()
        assert recorder.batches == [[1], [3]]

    _run(scenario())


def test_close_fails_queued_items_and_refuses_new_ones():
    async def scenario():
        recorder = Recorder()
        recorder.gate = threading.Event()
        batcher = MicroBatcher(recorder, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=5)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        await batcher.close()
        recorder.gate.set()
        for future in (running, waiting):
            with pytest.raises(UnavailableError):
                await future
        with pytest.raises(UnavailableError):
            await batcher.submit(3)

    _run(scenario())
