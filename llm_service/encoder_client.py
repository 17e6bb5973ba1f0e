"""One-call mode: the LLM service's own client of EncoderService.Encode, for requests carrying raw media.

Errors come back as domain errors: the client's own faults (bad media, refused URL, ...) keep the
encoder's status with an "encoder: " prefix; an unreachable or failing encoder is UNAVAILABLE.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from vlm.v1 import common_pb2, encoder_service_pb2, encoder_service_pb2_grpc

from vlm_protocol.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    UnavailableError,
    VlmError,
    error_for_status,
)

logger = logging.getLogger(__name__)

# Statuses that describe the request, not the encoder's health: passed on to our caller as they are.
_CALLER_FAULTS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class EncoderClient:
    """A grpc.aio channel to one encoder service. Create it inside the event loop that uses it."""

    def __init__(self, address: str, *, max_message_bytes: int, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                # A DNS name with several encoder replicas behind it: spread calls over all of them.
                ("grpc.lb_policy_name", "round_robin"),
            ],
        )
        self._stub = encoder_service_pb2_grpc.EncoderServiceStub(self._channel)

    async def encode(
        self, items: Sequence[common_pb2.MediaItem], *, request_id: str, timeout_s: float | None = None
    ) -> list[common_pb2.Embedding]:
        """Encode `items`; returns one Embedding per item, in order."""
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        request = encoder_service_pb2.EncodeRequest(request_id=request_id, items=items)
        try:
            response = await self._stub.Encode(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        if len(response.results) != len(items):
            raise UnavailableError(
                f"encoder at {self.address} returned {len(response.results)} embeddings for {len(items)} items"
            )
        return [result.embedding for result in response.results]

    def _error(self, exc: grpc.aio.AioRpcError) -> VlmError:
        code = exc.code()
        if code in _CALLER_FAULTS:
            return error_for_status(code.name, f"encoder: {exc.details()}")
        if code is grpc.StatusCode.NOT_FOUND:  # our NOT_FOUND means "resend the embedding": not this
            return InvalidArgumentError(f"encoder: {exc.details()}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(f"the encoder at {self.address} did not answer in time")
        logger.warning("encoder at %s failed: %s %s", self.address, code.name, exc.details())
        return UnavailableError(
            f"the encoder service at {self.address} is unavailable ({code.name}); retry later"
        )

    async def close(self) -> None:
        await self._channel.close()
