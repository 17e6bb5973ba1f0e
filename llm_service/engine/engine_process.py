"""The engine in its own process (`--engine-process`): the gRPC threads and the engine's step loop no
longer share one GIL.

`ProcessEngineClient` has the asyncio API of `AsyncLLMEngine` (`generate`, `abort`, `call`,
`tokenizer`, `describe`, `shutdown`); the `EngineCore` lives in a child process started with the
"spawn" context (safe with CUDA: nothing of the parent's CUDA state is inherited) and runs the same
loop as the async engine's thread: apply the queued commands, step, send that step's outputs.

Wire: two one-way pipes, each message one tuple pickled with the standard pickle (`send_bytes`).
Embedding tensors of 1 MiB and more travel through a shared-memory ring the frontend owns
(`staged_embeddings`: a `StagedTensor` reference in the message, the bytes copied once in and once
out); smaller ones, and any the ring has no room for, inside the message (torch pickles a tensor's
storage as bytes). `shared_memory_mb=0` sends everything through the pipe. An embedding the client
sent as a reference into the encoder's ring arrives as a `StagedTensor` already (the service
forwards it unread: `reads_shared_memory_in`) and the engine process reads the encoder's slot. An
embedding the engine process already holds goes by content id alone (`held_embeddings`: the add's
`StorePlan` says what it keeps and drops, within `embedding_store_bytes`).

    frontend -> engine   ("add", inp, StorePlan) | ("abort", request_id) | ("call", call_id, pickled (fn, args))
                         | ("shutdown",)
    engine -> frontend   ("ready", ModelDescription) | ("start_failed", exception)
                         ("added", request_id, exception or None, content ids of the plan it does not hold)
                         ("outputs", [RequestOutput, ...])     one message per step
                         ("failed", [request_id, ...], error)  a step raised: those requests are aborted
                         ("result", call_id, ok, value or exception)

In the parent, a sender thread pickles and writes commands (a multi-megabyte embedding never blocks
the event loop on a full pipe) and a reader thread dispatches events to the per-request collectors.
If the engine process dies, every request in flight and every later call gets UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from llm_service.engine.async_engine import _Collector, stream_outputs
from llm_service.engine.held_embeddings import EmbeddingStore, HeldEmbeddings
from llm_service.engine.staged_embeddings import unstage
from vlm_protocol.errors import (
    InternalError,
    InvalidArgumentError,
    SharedMemoryUnavailableError,
    UnavailableError,
    VlmError,
)
from vlm_protocol.gc_freeze import freeze_startup_objects
from vlm_protocol.shared_memory import SharedMemoryReader
from vlm_protocol.torch_threads import apply_torch_threads

if TYPE_CHECKING:
    from llm_service.engine.engine_core import EngineConfig, EngineCore, GenerationInput, RequestOutput
    from llm_service.engine.model_runner import MultimodalEmbedding
    from llm_service.model_info import ModelDescription

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[engine %(process)d]: %(message)s"
DEFAULT_SHARED_MEMORY_MB = 256  # the frontend's ring for embeddings: ~54 LLaVA images in flight
DEFAULT_EMBEDDING_STORE_BYTES = 1 << 30  # embeddings the engine process keeps to be sent by id (held_embeddings.py)
_DIED = "the engine process stopped unexpectedly; retry shortly or on another replica"
_SHUT_DOWN = "the engine shut down before this request finished"

# Counters of the engine process (read with `await engine.call(process_counters)`); zeros elsewhere.
_counters = {"steps": 0, "requests_added": 0, "live_aborts": 0}


def process_counters(core: EngineCore) -> dict[str, int]:
    """steps run, requests added, and aborts that cancelled a live request, in the engine process;
    and the engine loop's torch CPU threads per operator (`--torch-threads`)."""
    return {**_counters, "torch_threads": torch.get_num_threads()}


