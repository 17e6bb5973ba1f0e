"""asyncio client over ``grpc.aio``: the same API and ids-first flow as ``Client`` (LLM-first shortcut too).

async with AsyncClient() as client:
    result = await client.generate("USER: <image>\\nWhat is this? ASSISTANT:", images=["cat.png"])
    async for delta in client.generate("Tell me a story.", stream=True, max_tokens=64):
        print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vlm.v1 import (
    common_pb2,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    llm_service_pb2,
    llm_service_pb2_grpc,
)

from client_sdk import convert
from client_sdk.call import CallSpec, Deadline, Prompt, prepare_call, should_resend
from client_sdk.errors import VlmClientError, from_rpc_error
from client_sdk.media import ImageInput, VideoInput
from client_sdk.media_plan import MediaPlan
from client_sdk.settings import ENCODER, LLM, ClientBase
from client_sdk.types import GenerateResult, StreamDelta
from vlm_protocol.media_ids import PreprocessingIdentity

logger = logging.getLogger(__name__)

SHM = common_pb2.EMBEDDING_TRANSPORT_SHARED_MEMORY


class GenerationStream:
    """The async iterator of ``StreamDelta`` that ``AsyncClient.generate(..., stream=True)`` returns.

    Use ``async for delta in stream`` (``await``-ing it first also works and returns the stream).
    ``aclose()`` cancels the call; breaking out of ``async for`` and letting it be collected does too.
    """

    def __init__(self, deltas: AsyncIterator[StreamDelta]) -> None:
        self._deltas = deltas

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> StreamDelta:
        return await self._deltas.__anext__()

    def __await__(self) -> Generator[Any, None, GenerationStream]:
        return self._itself().__await__()

    async def _itself(self) -> GenerationStream:
        return self

    async def aclose(self) -> None:
        await self._deltas.aclose()  # type: ignore[attr-defined]


class AsyncClient(ClientBase):
    """asyncio client of one encoder service and one LLM service; arguments as ``Client``'s.

    Channels are created on first use inside the running event loop; use one client per loop.
    """

    def _channel(self, which: str) -> grpc.aio.Channel:
        if self._closed:
            raise RuntimeError("the client is closed")
        channel = self._channels.get(which)
        if channel is None:
            address, options = self._address(which), self.settings.channel_options()
            channel = (
                grpc.aio.secure_channel(address, self._credentials, options=options)
                if self._credentials is not None
                else grpc.aio.insecure_channel(address, options=options)
            )
            self._channels[which] = channel
        return channel

    def _stub(self, which: str) -> Any:
        if which == ENCODER:
            return encoder_service_pb2_grpc.EncoderServiceStub(self._channel(ENCODER))
        return llm_service_pb2_grpc.LlmServiceStub(self._channel(LLM))

    async def _call(self, which: str, method: str, request: Any, deadline: Deadline, metadata=()) -> Any:
        service = "EncoderService" if which == ENCODER else "LlmService"
        target = self._address(which)
        timeout = deadline.remaining(f"{service}.{method}", target)
        try:
            return await getattr(self._stub(which), method)(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, target=target, method=f"{service}.{method}") from None

    async def close(self) -> None:
        """Close both channels, cancelling in-flight calls. Idempotent."""
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- service info -------------------------------------------------------------------------

    async def encoder_info(
        self, *, refresh: bool = False, timeout_s: float | None = None
    ) -> encoder_service_pb2.EncoderServiceGetModelInfoResponse:
        """The encoder's GetModelInfo, fetched once and cached (``refresh=True`` asks again)."""
        if self._encoder_info is None or refresh:
            deadline = Deadline(timeout_s or self.settings.timeout_s)
            request = encoder_service_pb2.EncoderServiceGetModelInfoRequest()
            self._encoder_info = await self._call(ENCODER, "GetModelInfo", request, deadline)
        return self._encoder_info

    async def llm_info(
        self, *, timeout_s: float | None = None
    ) -> llm_service_pb2.LlmServiceGetModelInfoResponse:
        deadline = Deadline(timeout_s or self.settings.timeout_s)
        return await self._call(
            LLM, "GetModelInfo", llm_service_pb2.LlmServiceGetModelInfoRequest(), deadline
        )

    async def health(self, *, timeout_s: float = 5.0) -> dict[str, str]:
        """``{"encoder": status, "llm": status}`` from grpc.health.v1."""
        statuses = {}
        for which in (ENCODER, LLM):
            stub = health_pb2_grpc.HealthStub(self._channel(which))
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
                statuses[which] = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as exc:
                statuses[which] = exc.code().name
        return statuses

    # --- generate -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        images: ImageInput | Sequence[ImageInput] | None = None,
        video: VideoInput | None = None,
        stream: bool = False,
        *,
        num_frames: int | None = None,
        prompt_format: str | None = None,
        add_special_tokens: bool | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Any,
    ) -> Awaitable[GenerateResult] | GenerationStream:
        """``await client.generate(...)`` -> ``GenerateResult``; ``stream=True`` -> ``GenerationStream``.

        Arguments, keywords and errors as ``Client.generate``. Argument errors (``TypeError``,
        ``InvalidArgumentError``) are raised at the call, before anything is awaited.
        """
        spec = prepare_call(
            prompt,
            images,
            video,
            num_frames=num_frames,
            prompt_format=prompt_format,
            add_special_tokens=add_special_tokens,
            request_id=request_id,
            timeout_s=timeout_s or self.settings.timeout_s,
            sampling=sampling,
        )
        if stream:
            return GenerationStream(self._stream(spec))
        return self._unary(spec)

    async def _unary(self, spec: CallSpec) -> GenerateResult:
        deadline = Deadline(spec.timeout_s)
        plan = await self._prepare_media(spec, deadline)
        encode_ms = deadline.elapsed_ms() if plan.uses_encoder else 0.0
        inputs = plan.raw_inputs() if self.settings.one_call else plan.llm_inputs()
        for attempt in (1, 2):
            sent_ms = deadline.elapsed_ms()
            request = spec.request(llm_service_pb2.GenerateRequest, inputs)
            try:
                response = await self._call(LLM, "Generate", request, deadline, spec.metadata)
                break
            except VlmClientError as exc:
                if not should_resend(
                    exc, plan, attempt, one_call=self.settings.one_call, transport=self._transport
                ):
                    raise
                inputs = plan.llm_inputs(await self._upload(plan, exc, spec, deadline))
        self._held_ids.accepted(plan)
        timing = convert.timings(
            response.timings,
            encode_ms=encode_ms,
            time_to_first_token_ms=sent_ms + response.timings.time_to_first_token_ms,
            total_ms=deadline.elapsed_ms(),
        )
        return convert.result(response, timing=timing, **plan.result_extras())

    async def _stream(self, spec: CallSpec) -> AsyncIterator[StreamDelta]:
        deadline = Deadline(spec.timeout_s)
        plan = await self._prepare_media(spec, deadline)
        encode_ms = deadline.elapsed_ms() if plan.uses_encoder else 0.0
        inputs = plan.raw_inputs() if self.settings.one_call else plan.llm_inputs()
        target, method = self.settings.llm_address, "LlmService.GenerateStream"
        first_token_ms: float | None = None
        for attempt in (1, 2):
            request = spec.request(llm_service_pb2.GenerateStreamRequest, inputs)
            call = self._stub(LLM).GenerateStream(
                request, timeout=deadline.remaining(method, target), metadata=spec.metadata
            )
            received = False
            try:
                async for message in call:
                    if not received:  # the LLM service resolved every id: it holds them now
                        received = True
                        self._held_ids.accepted(plan)
                    if first_token_ms is None and message.token_ids:
                        first_token_ms = deadline.elapsed_ms()
                    timing = None
                    if message.finish_reason:
                        total_ms = deadline.elapsed_ms()
                        timing = convert.timings(
                            message.timings,
                            encode_ms=encode_ms,
                            time_to_first_token_ms=first_token_ms if first_token_ms is not None else total_ms,
                            total_ms=total_ms,
                        )
                    yield convert.delta(message, timing=timing, **plan.result_extras())
                return
            except grpc.RpcError as rpc_error:
                exc = from_rpc_error(rpc_error, target=target, method=method)
                if received or not should_resend(
                    exc, plan, attempt, one_call=self.settings.one_call, transport=self._transport
                ):
                    raise exc from None
            finally:
                call.cancel()
            inputs = plan.llm_inputs(await self._upload(plan, exc, spec, deadline))

    # --- media --------------------------------------------------------------------------------

    async def _identity(self, deadline: Deadline) -> tuple[PreprocessingIdentity, int]:
        info = self._encoder_info
        if info is None:
            request = encoder_service_pb2.EncoderServiceGetModelInfoRequest()
            info = self._encoder_info = await self._call(ENCODER, "GetModelInfo", request, deadline)
        return convert.preprocessing_identity(info), info.default_num_frames

    async def _prepare_media(self, spec: CallSpec, deadline: Deadline) -> MediaPlan:
        if not spec.media or self.settings.one_call:
            return MediaPlan(spec.media, None)
        identity, default_num_frames = await self._identity(deadline)
        plan = MediaPlan(spec.media, identity, default_num_frames=default_num_frames)
        if self._held_ids.take_shortcut(plan):
            return plan  # the LLM service accepted every id before: ask it first, skip the encoder
        plan.output_transport = await self._output_transport(deadline)
        lookup = plan.lookup_request()
        if lookup is not None:
            plan.apply_lookup(await self._call(ENCODER, "LookupEmbeddings", lookup, deadline, spec.metadata))
        await self._encode(plan, plan.encode_indices(), spec, deadline)
        self._check_identity(plan)
        return plan

    def _check_identity(self, plan: MediaPlan) -> None:
        if plan.ids_disagree:
            self._encoder_info = None  # the encoder's identity changed (restart with another model?)
            self._held_ids.clear()  # the remembered ids were computed with the old one

    async def _encode(self, plan: MediaPlan, indices: list[int], spec: CallSpec, deadline: Deadline) -> None:
        if indices:
            if plan.output_transport == common_pb2.EMBEDDING_TRANSPORT_UNSPECIFIED:
                plan.output_transport = await self._output_transport(deadline)
            request = plan.encode_request(indices, spec.request_id)
            try:
                response = await self._call(ENCODER, "Encode", request, deadline, spec.metadata)
            except VlmClientError as exc:
                if not self._transport.fall_back(exc, used_shared_memory=request.output_transport == SHM):
                    raise
                plan.output_transport = common_pb2.EMBEDDING_TRANSPORT_BYTES  # this encoder has no ring
                request = plan.encode_request(indices, spec.request_id)
                response = await self._call(ENCODER, "Encode", request, deadline, spec.metadata)
            plan.apply_encode(indices, response)

    async def _output_transport(self, deadline: Deadline) -> int:
        """EncodeRequest.output_transport for this client (asks the LLM service once, in auto mode)."""
        if self._transport.needs_llm_info(self._encoder_info):
            try:
                request = llm_service_pb2.LlmServiceGetModelInfoRequest()
                self._transport.set_llm_info(await self._call(LLM, "GetModelInfo", request, deadline))
            except VlmClientError as exc:  # not fatal here: bytes now, ask again next time
                logger.debug("LLM GetModelInfo failed (%s); embeddings go as bytes", exc)
                return common_pb2.EMBEDDING_TRANSPORT_BYTES
        return self._transport.output_transport(self._encoder_info)

    async def _upload(
        self, plan: MediaPlan, exc: VlmClientError, spec: CallSpec, deadline: Deadline
    ) -> set[str]:
        upload = self._ids_to_upload(plan, exc)
        fetch = plan.fetch_request(upload)
        if fetch is not None:
            plan.apply_fetch(await self._call(ENCODER, "LookupEmbeddings", fetch, deadline, spec.metadata))
        await self._encode(plan, plan.reencode_indices(upload), spec, deadline)
        self._check_identity(plan)
        return upload


__all__ = ["AsyncClient", "GenerationStream"]
