"""Asyncio micro-batcher: gathers concurrent requests into one model run.

Callers ``await submit(item)``. A loop on the event loop waits until ``max_batch_size`` items are queued
or the oldest has waited ``max_queue_delay_s``, then hands the batch to ``run_batch`` in one dedicated
thread (the model never runs on the event loop, and never runs two batches at once). While a batch runs,
new items queue up and form the next batch, so under load batches fill without any delay.

Bounded: when ``max_queue_size`` items are waiting, ``submit`` raises ``ResourceExhaustedError``.
Cancellation-safe: a cancelled caller's item leaves the queue at once; if its batch already runs, the
result is dropped. Errors of a batch go to every caller in it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from vlm_protocol.errors import ResourceExhaustedError, UnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """One item's output, its batch size, and ``time.perf_counter()`` stamps of its life."""

    output: R
    batch_size: int
    enqueued_at: float
    started_at: float
    finished_at: float

    @property
    def queue_s(self) -> float:
        return self.started_at - self.enqueued_at

    @property
    def run_s(self) -> float:
        return self.finished_at - self.started_at


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[BatchResult[R]]
    enqueued_at: float


class MicroBatcher(Generic[T, R]):
    """Batches ``submit``ted items for ``run_batch(items) -> outputs`` (one output per item, in order)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        name: str = "encoder",
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_queue_delay_s >= 0")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_queue_delay_s = max_queue_delay_s
        self._max_queue_size = max_queue_size
        self._name = name
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{name}-model"
        )
        self._is_closed = False
        self.num_batches = 0
        self.num_items = 0

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is not None:
            return
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self._name}-batcher")

    async def close(self) -> None:
        """Stop batching: queued callers get UNAVAILABLE; a running batch finishes in its thread."""
        self._is_closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(UnavailableError(f"{self._name} is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: T) -> BatchResult[R]:
        if self._task is None or self._is_closed:
            raise UnavailableError(f"{self._name} is not running")
        if len(self._queue) >= self._max_queue_size:
            raise ResourceExhaustedError(
                f"{self._name} queue is full ({self._max_queue_size} items waiting); retry later"
            )
        future: asyncio.Future[BatchResult[R]] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, time.perf_counter())
        self._queue.append(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # Leave the queue now so cancelled work neither runs nor counts against the bound.
            # Not found means it is already in a running batch; its result will be dropped.
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
            raise

    async def run_in_model_thread(self, fn: Callable[[], V]) -> V:
        """Run ``fn()`` in the thread that runs the batches, between batches (e.g. an engine warm-up:
        CUDA graphs and compiled code are best built in the thread that replays them)."""
        if self._is_closed:
            raise UnavailableError(f"{self._name} is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_batch()
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch_size))]
            batch = [pending for pending in batch if not pending.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} items")
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(UnavailableError(f"{self._name} is shutting down"))
                raise
            except Exception as exc:  # delivered to every caller of the batch; the loop keeps going
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            finally:
                self.num_batches += 1
                self.num_items += len(batch)
            finished = time.perf_counter()
            for pending, output in zip(batch, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(
                        BatchResult(output, len(batch), pending.enqueued_at, started, finished)
                    )

    async def _wait_for_batch(self) -> None:
        """Wait until a full batch is queued or the oldest item's delay has passed."""
        assert self._wakeup is not None
        while len(self._queue) < self._max_batch_size:
            remaining = self._queue[0].enqueued_at + self._max_queue_delay_s - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
            if not self._queue:  # everything queued was cancelled
                return
