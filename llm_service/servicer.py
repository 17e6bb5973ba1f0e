"""The gRPC `vlm.v1.LlmService`: thin async methods over the engine, the embedding cache and the encoder.

Each method converts the request (`convert`), resolves multimodal inputs (full embeddings are
checked and cached; content ids come from the cache, all missing ids answered at once with
NOT_FOUND; raw media goes to the encoder in one-call mode), runs the engine and converts its outputs
back. Errors are domain exceptions mapped to statuses by `handle_rpc_errors`. The engine request is
aborted in `finally` whenever the stream ends early: client cancel, deadline, or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

from vlm.v1 import llm_service_pb2, llm_service_pb2_grpc

from llm_service import convert
from llm_service.config import LlmServiceConfig
from llm_service.convert import RequestTimeline, StreamResponseBuilder
from llm_service.embedding_cache import EmbeddingCache
from llm_service.encoder_client import EncoderClient
from llm_service.engine import calls
from llm_service.engine.async_engine import AsyncLLMEngine
from llm_service.engine.engine_core import RequestOutput
from llm_service.engine.engine_process import ProcessEngineClient
from llm_service.engine.model_runner import MultimodalEmbedding
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.tensor_ref import TensorRef
from llm_service.model_info import ModelDescription
from vlm_protocol.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
    VlmError,
)
from vlm_protocol.grpc_server import handle_rpc_errors
from vlm_protocol.shared_memory import SharedMemoryReader

logger = logging.getLogger(__name__)

SERVICE_NAME = llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


class _TokenTexts:
    """Each token's text decoded alone (log probs, Tokenize), memoised: bounded by the vocabulary."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text


