"""Blocking client: encoder look-up/encode, then the LLM service, ids first (protos/README.md).

Media whose content ids the LLM service has accepted before skip the encoder (the LLM-first shortcut,
``client_sdk.held_ids``); a NOT_FOUND falls back to the encoder.

with Client() as client:                      # $VLM_ENCODER_ADDR / $VLM_LLM_ADDR, or arguments
    result = client.generate("USER: <image>\\nWhat is this? ASSISTANT:", images=["cat.png"], max_tokens=32)
    for delta in client.generate("Tell me a story.", stream=True, max_tokens=64):
        print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
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


class Client(ClientBase):
    """Thread-safe client of one encoder service and one LLM service.

    Args:
      encoder_address, llm_address: ``host:port``; default ``$VLM_ENCODER_ADDR`` / ``$VLM_LLM_ADDR``
        (read now), else ``localhost:50051`` / ``localhost:50052``.
      timeout_s: default budget of one ``generate`` call, every RPC included.
      max_message_bytes: send/receive limit of both channels (embeddings are large).
      one_call: send raw media to the LLM service and let it call the encoder (it must run with
        ``--encoder-address``); by default the SDK talks to the encoder itself.
      credentials: TLS channel credentials; None for plaintext.
      channel_options: extra gRPC channel options.
      held_ids_capacity: content ids (LRU, default 4096) remembered as accepted by the LLM service; a
        call whose media all have remembered, locally computed ids skips the encoder and sends ids
        straight to the LLM service, falling back to the encoder on NOT_FOUND. 0 disables it.
      embedding_transport: "auto" (default, or ``$VLM_EMBEDDING_TRANSPORT``), "bytes" or
        "shared_memory": whether the encoder hands embeddings to the LLM service through its shared
        memory instead of the gRPC messages (same host only; ``client_sdk.embedding_transport``).
    """

    # --- connections --------------------------------------------------------------------------

    def _channel(self, which: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            channel = self._channels.get(which)
            if channel is None:
                address, options = self._address(which), self.settings.channel_options()
                channel = (
                    grpc.secure_channel(address, self._credentials, options=options)
                    if self._credentials is not None
                    else grpc.insecure_channel(address, options=options)
                )
                self._channels[which] = channel
            return channel

    def _encoder_stub(self) -> encoder_service_pb2_grpc.EncoderServiceStub:
        return encoder_service_pb2_grpc.EncoderServiceStub(self._channel(ENCODER))

    def _llm_stub(self) -> llm_service_pb2_grpc.LlmServiceStub:
        return llm_service_pb2_grpc.LlmServiceStub(self._channel(LLM))

    def _call(self, which: str, method: str, request: Any, deadline: Deadline, metadata=()) -> Any:
        stub = self._encoder_stub() if which == ENCODER else self._llm_stub()
        service = "EncoderService" if which == ENCODER else "LlmService"
        target = self._address(which)
        timeout = deadline.remaining(f"{service}.{method}", target)
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, target=target, method=f"{service}.{method}") from None

    def close(self) -> None:
        """Close both channels; in-flight calls are cancelled. Idempotent."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- service info -------------------------------------------------------------------------

    def encoder_info(
        self, *, refresh: bool = False, timeout_s: float | None = None
    ) -> encoder_service_pb2.EncoderServiceGetModelInfoResponse:
        """The encoder's GetModelInfo, fetched once and cached (``refresh=True`` asks again)."""
        info = self._encoder_info
        if info is None or refresh:
            deadline = Deadline(timeout_s or self.settings.timeout_s)
            info = self._call(
                ENCODER, "GetModelInfo", encoder_service_pb2.EncoderServiceGetModelInfoRequest(), deadline
            )
            self._encoder_info = info
        return info

    def llm_info(self, *, timeout_s: float | None = None) -> llm_service_pb2.LlmServiceGetModelInfoResponse:
        """The LLM service's GetModelInfo (placeholders, limits, sampling defaults)."""
        deadline = Deadline(timeout_s or self.settings.timeout_s)
        return self._call(LLM, "GetModelInfo", llm_service_pb2.LlmServiceGetModelInfoRequest(), deadline)

    def health(self, *, timeout_s: float = 5.0) -> dict[str, str]:
        """``{"encoder": status, "llm": status}`` from grpc.health.v1: SERVING, NOT_SERVING, UNAVAILABLE, ..."""
        statuses = {}
        for which in (ENCODER, LLM):
            stub = health_pb2_grpc.HealthStub(self._channel(which))
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
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
    ) -> GenerateResult | Iterator[StreamDelta]:
        """Generate a completion; ``stream=True`` returns an iterator of ``StreamDelta``.

        ``prompt`` is text with one placeholder per image/video (``<image>``, ``<video>``, ``<|image|>``
        for mllama; see ``llm_info()``), or chat messages ``[{"role": "user", "content": [{"type":
        "image"}, "What is this?"]}]`` rendered with the checkpoint's template. ``prompt_format=
        "triton"`` applies the original Triton ensemble's per-family template. ``sampling`` keywords
        are the proto's field names: ``max_tokens``, ``min_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``seed``, ``repetition_penalty``, ``presence_penalty``,
        ``frequency_penalty``, ``stop`` / ``stop_strings``, ``stop_token_ids``, ``end_id``, ``pad_id``,
        ``ignore_eos``, ``include_stop_str_in_output``, and output options ``log_probs``,
        ``top_log_probs``, ``prompt_log_probs``, ``echo_prompt``, ``skip_special_tokens``.

        Raises ``TypeError`` for unknown keywords and ``VlmClientError`` subclasses for everything else
        (the streaming iterator raises them while iterating). Closing the iterator cancels the call.
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
            return self._stream(spec)
        return self._unary(spec)

    def _unary(self, spec: CallSpec) -> GenerateResult:
        deadline = Deadline(spec.timeout_s)
        plan = self._prepare_media(spec, deadline)
        encode_ms = deadline.elapsed_ms() if plan.uses_encoder else 0.0
        inputs = plan.raw_inputs() if self.settings.one_call else plan.llm_inputs()
        for attempt in (1, 2):
            sent_ms = deadline.elapsed_ms()
            try:
                response = self._call(
                    LLM,
                    "Generate",
                    spec.request(llm_service_pb2.GenerateRequest, inputs),
                    deadline,
                    spec.metadata,
                )
                break
            except VlmClientError as exc:
                if not should_resend(
                    exc, plan, attempt, one_call=self.settings.one_call, transport=self._transport
                ):
                    raise
                inputs = plan.llm_inputs(self._upload(plan, exc, spec, deadline))
        self._held_ids.accepted(plan)
        timing = convert.timings(
            response.timings,
            encode_ms=encode_ms,
            time_to_first_token_ms=sent_ms + response.timings.time_to_first_token_ms,
            total_ms=deadline.elapsed_ms(),
        )
        return convert.result(response, timing=timing, **plan.result_extras())

    def _stream(self, spec: CallSpec) -> Iterator[StreamDelta]:
        deadline = Deadline(spec.timeout_s)  # starts when iteration starts
        plan = self._prepare_media(spec, deadline)
        encode_ms = deadline.elapsed_ms() if plan.uses_encoder else 0.0
        inputs = plan.raw_inputs() if self.settings.one_call else plan.llm_inputs()
        target, method = self.settings.llm_address, "LlmService.GenerateStream"
        first_token_ms: float | None = None
        for attempt in (1, 2):
            request = spec.request(llm_service_pb2.GenerateStreamRequest, inputs)
            call = self._llm_stub().GenerateStream(
                request, timeout=deadline.remaining(method, target), metadata=spec.metadata
            )
            received = False
            try:
                for message in call:
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
                call.cancel()  # no-op once finished; frees the server's request if we stop early
            inputs = plan.llm_inputs(self._upload(plan, exc, spec, deadline))

    # --- media --------------------------------------------------------------------------------

    def _identity(self, deadline: Deadline) -> tuple[PreprocessingIdentity, int]:
        info = self._encoder_info
        if info is None:
            request = encoder_service_pb2.EncoderServiceGetModelInfoRequest()
            info = self._encoder_info = self._call(ENCODER, "GetModelInfo", request, deadline)
        return convert.preprocessing_identity(info), info.default_num_frames

    def _prepare_media(self, spec: CallSpec, deadline: Deadline) -> MediaPlan:
        """Make sure the encoder holds every item's embedding; learn their content ids."""
        if not spec.media or self.settings.one_call:
            return MediaPlan(spec.media, None)
        identity, default_num_frames = self._identity(deadline)
        plan = MediaPlan(spec.media, identity, default_num_frames=default_num_frames)
        if self._held_ids.take_shortcut(plan):
            return plan  # the LLM service accepted every id before: ask it first, skip the encoder
        plan.output_transport = self._output_transport(deadline)
        lookup = plan.lookup_request()
        if lookup is not None:
            plan.apply_lookup(self._call(ENCODER, "LookupEmbeddings", lookup, deadline, spec.metadata))
        self._encode(plan, plan.encode_indices(), spec, deadline)
        self._check_identity(plan)
        return plan

    def _check_identity(self, plan: MediaPlan) -> None:
        if plan.ids_disagree:
            self._encoder_info = None  # the encoder's identity changed (restart with another model?)
            self._held_ids.clear()  # the remembered ids were computed with the old one

    def _encode(self, plan: MediaPlan, indices: list[int], spec: CallSpec, deadline: Deadline) -> None:
        if indices:
            if plan.output_transport == common_pb2.EMBEDDING_TRANSPORT_UNSPECIFIED:
                plan.output_transport = self._output_transport(deadline)
            request = plan.encode_request(indices, spec.request_id)
            try:
                response = self._call(ENCODER, "Encode", request, deadline, spec.metadata)
            except VlmClientError as exc:
                if not self._transport.fall_back(exc, used_shared_memory=request.output_transport == SHM):
                    raise
                plan.output_transport = common_pb2.EMBEDDING_TRANSPORT_BYTES  # this encoder has no ring
                request = plan.encode_request(indices, spec.request_id)
                response = self._call(ENCODER, "Encode", request, deadline, spec.metadata)
            plan.apply_encode(indices, response)

    def _output_transport(self, deadline: Deadline) -> int:
        """EncodeRequest.output_transport for this client (asks the LLM service once, in auto mode)."""
        if self._transport.needs_llm_info(self._encoder_info):
            try:
                request = llm_service_pb2.LlmServiceGetModelInfoRequest()
                self._transport.set_llm_info(self._call(LLM, "GetModelInfo", request, deadline))
            except VlmClientError as exc:  # not fatal here: bytes now, ask again next time
                logger.debug("LLM GetModelInfo failed (%s); embeddings go as bytes", exc)
                return common_pb2.EMBEDDING_TRANSPORT_BYTES
        return self._transport.output_transport(self._encoder_info)

    def _upload(self, plan: MediaPlan, exc: VlmClientError, spec: CallSpec, deadline: Deadline) -> set[str]:
        """After NOT_FOUND: gather the embeddings the LLM service lacks, for a resend with tensors."""
        upload = self._ids_to_upload(plan, exc)
        fetch = plan.fetch_request(upload)
        if fetch is not None:
            plan.apply_fetch(self._call(ENCODER, "LookupEmbeddings", fetch, deadline, spec.metadata))
        self._encode(plan, plan.reencode_indices(upload), spec, deadline)
        self._check_identity(plan)
        return upload


__all__ = ["Client"]
