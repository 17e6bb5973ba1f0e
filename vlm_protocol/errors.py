"""Domain exceptions shared by the client SDK and both services.

Each exception names the gRPC status it maps to (``status``, a ``grpc.StatusCode`` member name) so
that the one mapping table in ``grpc_server.status_for_exception`` and the SDK's inverse mapping
(``error_for_status``) agree. This module imports nothing from grpc: engine code and the SDK raise
and catch these without depending on the transport.
"""

from __future__ import annotations

from collections.abc import Iterable

# Trailing-metadata key carrying the content ids a NOT_FOUND refers to, comma separated, so the SDK
# can resend exactly the missing embeddings.
MISSING_CONTENT_IDS_METADATA_KEY = "vlm-missing-content-ids"
# Trailing-metadata key of a FAILED_PRECONDITION caused by a shared-memory tensor the receiver cannot
# read (region not visible, or shared memory not accepted); the value is the region name. It lets the
# SDK tell this failure from other FAILED_PRECONDITIONs and fall back to sending bytes.
SHARED_MEMORY_UNAVAILABLE_METADATA_KEY = "vlm-shared-memory-unavailable"


class VlmError(Exception):
    """Base class of every error that crosses a service boundary.

    ``str(exc)`` is the message sent to the client: keep it short, actionable and free of internals.
    """

    status: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(VlmError, ValueError):
    """The request is malformed: bad parameter, undecodable media, too many images, prompt too long."""

    status: str = "INVALID_ARGUMENT"


class NotFoundError(VlmError, LookupError):
    """A referenced content id is not held; the SDK resends the embedding for ``content_ids``."""

    status: str = "NOT_FOUND"

    def __init__(self, message: str, content_ids: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.content_ids: tuple[str, ...] = tuple(content_ids)


class StaleSharedMemoryError(NotFoundError):
    """A shared-memory slice whose slot the writer has reused (or is rewriting): its bytes are gone.

    Answered like an unknown content id (NOT_FOUND naming ``content_ids``) so that the SDK resends the
    embedding as bytes. ``content_ids`` is empty where the content id is not known yet (the tensor
    codec); the LLM service re-raises with the id.
    """


class ResourceExhaustedError(VlmError):
    """Queue full, KV-cache or memory budget exceeded, message too large."""

    status: str = "RESOURCE_EXHAUSTED"


class PermissionDeniedError(VlmError):
    """Refused by policy (e.g. a URL pointing at a private address); the message names the rule."""

    status: str = "PERMISSION_DENIED"


class FailedPreconditionError(VlmError):
    """The system is not in a state that allows the request (e.g. model does not support video)."""

    status: str = "FAILED_PRECONDITION"


class SharedMemoryUnavailableError(FailedPreconditionError):
    """A shared-memory tensor this process cannot read: shared memory is not accepted here, or the
    region is not visible (another host or IPC namespace) or not readable. ``region`` names it; servers
    send it in the ``SHARED_MEMORY_UNAVAILABLE_METADATA_KEY`` trailer. Also raised by a writer that
    cannot create its region."""

    def __init__(self, message: str, region: str = "") -> None:
        super().__init__(message)
        self.region = region


class UnavailableError(VlmError):
    """Warming up, draining, or an upstream service is down; retrying later may succeed."""

    status: str = "UNAVAILABLE"


class DeadlineExceededError(VlmError, TimeoutError):
    """The request deadline passed before the work finished."""

    status: str = "DEADLINE_EXCEEDED"


class RequestCancelledError(VlmError):
    """The client cancelled the request (not ``asyncio.CancelledError``, which is task control)."""

    status: str = "CANCELLED"


class InternalError(VlmError):
    """A bug. Servers send a generic message and log the details."""

    status: str = "INTERNAL"


_ERROR_FOR_STATUS: dict[str, type[VlmError]] = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        PermissionDeniedError,
        FailedPreconditionError,
        UnavailableError,
        DeadlineExceededError,
        RequestCancelledError,
        InternalError,
    )
}


def error_for_status(status: str, message: str, *, missing_content_ids: Iterable[str] = ()) -> VlmError:
    """Build the domain exception for a status name received by a client (inverse of the server table).

    ``status`` is a ``grpc.StatusCode`` member name such as ``"NOT_FOUND"``. Codes without a domain
    class (UNKNOWN, UNIMPLEMENTED, ...) become a plain ``VlmError`` whose ``status`` is that name.
    """
    cls = _ERROR_FOR_STATUS.get(status)
    if cls is NotFoundError:
        return NotFoundError(message, missing_content_ids)
    if cls is not None:
        return cls(message)
    error = VlmError(message)
    error.status = status
    return error


def format_missing_content_ids(content_ids: Iterable[str]) -> str:
    """Encode content ids for the ``MISSING_CONTENT_IDS_METADATA_KEY`` trailing metadata value."""
    return ",".join(content_ids)


def parse_missing_content_ids(value: str) -> tuple[str, ...]:
    """Decode a ``MISSING_CONTENT_IDS_METADATA_KEY`` trailing metadata value."""
    return tuple(part for part in value.split(",") if part)
