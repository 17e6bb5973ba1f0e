"""Client settings: service addresses (arguments, else environment, else defaults), timeout, channel options.

The environment is read when a client is constructed, never at import time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from client_sdk.embedding_transport import (
    AUTO,
    TransportChoice,
    resolve_embedding_transport,
    validate_embedding_transport,
)
from client_sdk.errors import InvalidArgumentError
from client_sdk.held_ids import DEFAULT_HELD_IDS_CAPACITY, HeldIds

logger = logging.getLogger(__name__)

ENCODER_ADDRESS_ENV = "VLM_ENCODER_ADDR"
LLM_ADDRESS_ENV = "VLM_LLM_ADDR"
DEFAULT_ENCODER_ADDRESS = "localhost:50051"
DEFAULT_LLM_ADDRESS = "localhost:50052"
DEFAULT_TIMEOUT_S = 60.0
# Both servers default to 256 MiB (protos/README.md, "Message size limits"); the smaller side wins.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
USER_AGENT = "vlm-client-sdk/0.1"


@dataclass(frozen=True)
class ClientSettings:
    """Validated settings of one client.

    Attributes:
      encoder_address: ``host:port`` of the encoder service.
      llm_address: ``host:port`` of the LLM service.
      timeout_s: budget of one ``generate`` call, all RPCs included (each RPC gets what is left).
      max_message_bytes: send and receive limit of both channels.
      one_call: send raw media to the LLM service, which encodes them through its own encoder
        (it must run with ``--encoder-address``); the encoder address is then unused.
      extra_channel_options: appended to the channel options (e.g. keepalive settings).
      held_ids_capacity: how many content ids the LLM service accepted the client remembers (an LRU)
        for the LLM-first shortcut: a call whose media all have remembered ids skips the encoder
        (``client_sdk.held_ids``); 0 disables the shortcut.
      embedding_transport: how embeddings go from the encoder to the LLM service: "auto" (shared
        memory when both services offer it and both addresses are local, else bytes), "bytes" or
        "shared_memory" (``client_sdk.embedding_transport``).
    """

    encoder_address: str
    llm_address: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    one_call: bool = False
    extra_channel_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    held_ids_capacity: int = DEFAULT_HELD_IDS_CAPACITY
    embedding_transport: str = AUTO

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "embedding_transport", validate_embedding_transport(self.embedding_transport)
        )
        for name in ("encoder_address", "llm_address"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidArgumentError(f"{name} must be a non-empty 'host:port' string, got {value!r}")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not self.timeout_s > 0
        ):
            raise InvalidArgumentError(
                f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}"
            )
        if not 1 <= self.max_message_bytes <= _MAX_GRPC_MESSAGE_BYTES:
            raise InvalidArgumentError(
                f"max_message_bytes must be in [1, {_MAX_GRPC_MESSAGE_BYTES}], got {self.max_message_bytes}"
            )
        capacity = self.held_ids_capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidArgumentError(f"held_ids_capacity must be an int >= 0, got {capacity!r}")

    @classmethod
    def resolve(
        cls,
        encoder_address: str | None = None,
        llm_address: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        **kwargs: Any,
    ) -> ClientSettings:
        """Settings from arguments, falling back to $VLM_ENCODER_ADDR / $VLM_LLM_ADDR (and
        $VLM_EMBEDDING_TRANSPORT), then the defaults."""
        env = os.environ if environ is None else environ
        kwargs["embedding_transport"] = resolve_embedding_transport(kwargs.get("embedding_transport"), env)
        return cls(
            encoder_address=encoder_address or env.get(ENCODER_ADDRESS_ENV) or DEFAULT_ENCODER_ADDRESS,
            llm_address=llm_address or env.get(LLM_ADDRESS_ENV) or DEFAULT_LLM_ADDRESS,
            extra_channel_options=tuple(channel_options),
            **kwargs,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", USER_AGENT),
            # spread calls over every address a name resolves to (e.g. `dns:///encoder:50051` with
            # `docker compose up --scale encoder=N`); the default pick_first would use one replica
            ("grpc.lb_policy_name", "round_robin"),
            *self.extra_channel_options,
        ]


ENCODER = "encoder"
LLM = "llm"


class ClientBase:
    """What `Client` and `AsyncClient` share: resolved settings, addresses and cached encoder info."""

    def __init__(
        self,
        encoder_address: str | None = None,
        llm_address: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        one_call: bool = False,
        credentials: Any = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        held_ids_capacity: int = DEFAULT_HELD_IDS_CAPACITY,
        embedding_transport: str | None = None,
    ) -> None:
        self.settings = ClientSettings.resolve(
            encoder_address,
            llm_address,
            timeout_s=timeout_s,
            max_message_bytes=max_message_bytes,
            one_call=one_call,
            channel_options=channel_options,
            held_ids_capacity=held_ids_capacity,
            embedding_transport=embedding_transport,
        )
        self._credentials = credentials  # grpc.ChannelCredentials or None for plaintext
        self._channels: dict[str, Any] = {}
        self._encoder_info: Any = None  # EncoderServiceGetModelInfoResponse once fetched
        self._closed = False
        self._lock = threading.Lock()  # guards channel creation in the thread-safe sync client
        self._held_ids = HeldIds(self.settings.held_ids_capacity)  # LLM-first shortcut (own lock)
        self._transport = TransportChoice(
            self.settings.embedding_transport, self.settings.encoder_address, self.settings.llm_address
        )

    @property
    def encoder_address(self) -> str:
        return self.settings.encoder_address

    @property
    def llm_address(self) -> str:
        return self.settings.llm_address

    def _address(self, which: str) -> str:
        return self.settings.encoder_address if which == ENCODER else self.settings.llm_address

    def _ids_to_upload(self, plan: Any, exc: Exception) -> set[str]:
        """After the LLM service's NOT_FOUND: the ids of `plan` (a MediaPlan) to resend whole, as bytes.
        Forgets them as held; shared-memory embeddings go again as bytes (a slot may be gone)."""
        missing = getattr(exc, "content_ids", ())
        self._held_ids.not_found(plan, missing)
        shortcut = plan.encoder_skipped
        upload = plan.upload_ids(missing) | plan.drop_shared_memory()
        logger.debug(
            "LLM service lacks %d embedding(s)%s; resending them whole",
            len(upload),
            " (LLM-first shortcut missed)" if shortcut else "",
        )
        return upload
