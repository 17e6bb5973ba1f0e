"""How embeddings travel from the encoder to the LLM service: as bytes, or through shared memory.

With ``"shared_memory"`` the SDK asks ``Encode`` for ``EMBEDDING_TRANSPORT_SHARED_MEMORY``: the encoder
writes the features into its /dev/shm ring and returns only a reference, which the SDK forwards to the
LLM service; the 4.5 MiB of a LLaVA image never cross gRPC. That only works when both services run on
one host and share /dev/shm (protos/README.md, "Shared-memory transport").

Modes (``Client(embedding_transport=...)``, else ``$VLM_EMBEDDING_TRANSPORT``, else ``"auto"``):

* ``"bytes"``: always bytes.
* ``"shared_memory"``: always shared memory; a service that cannot do it fails the call
  (FAILED_PRECONDITION).
* ``"auto"``: shared memory when the encoder offers it (``shared_memory_available``), the LLM service
  accepts it (``accepts_shared_memory``, asked once per client) and both addresses are loopback or
  unix sockets; else bytes. If the LLM service (or the encoder) then refuses it with
  FAILED_PRECONDITION (e.g. the services are in containers that do not share /dev/shm), the client
  logs one warning, switches to bytes for good and resends the call with bytes.

A slot the encoder reused before the LLM service read it is answered NOT_FOUND like an unknown content
id; the usual resend path then sends that embedding as bytes, whatever the mode.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Mapping
from typing import Any

import grpc
from vlm.v1 import common_pb2

from client_sdk.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

EMBEDDING_TRANSPORT_ENV = "VLM_EMBEDDING_TRANSPORT"
AUTO = "auto"
BYTES = "bytes"
SHARED_MEMORY = "shared_memory"
EMBEDDING_TRANSPORTS = (AUTO, BYTES, SHARED_MEMORY)


def validate_embedding_transport(value: Any, *, source: str = "embedding_transport") -> str:
    if not isinstance(value, str) or value.strip().lower() not in EMBEDDING_TRANSPORTS:
        raise InvalidArgumentError(
            f"{source} must be one of {', '.join(repr(m) for m in EMBEDDING_TRANSPORTS)}, got {value!r}"
        )
    return value.strip().lower()


def resolve_embedding_transport(value: str | None, environ: Mapping[str, str]) -> str:
    """The argument, else ``$VLM_EMBEDDING_TRANSPORT``, else ``"auto"``; validated."""
    if value is not None:
        return validate_embedding_transport(value)
    from_env = environ.get(EMBEDDING_TRANSPORT_ENV)
    if from_env:
        return validate_embedding_transport(from_env, source=f"${EMBEDDING_TRANSPORT_ENV}")
    return AUTO


def is_local_address(address: str) -> bool:
    """Whether a gRPC target surely reaches this host: a unix socket, or every host a loopback one
    (``localhost``, ``127.0.0.0/8``, ``::1``), with or without a ``dns:``/``ipv4:``/``ipv6:`` scheme."""
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith("dns:"):
        target = target[4:]
        if target.startswith("//"):  # dns://[authority]/host:port
            target = target[2:].split("/", 1)[1] if "/" in target[2:] else ""
    elif target.startswith(("ipv4:", "ipv6:")):
        hosts = target[5:].split(",")
        return bool(hosts) and all(_is_loopback_host(_host_of(h)) for h in hosts)
    return bool(target) and _is_loopback_host(_host_of(target))


def _host_of(target: str) -> str:
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    if target.count(":") == 1:
        return target.rsplit(":", 1)[0]
    return target  # no port, or a bare IPv6 address


def _is_loopback_host(host: str) -> bool:
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_shared_memory_refusal(exc: Exception) -> bool:
    """A FAILED_PRECONDITION caused by a shared-memory tensor (the server sets the
    ``vlm-shared-memory-unavailable`` trailer; ``client_sdk.errors`` keeps it as ``shared_memory_region``)."""
    return (
        getattr(exc, "code", None) == grpc.StatusCode.FAILED_PRECONDITION
        and getattr(exc, "shared_memory_region", None) is not None
    )


class TransportChoice:
    """One client's embedding transport: the mode, and in ``auto`` what the services said.

    Thread-safe (the threads of a sync ``Client`` share it).
    """

    def __init__(self, mode: str, encoder_address: str, llm_address: str) -> None:
        self.mode = validate_embedding_transport(mode)
        self.local = is_local_address(encoder_address) and is_local_address(llm_address)
        self._llm_accepts: bool | None = None  # the LLM service's accepts_shared_memory, asked once
        self._disabled = False  # auto: a service refused shared memory; bytes from now on
        self._lock = threading.Lock()

    @property
    def disabled(self) -> bool:
        return self._disabled

    def needs_llm_info(self, encoder_info: Any) -> bool:
        """Whether ``output_transport`` needs the LLM service's GetModelInfo (auto, not yet asked)."""
        return (
            self.mode == AUTO
            and not self._disabled
            and self.local
            and bool(getattr(encoder_info, "shared_memory_available", False))
            and self._llm_accepts is None
        )

    def set_llm_info(self, llm_info: Any) -> None:
        with self._lock:
            self._llm_accepts = bool(getattr(llm_info, "accepts_shared_memory", False))

    def output_transport(self, encoder_info: Any) -> int:
        """``EncodeRequest.output_transport`` for the next Encode."""
        if self.mode == SHARED_MEMORY:
            return common_pb2.EMBEDDING_TRANSPORT_SHARED_MEMORY
        if (
            self.mode == AUTO
            and not self._disabled
            and self.local
            and getattr(encoder_info, "shared_memory_available", False)
            and self._llm_accepts
        ):
            return common_pb2.EMBEDDING_TRANSPORT_SHARED_MEMORY
        return common_pb2.EMBEDDING_TRANSPORT_BYTES

    def fall_back(self, exc: Exception, used_shared_memory: bool) -> bool:
        """After a failed call: whether to switch to bytes and retry (auto mode, the request used shared
        memory, and a service refused it). Warns once per client."""
        if self.mode != AUTO or not used_shared_memory or not is_shared_memory_refusal(exc):
            return False
        with self._lock:
            first, self._disabled = not self._disabled, True
        if first:
            logger.warning(
                "shared-memory embedding transport refused (%s); this client sends embeddings as bytes "
                "from now on (run the encoder and the LLM service on one host sharing /dev/shm, or set "
                "embedding_transport='bytes' to silence this)",
                getattr(exc, "details", exc),
            )
        return True


__all__ = [
    "AUTO",
    "BYTES",
    "EMBEDDING_TRANSPORTS",
    "EMBEDDING_TRANSPORT_ENV",
    "SHARED_MEMORY",
    "TransportChoice",
    "is_local_address",
    "is_shared_memory_refusal",
    "resolve_embedding_transport",
    "validate_embedding_transport",
]