class LlmService(llm_service_pb2_grpc.LlmServiceServicer):
    def __init__(
        self,
        engine: AsyncLLMEngine | ProcessEngineClient,
        model: ModelDescription,
        config: LlmServiceConfig,
        *,
        defaults: SamplingParams,
        encoder: EncoderClient | None = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.config = config
        self.defaults = defaults
        self.encoder = encoder
        self.cache = EmbeddingCache(
            config.embedding_cache_bytes, kind=model.embedding_kind, hidden_size=model.hidden_size
        )
        self._token_text = _TokenTexts(engine.tokenizer)
        self._is_ready = False
        # read-only mappings of encoders' /dev/shm regions (EMBEDDING_TRANSPORT_SHARED_MEMORY)
        self.shared_memory = SharedMemoryReader() if config.accept_shared_memory else None
        # An engine in its own process that reads /dev/shm itself: embeddings sent in shared memory
        # are forwarded there by reference, not read here (one copy of 4.7 MB per image, not three).
        self._forward_shared_memory = (
            isinstance(engine, ProcessEngineClient)
            and self.shared_memory is not None
            and engine.reads_shared_memory_in(self.shared_memory.directory)
        )
        self._model_info = convert.model_info_response(
            model,
            defaults=defaults,
            limits=convert.ServiceLimits(
                max_multimodal_inputs=config.max_multimodal_inputs,
                max_num_seqs=config.max_num_seqs,
                max_queue_size=config.max_queue_size,
                max_embedding_cache_bytes=config.embedding_cache_bytes,
                max_message_bytes=config.max_message_bytes,
            ),
            supports_media_inputs=encoder is not None,
            accepts_shared_memory=config.accept_shared_memory,
        )

    def set_ready(self) -> None:
        """Accept generation calls from now on (after the warm-up)."""
        self._is_ready = True

    async def close(self) -> None:
        if self.encoder is not None:
            await self.encoder.close()
        if self.shared_memory is not None:
            self.shared_memory.close()

    # --- RPCs ---------------------------------------------------------------------------------------

    @handle_rpc_errors
    async def GetModelInfo(self, request, context):
        return self._model_info

    @handle_rpc_errors
    async def Tokenize(self, request, context):
        self._check_ready()
        inp = convert.tokenize_input(request)
        # Rendering and encoding run in the engine (its tokenizer and chat template); single tokens
        # are decoded here, as for log probs.
        text, token_ids, placeholders = await self.engine.call(calls.tokenize_text, inp)
        strings = [self._token_text(t) for t in token_ids] if request.return_token_strings else None
        return convert.tokenize_response(text, token_ids, placeholders, strings)

    @handle_rpc_errors
    async def Generate(self, request, context):
        async with contextlib.aclosing(self._generate(request, context)) as stream:
            responses = [response async for response in stream]
        return convert.merge_stream(responses)

    @handle_rpc_errors
    async def GenerateStream(self, request, context):
        async with contextlib.aclosing(self._generate(request, context)) as stream:
            async for response in stream:
                yield response

    # --- generation ---------------------------------------------------------------------------------

    def _check_ready(self) -> None:
        if not self._is_ready:
            raise UnavailableError("the model is still warming up; retry shortly")

    async def _generate(self, request, context) -> AsyncIterator[llm_service_pb2.GenerateStreamResponse]:
        timeline = RequestTimeline(received_at=time.monotonic())
        request_id = "-"
        builder: StreamResponseBuilder | None = None
        outcome = "internal"
        try:
            request_id = convert.request_id_of(request)
            self._check_ready()
            # Parameters first: a bad request must not cost the client an embedding upload.
            inp = convert.generation_input(
                request,
                engine_request_id=uuid.uuid4().hex,  # never the caller's id: two callers may pick the same
                defaults=self.defaults,
                vocab_size=self.model.vocab_size,
            )
            started = time.monotonic()
            embeddings = await self._resolve_embeddings(request, request_id, timeline, context)
            timeline.inputs_s = time.monotonic() - started - timeline.encode_s
            inp = dataclasses.replace(inp, embeddings=tuple(embeddings))
            options = request.output_options
            builder = StreamResponseBuilder(
                request_id,
                timeline,
                token_text=self._token_text,
                num_multimodal_prompt_tokens=convert.num_multimodal_prompt_tokens(embeddings),
                top_log_probs=options.top_log_probs,
            )
            echo = await self.engine.call(calls.tokenize_prompt, inp) if options.echo_prompt else None
            deadline = None
            if self.config.request_timeout_s is not None:
                deadline = timeline.received_at + self.config.request_timeout_s
            stream = self.engine.generate(inp)
            try:
                while (output := await self._next_output(stream, deadline)) is not None:
                    message = builder.build(output, time.monotonic())
                    if echo is not None:
                        convert.echo_fields(message, *echo)
                        echo = None
                    yield message
                    if output.is_finished:
                        break
            finally:
                await stream.aclose()  # aborts the engine request unless it finished
            outcome = builder.finish_reason.value if builder.finish_reason else "incomplete"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except VlmError as exc:
            outcome = exc.status.lower()
            raise
        finally:
            self._log_summary(request_id, outcome, builder, timeline)

    async def _next_output(
        self, stream: AsyncIterator[RequestOutput], deadline: float | None
    ) -> RequestOutput | None:
        try:
            if deadline is None:
                return await anext(stream)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(anext(stream), remaining)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise DeadlineExceededError(
                f"the request did not finish within the server's limit of {self.config.request_timeout_s:g} s"
            ) from None

    async def _resolve_embeddings(
        self, request, request_id: str, timeline: RequestTimeline, context
    ) -> list[MultimodalEmbedding]:
        """Every multimodal input as an embedding, in input order (see MultimodalInput)."""
        slots = convert.input_slots(
            request,
            self.model,
            max_inputs=self.config.max_multimodal_inputs,
            shared_memory=self.shared_memory,
            defer_shared_memory=self._forward_shared_memory,
        )
        resolved: list[MultimodalEmbedding | None] = [slot.embedding for slot in slots]
        sent = {e.content_id: e for e in resolved if e is not None}
        for embedding in sent.values():
            if not isinstance(embedding.features, TensorRef):  # a forwarded slice has no bytes here
                self.cache.put(embedding)  # too large for the cache: still used for this request
        missing: list[str] = []
        for slot in slots:
            if slot.content_id is None:
                continue
            embedding = sent.get(slot.content_id)
            if embedding is None:
                embedding = self.cache.get(slot.content_id)
            if embedding is None and isinstance(self.engine, ProcessEngineClient):
                embedding = self.engine.held_embedding(slot.content_id)  # its features stay there
            if embedding is None:
                if slot.content_id not in missing:
                    missing.append(slot.content_id)
                continue
            resolved[slot.index] = embedding
        if missing:
            stale = {slot.content_id for slot in slots if slot.stale_shared_memory} & set(missing)
            why = f" ({len(stale)} sent in a shared-memory slot that was reused)" if stale else ""
            raise NotFoundError(
                f"this server does not hold {len(missing)} referenced embedding(s){why}: {', '.join(missing)}; "
                "resend them in full",
                content_ids=missing,
            )
        media = [slot for slot in slots if slot.media is not None]
        if media:
            if self.encoder is None:
                raise FailedPreconditionError(
                    "raw media inputs need one-call mode: start the LLM service with --encoder-address "
                    "HOST:PORT, or encode with EncoderService.Encode and send the embeddings"
                )
            started = time.monotonic()
            encoded = await self.encoder.encode(
                [slot.media for slot in media], request_id=request_id, timeout_s=context.time_remaining()
            )
            timeline.encode_s = time.monotonic() - started
            for slot, message in zip(media, encoded, strict=True):
                embedding = convert.embedding_from_proto(
                    message, self.model, field=f"multimodal_inputs[{slot.index}] (as encoded)"
                )
                self.cache.put(embedding)
                resolved[slot.index] = embedding
        assert all(e is not None for e in resolved)
        return resolved  # type: ignore[return-value]

    @staticmethod
    def _log_summary(
        request_id: str, outcome: str, builder: StreamResponseBuilder | None, timeline: RequestTimeline
    ) -> None:
        now = time.monotonic()
        if builder is None:
            logger.info("request %s %s after %.1f ms", request_id, outcome, timeline.total_ms(now))
            return
        logger.info(
            "request %s %s: prompt=%d (cached %d) completion=%d inputs=%.1f ms ttft=%.1f ms total=%.1f ms",
            request_id,
            outcome,
            builder.num_prompt_tokens,
            builder.num_cached_prompt_tokens,
            builder.num_output_tokens,
            timeline.inputs_s * 1e3,
            timeline.ttft_ms,
            timeline.total_ms(now),
        )
