"""gRPC (asyncio) server bootstrap shared by encoder_service and llm_service.

``build_server`` wires a ``grpc.aio.Server`` with everything every service needs: the given
servicers, ``grpc.health.v1`` (NOT_SERVING until the caller reports readiness), server reflection,
message-size limits both ways, and a bound port. ``RunningServer`` then owns the lifecycle:
``start`` -> ``set_serving`` (after weights are loaded and warmed up) -> ``drain`` (health
NOT_SERVING, optional delay so balancers notice, then a graceful stop).

Errors: ``status_for_exception`` is the single exception -> status table, and ``handle_rpc_errors``
applies it to servicer methods so they just raise domain errors (``vlm_protocol.errors``).

Call ``build_server`` from inside the event loop that will run the server.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vlm_protocol.errors import (
    MISSING_CONTENT_IDS_METADATA_KEY,
    SHARED_MEMORY_UNAVAILABLE_METADATA_KEY,
    InvalidArgumentError,
    NotFoundError,
    SharedMemoryUnavailableError,
    VlmError,
    format_missing_content_ids,
)

logger = logging.getLogger(__name__)

REQUEST_ID_METADATA_KEY = "x-request-id"
_MAX_GRPC_MESSAGE_BYTES = 2**31 - 1  # gRPC channel arguments are C ints

_STATUS_CODES: dict[str, grpc.StatusCode] = {
    code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK
}

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerConfig:
    """Transport settings of one gRPC server.

    Attributes:
      host: interface to bind ("0.0.0.0" or "[::]" in containers, "127.0.0.1" for tests).
      port: TCP port; 0 picks a free one (see ``RunningServer.port``).
      max_message_bytes: limit for received and sent messages. A LLaVA image embedding is 4.5 MiB in
        bf16 and OneVision can exceed 50 MiB, hence the 256 MiB default.
      grace_period_s: how long ``drain`` lets in-flight RPCs finish before cancelling them.
      drain_delay_s: how long ``drain`` keeps serving after reporting NOT_SERVING, so health-checking
        load balancers move traffic away before new RPCs are refused.
      max_concurrent_rpcs: RPCs beyond this many are refused with RESOURCE_EXHAUSTED; None = no limit.
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 256 * 1024 * 1024
    grace_period_s: float = 10.0
    drain_delay_s: float = 0.0
    max_concurrent_rpcs: int | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise InvalidArgumentError("host must be a non-empty interface address such as '0.0.0.0'")
        if not 0 <= self.port <= 65535:
            raise InvalidArgumentError(f"port must be in [0, 65535] (0 = any free port), got {self.port}")
        if not 1 <= self.max_message_bytes <= _MAX_GRPC_MESSAGE_BYTES:
            raise InvalidArgumentError(
                f"max_message_bytes must be in [1, {_MAX_GRPC_MESSAGE_BYTES}], got {self.max_message_bytes}"
            )
        if self.grace_period_s < 0:
            raise InvalidArgumentError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if self.drain_delay_s < 0:
            raise InvalidArgumentError(f"drain_delay_s must be >= 0, got {self.drain_delay_s}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise InvalidArgumentError(
                f"max_concurrent_rpcs must be >= 1 or None (no limit), got {self.max_concurrent_rpcs}"
            )

    @property
    def bind_address(self) -> str:
        return f"{_bracket_ipv6(self.host)}:{self.port}"


@dataclass(frozen=True)
class ServiceRegistration:
    """One generated service to serve: ``add_servicer_fn(servicer, server)`` registers it.

    ``service_name`` is the full proto name, e.g. ``"vlm.v1.EncoderService"``.
    """

    add_servicer_fn: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    service_name: str


class RunningServer:
    """A built, bound server and its health state. Create with ``build_server``."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        config: ServerConfig,
        port: int,
        service_names: Sequence[str],
    ) -> None:
        self.server = server
        self.config = config
        self.port = port
        self.service_names = tuple(service_names)
        self._health = health_servicer
        self._is_draining = False
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        """``host:port`` with the bound port (for clients; "0.0.0.0" hosts need a reachable name)."""
        return f"{_bracket_ipv6(self.config.host)}:{self.port}"

    @property
    def is_draining(self) -> bool:
        return self._is_draining

    async def start(self) -> None:
        """Start accepting RPCs; health reports NOT_SERVING until ``set_serving``."""
        await self._set_all(_NOT_SERVING)
        await self.server.start()
        logger.info("gRPC server listening on %s (services: %s)", self.address, ", ".join(self.service_names))

    async def set_serving(self) -> None:
        """Report SERVING overall and for every registered service (ignored once draining)."""
        await self._set_all(_SERVING)

    async def set_not_serving(self) -> None:
        """Report NOT_SERVING (e.g. while reloading) without stopping the server."""
        await self._set_all(_NOT_SERVING)

    async def drain(self, grace_period_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING now and for good, wait ``drain_delay_s``, then stop accepting
        RPCs and give in-flight ones ``grace_period_s`` before cancelling them. Idempotent."""
        if self._is_draining:
            await self.wait_for_termination()
            return
        self._is_draining = True
        grace = self.config.grace_period_s if grace_period_s is None else grace_period_s
        logger.info(
            "draining gRPC server on %s (delay %.1fs, grace %.1fs)",
            self.address,
            self.config.drain_delay_s,
            grace,
        )
        await self._health.enter_graceful_shutdown()
        if self.config.drain_delay_s > 0:
            await asyncio.sleep(self.config.drain_delay_s)
        await self.server.stop(grace)
        self._stopped.set()
        logger.info("gRPC server on %s stopped", self.address)

    async def stop_now(self) -> None:
        """Stop immediately, cancelling in-flight RPCs (second signal, tests)."""
        self._is_draining = True
        await self._health.enter_graceful_shutdown()
        await self.server.stop(None)
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        """Return once the server has stopped."""
        await self._stopped.wait()

    async def _set_all(self, status: int) -> None:
        await self._health.set(health.OVERALL_HEALTH, status)
        for name in self.service_names:
            await self._health.set(name, status)