def _dumps(message: tuple) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (VlmErrors do), else an InternalError that names it."""
    try:
        pickle.loads(_dumps((exc,)))
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return InternalError(f"{type(exc).__name__}: {exc}")
    return exc


# --- the engine process ------------------------------------------------------------------------------


def _engine_main(
    config: EngineConfig,
    core_factory: Callable[[EngineConfig], EngineCore] | None,
    commands: Connection,
    events: Connection,
    log_level: int,
    ring: tuple[str, str] | None = None,
    store_bytes: int | None = None,
) -> None:
    """Entry point of the engine process. `ring`: (directory, region name) of the frontend's ring;
    `store_bytes`: the frontend's budget of embeddings held here (`held_embeddings`)."""
    # Ctrl-C in a terminal reaches the whole process group: the frontend drains and then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=_LOG_FORMAT)

    def send(message: tuple) -> None:
        try:
            data = _dumps(message)
        except Exception as exc:  # noqa: BLE001 - e.g. a call returned something unpicklable
            if message[0] != "result":
                raise
            data = _dumps(("result", message[1], False, InternalError(f"unpicklable result: {exc}")))
        events.send_bytes(data)

    try:
        from llm_service.engine.engine_core import EngineCore
        from llm_service.model_info import describe_model

        apply_torch_threads(config.torch_threads, config.device, service="llm engine process")
        core = EngineCore(config) if core_factory is None else core_factory(config)
        description = describe_model(core, config.model_dir)
        reader = None
        if ring is not None:
            reader = SharedMemoryReader(directory=ring[0])
            reader.prefault(ring[1])
        freeze_startup_objects("llm engine process")  # full GC passes would stall the engine loop
    except BaseException as exc:
        logger.exception("the engine could not start")
        send(("start_failed", _portable(exc)))
        return
    send(("ready", description))
    try:
        _serve(core, commands, send, reader, store_bytes)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.warning("the frontend went away; the engine process exits")  # it died: do not linger


