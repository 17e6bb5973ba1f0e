"""Typed exceptions raised by the SDK, one per gRPC status the services document (protos/README.md).

Every exception is a ``VlmClientError`` carrying the status ``code`` (a ``grpc.StatusCode``), the
server's ``details`` and which ``target`` / ``method`` failed. Each class also derives from the
matching ``vlm_protocol.errors`` class, so ``except InvalidArgumentError`` (or ``ValueError``,
``TimeoutError``) catches both the SDK's own input checks and the server's verdict.
"""

from __future__ import annotations

from typing import Any

import grpc

from vlm_protocol import errors as protocol
from vlm_protocol.errors import (
    MISSING_CONTENT_IDS_METADATA_KEY,
    SHARED_MEMORY_UNAVAILABLE_METADATA_KEY,
    parse_missing_content_ids,
)


class VlmClientError(protocol.VlmError):
    """Base of every SDK error. ``code`` is the gRPC status, ``details`` the server's message."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: str | None = None,
        target: str = "",
        method: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code if code is not None else self.default_code
        self.status = self.code.name
        self.details = message if details is None else details
        self.target = target
        self.method = method


class InvalidArgumentError(VlmClientError, protocol.InvalidArgumentError):
    """Bad parameter, undecodable media, prompt too long, placeholder/input count mismatch."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(VlmClientError, protocol.NotFoundError):
    """A content id the LLM service does not hold, even after the SDK resent the embedding."""

    default_code = grpc.StatusCode.NOT_FOUND
    content_ids: tuple[str, ...] = ()


class ResourceExhaustedError(VlmClientError, protocol.ResourceExhaustedError):
    """Queue full, KV or memory budget exceeded, or a message over the size limit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDeniedError(VlmClientError, protocol.PermissionDeniedError):
    """Refused by policy, e.g. a URL pointing at a private address; the message names the rule."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(VlmClientError, protocol.FailedPreconditionError):
    """The deployment lacks a feature the request needs (video on an image-only model, ...).

    ``shared_memory_region``: set (possibly to "") when the cause is a shared-memory tensor the server
    cannot read or write (the ``vlm-shared-memory-unavailable`` trailer); None otherwise.
    """

    default_code = grpc.StatusCode.FAILED_PRECONDITION
    shared_memory_region: str | None = None


class UnavailableError(VlmClientError, protocol.UnavailableError):
    """Service unreachable, warming up or draining; retrying later may succeed."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(VlmClientError, protocol.DeadlineExceededError):
    """The call's timeout passed before the result arrived (also a ``TimeoutError``)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(VlmClientError, protocol.RequestCancelledError):
    """The call was cancelled (by this client or the server)."""

    default_code = grpc.StatusCode.CANCELLED


class InternalError(VlmClientError, protocol.InternalError):
    """A server bug; the message carries the request id to look up in the server log."""

    default_code = grpc.StatusCode.INTERNAL


_ERROR_FOR_CODE: dict[grpc.StatusCode, type[VlmClientError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        PermissionDeniedError,
        FailedPreconditionError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
    )
}


def missing_content_ids(error: grpc.RpcError) -> tuple[str, ...]:
    """The content ids named by a NOT_FOUND's ``vlm-missing-content-ids`` trailer (sync or aio call)."""
    trailing: Any = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    ids: list[str] = []
    for key, value in trailing or ():
        if key == MISSING_CONTENT_IDS_METADATA_KEY:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            ids.extend(parse_missing_content_ids(text))
    return tuple(ids)


def _trailer(error: grpc.RpcError, key: str) -> str | None:
    trailing: Any = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for name, value in trailing or ():
        if name == key:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def from_rpc_error(error: grpc.RpcError, *, target: str = "", method: str = "") -> VlmClientError:
    """The typed SDK exception for a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    details = details or code.name
    where = " ".join(part for part in (method, f"at {target}" if target else "") if part)
    message = f"{where + ': ' if where else ''}{code.name}: {details}"
    cls = _ERROR_FOR_CODE.get(code, VlmClientError)
    exc = cls(message, code=code, details=details, target=target, method=method)
    if isinstance(exc, NotFoundError):
        exc.content_ids = missing_content_ids(error)
    elif isinstance(exc, FailedPreconditionError):
        exc.shared_memory_region = _trailer(error, SHARED_MEMORY_UNAVAILABLE_METADATA_KEY)
    return exc


__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnavailableError",
    "VlmClientError",
    "from_rpc_error",
    "missing_content_ids",
]