def build_server(config: ServerConfig, services: Sequence[ServiceRegistration]) -> RunningServer:
    """Build and bind a server with ``services`` + health + reflection; call ``start()`` next.

    Raises ``InvalidArgumentError`` for an unknown or duplicate service name and ``OSError`` if the
    port cannot be bound.
    """
    names = [registration.service_name for registration in services]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"duplicate service registration in {names}")
    pool = descriptor_pool.Default()
    for name in names:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            raise InvalidArgumentError(
                f"service {name!r} is not in the protobuf descriptor pool; use the full name "
                "(e.g. 'vlm.v1.EncoderService') and import its generated _pb2 module"
            ) from None

    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Without this a second server could bind the same port and silently take half the traffic.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    for registration in services:
        registration.add_servicer_fn(registration.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    try:
        port = server.add_insecure_port(config.bind_address)
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
        raise OSError(f"could not bind gRPC server to {config.bind_address}: {exc}") from None
    if port == 0:
        raise OSError(f"could not bind gRPC server to {config.bind_address}")
    return RunningServer(server, health_servicer, config, port, names)


async def start_server(config: ServerConfig, services: Sequence[ServiceRegistration]) -> RunningServer:
    """``build_server`` + ``start``: listening, health NOT_SERVING."""
    running = build_server(config, services)
    await running.start()
    return running


def install_signal_handlers(
    running: RunningServer,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> Callable[[], None]:
    """On the running loop, make the first SIGTERM/SIGINT ``drain`` and a second one stop at once.

    Returns a function that removes the handlers. Must be called from the main thread's loop.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    signals = tuple(signals)

    def on_signal(signum: signal.Signals) -> None:
        if running.is_draining:
            logger.warning("received %s again while draining; stopping now", signum.name)
            task = loop.create_task(running.stop_now())
        else:
            logger.info("received %s; draining", signum.name)
            task = loop.create_task(running.drain())
        tasks.add(task)  # keep a reference until done: the loop holds tasks only weakly
        task.add_done_callback(tasks.discard)

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)

    def remove() -> None:
        for signum in signals:
            loop.remove_signal_handler(signum)

    return remove


def status_for_exception(exc: BaseException, *, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The one exception -> (status code, client message) table.

    Domain errors (``VlmError``) map to their ``status`` with their own message (``InternalError``
    is also logged with its traceback). Anything else is a bug: INTERNAL with a generic message
    carrying the request id, and the traceback logged under that id; the exception text is never
    sent to the client.
    """
    code = _STATUS_CODES.get(exc.status) if isinstance(exc, VlmError) else None
    if code is not None:
        if code is grpc.StatusCode.INTERNAL:
            logger.error("request %s failed: internal error", request_id, exc_info=exc)
        return code, exc.message  # type: ignore[union-attr]
    request_id = request_id or uuid.uuid4().hex
    logger.error("request %s failed: unhandled %s", request_id, type(exc).__name__, exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {request_id}); details are in the server log",
    )


def request_id_from_context(context: grpc.aio.ServicerContext) -> str | None:
    """The client-supplied ``x-request-id`` metadata value, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


async def abort_with_exception(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status for ``exc`` (raises ``grpc.aio.AbortError``, never returns)."""
    code, message = status_for_exception(exc, request_id=request_id_from_context(context))
    if code is not grpc.StatusCode.INTERNAL:
        logger.debug("RPC ended with %s: %s", code.name, message)
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, NotFoundError) and exc.content_ids:
        trailing = ((MISSING_CONTENT_IDS_METADATA_KEY, format_missing_content_ids(exc.content_ids)),)
    elif isinstance(exc, SharedMemoryUnavailableError):
        # always present (possibly empty), so clients recognise the cause without parsing the message
        trailing = ((SHARED_MEMORY_UNAVAILABLE_METADATA_KEY, exc.region),)
    await context.abort(code, message, trailing_metadata=trailing)


F = TypeVar("F", bound=Callable[..., Any])


def handle_rpc_errors(method: F) -> F:
    """Decorate an aio servicer method (coroutine or async generator) so raised exceptions become
    statuses via ``status_for_exception``. The context must be the last positional argument.

    For streaming methods the wrapped generator is always closed, so its ``finally`` blocks free
    resources promptly on error, cancellation or deadline. ``asyncio.CancelledError`` and aborts the
    method issued itself pass through unchanged.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            stream = method(*args, **kwargs)
            try:
                async for response in stream:
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with_exception(args[-1], exc)
            finally:
                await stream.aclose()

        return stream_wrapper  # type: ignore[return-value]

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def unary_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with_exception(args[-1], exc)

        return unary_wrapper  # type: ignore[return-value]

    raise TypeError(f"handle_rpc_errors needs an async def method, got {method!r}")


def _bracket_ipv6(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
