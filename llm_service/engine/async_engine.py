"""The engine loop on its own thread, with an asyncio API for the gRPC servicer.

`generate()` returns an async iterator of `RequestOutput`s. Each request has a one-slot collector: the
loop merges new output into the slot and never waits for the reader, so a slow client cannot stall
the batch. Adds and aborts go through a command queue and are applied between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from llm_service.engine.calls import EngineStats, engine_stats
from llm_service.engine.engine_core import EngineCore, GenerationInput, RequestOutput
from vlm_protocol.errors import InternalError, UnavailableError, VlmError

if TYPE_CHECKING:
    from llm_service.model_info import ModelDescription

__all__ = ["AsyncLLMEngine", "EngineStats"]  # EngineStats now lives in llm_service.engine.calls

logger = logging.getLogger(__name__)

T = TypeVar("T")

_IDLE_WAIT_S = 0.05


class _Collector:
    """One slot per request, written by the loop thread, read by one asyncio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        with self._lock:
            self._pending = output if self._pending is None else _merge(self._pending, output)
        self._wake()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        # A closed loop means the reader is gone (its abort is queued): nothing to wake.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._event.set)

    async def get(self) -> RequestOutput:
        while True:
            await self._event.wait()
            with self._lock:
                self._event.clear()
                if self._pending is not None:
                    output, self._pending = self._pending, None
                    return output
                if self._error is not None:
                    raise self._error


async def stream_outputs(
    request_id: str, added: Future[None], collector: _Collector, abort: Callable[[str], None]
) -> AsyncIterator[RequestOutput]:
    """A request's outputs once its add is queued: wait for the add (its errors raise here), then yield
    until the finishing output. Cancelled or closed early, the request is aborted (`abort` is queued
    after the add, so it undoes the add if that went through)."""
    try:
        await asyncio.wrap_future(added)
    except asyncio.CancelledError:
        abort(request_id)
        raise
    finished = False
    try:
        while True:
            output = await collector.get()
            finished = output.is_finished
            yield output
            if finished:
                return
    finally:
        if not finished:
            abort(request_id)


def _merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    return replace(
        new,
        new_token_ids=old.new_token_ids + new.new_token_ids,
        text_delta=old.text_delta + new.text_delta,
        logprobs=old.logprobs + new.logprobs,
    )


class AsyncLLMEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._collectors: dict[str, _Collector] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)
        self._thread.start()

    # --- asyncio side -----------------------------------------------------------------------------

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs until it finishes. Validation errors raise here.

        Closing the iterator early (client gone, deadline) aborts the request and frees its blocks.
        """
        if self._stopped.is_set():
            raise UnavailableError("the engine is shut down")
        collector = _Collector(asyncio.get_running_loop())
        added: Future[None] = Future()

        def add() -> None:
            if not added.set_running_or_notify_cancel():
                return  # the caller was cancelled before the request got here: do not queue it
            try:
                self.core.add_request(inp)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                added.set_exception(exc)
                return
            self._collectors[inp.request_id] = collector
            added.set_result(None)

        self._commands.put(add)
        # aclosing: closing this generator early closes the inner one at once, which aborts the request
        async with contextlib.aclosing(stream_outputs(inp.request_id, added, collector, self.abort)) as outputs:
            async for output in outputs:
                yield output

    @property
    def tokenizer(self):
        """The engine's tokenizer, for decoding single tokens on the asyncio side (log probs)."""
        return self.core.tokenizer

    def describe(self, model_dir: str | Path) -> ModelDescription:
        """What GetModelInfo reports and incoming embeddings are checked against (call before serving)."""
        from llm_service.model_info import describe_model

        return describe_model(self.core, model_dir)

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(core, *args)` on the engine thread between steps (e.g. tokenizer work) and return
        its result. Prefer the module-level functions of `llm_service.engine.calls`: they also work
        with the engine in its own process (`ProcessEngineClient`)."""
        if self._stopped.is_set():
            raise UnavailableError("the engine is shut down")
        done: Future[T] = Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn(self.core, *args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)

        self._commands.put(run)
        return await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        """Cancel a request from any thread; its blocks are freed before the next step."""

        def do_abort() -> None:
            self._collectors.pop(request_id, None)
            self.core.abort(request_id)

        self._commands.put(do_abort)

    def stats(self) -> EngineStats:
        """Read from the calling thread (a snapshot, not synchronised with the loop)."""
        return engine_stats(self.core)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(lambda: None)  # wake the loop
        self._thread.join(timeout_s)

    # --- loop thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._apply_commands(block=not self.core.has_unfinished_requests())
            if not self.core.has_unfinished_requests():
                continue
            try:
                outputs = self.core.step()
            except Exception:  # a bug: fail the affected requests, keep serving the rest
                logger.exception("engine step failed; aborting the requests in flight")
                self._fail_all(InternalError("the engine failed while running this request"))
                continue
            for output in outputs:
                collector = self._collectors.get(output.request_id)
                if collector is None:
                    continue
                if output.is_finished:
                    del self._collectors[output.request_id]
                collector.put(output)
        self._fail_all(UnavailableError("the engine shut down before this request finished"))

    def _apply_commands(self, *, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_all(self, error: VlmError) -> None:
        for request_id, collector in list(self._collectors.items()):
            self.core.abort(request_id)
            collector.fail(error)
        self._collectors.clear()