def _serve(
    core: EngineCore,
    commands: Connection,
    send: Callable[[tuple], None],
    reader: SharedMemoryReader | None = None,
    store_bytes: int | None = None,
) -> None:
    live: set[str] = set()
    store = EmbeddingStore(None if store_bytes is None else 2 * store_bytes)  # a backstop: plans keep it within 1x

    def apply(message: tuple) -> bool:
        kind = message[0]
        if kind == "add":
            _, sent, plan = message
            try:
                store.drop(plan.drop)
                inp = sent if reader is None else unstage(sent, reader)
                inp = store.resolve(inp, plan.keep)
                core.add_request(inp)
            except Exception as exc:  # noqa: BLE001 - handed to the caller of generate()
                # e.g. a forwarded slot reused before we read it: what we did not keep, the frontend forgets
                send(("added", sent.request_id, _portable(exc), store.missing(sent, plan)))
                return True
            live.add(inp.request_id)
            _counters["requests_added"] += 1
            send(("added", inp.request_id, None, ()))
        elif kind == "abort":
            request_id = message[1]
            live.discard(request_id)
            if core.abort(request_id):
                _counters["live_aborts"] += 1
        elif kind == "call":
            _, call_id, payload = message
            try:
                fn, args = pickle.loads(payload)  # here, so that a function this process cannot import fails one call
                result = ("result", call_id, True, fn(core, *args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller of call()
                result = ("result", call_id, False, _portable(exc))
            send(result)
        elif kind == "shutdown":
            return False
        else:
            logger.error("unknown command %r", kind)
        return True

    while True:
        # Idle: sleep until a command (or EOF) arrives. Busy: take what is queued, then step.
        if commands.poll(None if not core.has_unfinished_requests() else 0):
            while True:
                if not apply(pickle.loads(commands.recv_bytes())):
                    return
                if not commands.poll(0):
                    break
        if not core.has_unfinished_requests():
            continue
        try:
            outputs = core.step()
        except Exception:  # a bug: fail the affected requests, keep serving the rest
            logger.exception("engine step failed; aborting the requests in flight")
            failed = sorted(live)
            for request_id in failed:
                core.abort(request_id)
            live.clear()
            send(("failed", failed, InternalError("the engine failed while running this request")))
            continue
        _counters["steps"] += 1
        if outputs:
            for output in outputs:
                if output.is_finished:
                    live.discard(output.request_id)
            send(("outputs", outputs))


# --- the frontend ------------------------------------------------------------------------------------


class ProcessEngineClient:
    """`AsyncLLMEngine`'s interface over an `EngineCore` in a child process.

    The constructor blocks until the engine is loaded (and warmed by its own start-up: weights, KV
    cache, CUDA graphs); run it in a thread from asyncio. It raises what the engine's start raised
    (e.g. FileNotFoundError for a bad model directory).

    `core_factory` (picklable, e.g. a module-level function) builds the engine in the child instead
    of `EngineCore(config)`, e.g. random weights for a benchmark; then pass its `tokenizer` too
    (otherwise it is loaded from `config.model_dir`). `config.model_dir` must hold the config.json
    that `describe_model` reads. `shared_memory_mb`: the frontend's ring for large embeddings (0: all
    through the pipe); `embedding_store_bytes`: embeddings the engine process keeps so that later
    requests send them by content id (0: always whole).
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        core_factory: Callable[[EngineConfig], EngineCore] | None = None,
        tokenizer=None,
        shared_memory_mb: int = DEFAULT_SHARED_MEMORY_MB,
        embedding_store_bytes: int = DEFAULT_EMBEDDING_STORE_BYTES,
    ) -> None:
        self.config = config
        self._stager = _make_stager(shared_memory_mb)
        self._held = HeldEmbeddings(embedding_store_bytes)
        context = multiprocessing.get_context("spawn")
        commands_out, self._commands = context.Pipe(duplex=False)  # (receive end, send end)
        self._events, events_in = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_engine_main,
            args=(
                config, core_factory, commands_out, events_in, logging.getLogger().getEffectiveLevel(),
                None if self._stager is None else (str(self._stager.ring.directory), self._stager.ring.name),
                embedding_store_bytes,
            ),
            name="llm-engine",
            daemon=True,  # never outlives the frontend's interpreter
        )
        self.process.start()
        # Only the child holds these ends now: its death reads as EOF here, ours as EOF there.
        commands_out.close()
        events_in.close()
        self._lock = threading.Lock()
        self._collectors: dict[str, _Collector] = {}
        self._adds: dict[str, Future[None]] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._call_ids = itertools.count()
        self._dead = False
        self._stopping = False
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._death_callbacks: list[Callable[[], None]] = []
        try:
            self._tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.model_dir)
            self._description = self._wait_ready()
        except BaseException:
            self._kill()
            self._close_ring()
            raise
        self._sender = threading.Thread(target=self._send_loop, name="llm-engine-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="llm-engine-reader", daemon=True)
        self._sender.start()
        self._reader.start()
        logger.info("engine process %d ready", self.process.pid)

    # --- what the servicer and server read ------------------------------------------------------

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer loaded in this process (for decoding single tokens)."""
        return self._tokenizer

    def describe(self, model_dir: str | Path) -> ModelDescription:
        """The model description the engine process read off its loaded engine."""
        if Path(model_dir).resolve() != Path(self.config.model_dir).resolve():
            raise ValueError(f"the engine serves {self.config.model_dir}, not {model_dir}")
        return self._description

    def held_embedding(self, content_id: str) -> MultimodalEmbedding | None:
        """The embedding the engine process holds under `content_id` (features: a `HeldTensor`, no
        bytes: add it to a request as it is), or None."""
        return self._held.get(content_id)

    def reads_shared_memory_in(self, directory: str | Path) -> bool:
        """Whether the engine process reads shared-memory regions in `directory` itself, so that the
        service may forward an encoder's slice instead of reading it (`StagedTensor`)."""
        if self._stager is None:
            return False
        return Path(self._stager.ring.directory).resolve() == Path(directory).resolve()

    @property
    def is_alive(self) -> bool:
        return not self._dead and self.process.is_alive()

    def on_death(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from a background thread) if the engine process dies unexpectedly;
        at once if it already has. Not called on `shutdown()`."""
        with self._lock:
            dead = self._dead and not self._stopping
            if not dead:
                self._death_callbacks.append(callback)
        if dead:
            callback()

    # --- asyncio side ---------------------------------------------------------------------------

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RequestOutput]:
        """As `AsyncLLMEngine.generate`: validation errors raise at the first `anext`, closing early
        aborts the request, and a dead engine process raises UnavailableError."""
        collector = _Collector(asyncio.get_running_loop())
        added: Future[None] = Future()
        request_id = inp.request_id
        with self._lock:
            self._check_usable()
            if request_id in self._collectors:
                raise InvalidArgumentError(f"request id {request_id!r} is already in use")
            self._collectors[request_id] = collector
            self._adds[request_id] = added
        self._outbox.put(("add", inp))
        # aclosing: closing this generator early closes the inner one at once, which aborts the request
        async with contextlib.aclosing(stream_outputs(request_id, added, collector, self.abort)) as outputs:
            async for output in outputs:
                yield output

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(core, *args)` in the engine process between steps. `fn` and `args` must pickle:
        a module-level function (see `llm_service.engine.calls`), not a lambda."""
        done: Future[T] = Future()
        with self._lock:
            self._check_usable()
            call_id = next(self._call_ids)
            self._calls[call_id] = done
        try:
            payload = _dumps((fn, args))
        except Exception as exc:
            with self._lock:
                self._calls.pop(call_id, None)
            raise InternalError(f"cannot send {getattr(fn, '__qualname__', fn)!r} to the engine process: {exc}") from exc
        self._outbox.put(("call", call_id, payload))
        try:
            return await asyncio.wrap_future(done)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def abort(self, request_id: str) -> None:
        """Cancel a request from any thread; its blocks are freed before the engine's next step."""
        with self._lock:
            self._collectors.pop(request_id, None)
            self._adds.pop(request_id, None)
            if self._dead:
                return
        self._outbox.put(("abort", request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine process: ask, wait up to `timeout_s`, then terminate, then kill."""
        with self._lock:
            already = self._stopping
            self._stopping = True
        if not already:
            self._outbox.put(("shutdown",))
        self.process.join(timeout_s)
        if self.process.is_alive():
            logger.warning("engine process %d did not stop within %.1f s; killing it", self.process.pid, timeout_s)
            self._kill()
        self._outbox.put(None)
        self._sender.join(timeout_s)
        self._reader.join(timeout_s)
        self._commands.close()
        self._events.close()
        self._close_ring()

    def _close_ring(self) -> None:
        if self._stager is not None:
            self._stager.ring.close()

    # --- helpers --------------------------------------------------------------------------------

    def _check_usable(self) -> None:  # with the lock held
        if self._stopping:
            raise UnavailableError("the engine is shut down")
        if self._dead:
            raise UnavailableError(_DIED)

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)

    def _wait_ready(self) -> ModelDescription:
        while True:
            if self._events.poll(0.5):
                try:
                    message = pickle.loads(self._events.recv_bytes())
                except EOFError:
                    message = None
                if message is not None and message[0] == "ready":
                    return message[1]
                if message is not None and message[0] == "start_failed":
                    self.process.join(10.0)
                    raise message[1]
                self.process.join(10.0)
                raise RuntimeError(f"the engine process exited during start-up (exit code {self.process.exitcode})")
            if not self.process.is_alive():
                raise RuntimeError(f"the engine process exited during start-up (exit code {self.process.exitcode})")

    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                pending = None
                if message[0] == "add":
                    inp, plan, pending = self._held.plan(message[1])
                    inp = _compact(inp)
                    message = ("add", inp if self._stager is None else self._stager.stage(inp), plan)
                data = _dumps(message)
            except VlmError as exc:  # e.g. NOT_FOUND: a held embedding left the store meanwhile
                self._fail_command(message, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a lambda given to call()
                self._fail_command(message, InternalError(f"cannot send {message[0]} to the engine process: {exc}"))
                continue
            try:
                self._commands.send_bytes(data)
            except (OSError, ValueError):
                # The engine process is gone; the reader sees EOF and fails everything registered.
                self._fail_command(message, UnavailableError(_DIED))
                continue
            if pending is not None:
                self._held.commit(pending, message[1])

    def _fail_command(self, message: tuple, error: BaseException) -> None:
        with self._lock:
            if message[0] == "add":
                request_id = message[1].request_id
                if self._stager is not None:
                    self._stager.release(request_id)
                self._collectors.pop(request_id, None)
                future = self._adds.pop(request_id, None)
            elif message[0] == "call":
                future = self._calls.pop(message[1], None)
            else:
                return
        if future is not None:
            _settle(future, error=error)

    def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(pickle.loads(self._events.recv_bytes()))
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("bad message from the engine process")
        finally:
            self._engine_gone()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            with self._lock:
                ready = []
                for output in message[1]:
                    collector = self._collectors.get(output.request_id)
                    if collector is None:
                        continue  # aborted meanwhile
                    if output.is_finished:
                        del self._collectors[output.request_id]
                    ready.append((collector, output))
            for collector, output in ready:
                collector.put(output)
        elif kind == "added":
            _, request_id, error, not_held = message
            if self._stager is not None:
                self._stager.release(request_id)  # read (or refused): its ring slots may be reused
            for content_id in not_held:
                self._held.forget(content_id)  # the next request sends it whole again
            with self._lock:
                future = self._adds.pop(request_id, None)
                if error is not None:
                    self._collectors.pop(request_id, None)
            if future is not None:
                _settle(future, error=error)
        elif kind == "result":
            _, call_id, ok, value = message
            with self._lock:
                future = self._calls.pop(call_id, None)
            if future is not None:
                _settle(future, value=value if ok else None, error=None if ok else value)
        elif kind == "failed":
            _, request_ids, error = message
            with self._lock:
                failed = [c for c in (self._collectors.pop(r, None) for r in request_ids) if c is not None]
            for collector in failed:
                collector.fail(error)
        else:
            logger.error("unknown event %r from the engine process", kind)

    def _engine_gone(self) -> None:
        with self._lock:
            self._dead = True
            expected = self._stopping
            collectors, self._collectors = self._collectors, {}
            futures = [*self._adds.values(), *self._calls.values()]
            self._adds, self._calls = {}, {}
            callbacks, self._death_callbacks = self._death_callbacks, []
        if expected:
            error = UnavailableError(_SHUT_DOWN)
        else:
            self.process.join(1.0)
            logger.error(
                "the engine process (pid %s) died (exit code %s); failing %d request(s) in flight with "
                "UNAVAILABLE; new requests are refused until the service is restarted",
                self.process.pid,
                self.process.exitcode,
                len(collectors),
            )
            error = UnavailableError(_DIED)
        for collector in collectors.values():
            collector.fail(error)
        for future in futures:
            _settle(future, error=error)
        if not expected:
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    logger.exception("engine death callback failed")


def _settle(future: Future, *, value: Any = None, error: BaseException | None = None) -> None:
    """Complete `future` unless its waiter gave up (a cancelled asyncio wrapper cancels it)."""
    if not future.set_running_or_notify_cancel():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _make_stager(shared_memory_mb: int):
    """The frontend's ring for large embeddings, or None (0 MiB, or no usable /dev/shm: then warned)."""
    if shared_memory_mb <= 0:
        return None
    from llm_service.engine.staged_embeddings import EmbeddingStager
    from vlm_protocol.shared_memory import SharedMemoryRing

    try:
        ring = SharedMemoryRing(shared_memory_mb << 20)
        ring.prefault()  # ~0.1 s per 256 MiB at start-up, not a fault per 4 KiB in the first requests
        return EmbeddingStager(ring)
    except (SharedMemoryUnavailableError, OSError) as exc:
        logger.warning(
            "engine process: no %d MiB shared-memory ring (%s); embeddings go through the pipe "
            "(~14 ms per 4.7 MB image on an H100 host): give the service a larger /dev/shm",
            shared_memory_mb, exc,
        )
        return None


def _compact(inp: GenerationInput) -> GenerationInput:
    """Embeddings that pickle as just their own bytes: a view would carry its whole storage, and a
    tensor on a device would be unpickled onto that device in the engine process."""
    embeddings = list(inp.embeddings)
    changed = False
    for i, e in enumerate(embeddings):
        features = e.features
        if not isinstance(features, torch.Tensor):  # a HeldTensor: no bytes to send
            continue
        if features.device.type != "cpu" or features.untyped_storage().nbytes() != features.nbytes:
            embeddings[i] = dataclasses.replace(e, features=features.detach().to("cpu", copy=True).contiguous())
            changed = True
    return dataclasses.replace(inp, embeddings=tuple(embeddings)) if changed else inp


def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    from llm_service.models.loader import inspect_checkpoint

    return AutoTokenizer.from_pretrained(inspect_checkpoint(model_dir).tokenizer_dir)
