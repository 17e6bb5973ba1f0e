"""The gRPC servicer: thin methods that convert, call the pipeline and convert back.

Errors are domain exceptions mapped to statuses by ``handle_rpc_errors`` (vlm_protocol.grpc_server).
Each Encode call logs one summary line (request id, items, cache hits, status, timings); media bytes
and URLs are never logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

import grpc
from vlm.v1 import encoder_service_pb2, encoder_service_pb2_grpc

from encoder_service import convert
from encoder_service.config import EncoderConfig
from encoder_service.pipeline import EncodeOutcome, EncoderPipeline
from vlm_protocol.errors import VlmError
from vlm_protocol.grpc_server import handle_rpc_errors
from vlm_protocol.shared_memory import SharedMemoryRing

logger = logging.getLogger(__name__)

SERVICE_NAME = encoder_service_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


class EncoderService(encoder_service_pb2_grpc.EncoderServiceServicer):
    def __init__(
        self,
        pipeline: EncoderPipeline,
        config: EncoderConfig,
        *,
        shared_memory: SharedMemoryRing | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._config = config
        self.shared_memory = shared_memory  # the ring for EMBEDDING_TRANSPORT_SHARED_MEMORY, if configured

    @handle_rpc_errors
    async def Encode(
        self, request: encoder_service_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> encoder_service_pb2.EncodeResponse:
        started = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        outcome: EncodeOutcome | None = None
        status = "OK"
        try:
            self._pipeline.check_request(len(request.items))
            output_dtype = convert.output_dtype_from_proto(
                request.output_dtype, self._config.default_output_dtype
            )
            ring = convert.shared_memory_for_request(request, self.shared_memory)
            items = convert.items_from_request(request)
            outcome = await self._pipeline.encode(items, bypass_cache=request.bypass_cache)
            response = await self._pipeline.run_cpu(
                functools.partial(convert.encode_response, shared_memory=ring),
                request_id,
                outcome,
                self._pipeline,
                output_dtype,
                0.0,
            )
            response.timings.total_ms = (time.perf_counter() - started) * 1000.0
            return response
        except VlmError as exc:
            status = exc.status
            raise
        except BaseException as exc:
            status = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"
            raise
        finally:
            _log_summary(request_id, len(request.items), outcome, status, started)

    @handle_rpc_errors
    async def LookupEmbeddings(
        self, request: encoder_service_pb2.LookupEmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> encoder_service_pb2.LookupEmbeddingsResponse:
        content_ids = convert.lookup_ids_from_request(request)
        output_dtype = convert.output_dtype_from_proto(
            request.output_dtype, self._config.default_output_dtype
        )
        records = self._pipeline.lookup(content_ids)

        def respond() -> encoder_service_pb2.LookupEmbeddingsResponse:
            return convert.lookup_response(
                content_ids,
                records,
                self._pipeline,
                return_embeddings=request.return_embeddings,
                output_dtype=output_dtype,
            )

        if request.return_embeddings and any(record is not None for record in records):
            return await self._pipeline.run_cpu(respond)  # megabytes of tensors to copy: off the loop
        return respond()  # ids only: cheaper than the hop to a worker thread

    @handle_rpc_errors
    async def GetModelInfo(
        self,
        request: encoder_service_pb2.EncoderServiceGetModelInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> encoder_service_pb2.EncoderServiceGetModelInfoResponse:
        return convert.model_info_response(
            self._pipeline, self._config, shared_memory_available=self.shared_memory is not None
        )


def _log_summary(
    request_id: str, num_items: int, outcome: EncodeOutcome | None, status: str, started: float
) -> None:
    total_ms = (time.perf_counter() - started) * 1000.0
    if outcome is None:
        logger.info("encode id=%s items=%d status=%s total_ms=%.1f", request_id, num_items, status, total_ms)
        return
    stages = outcome.stage_ms
    logger.info(
        "encode id=%s items=%d cached=%d status=%s total_ms=%.1f fetch_ms=%.1f decode_ms=%.1f "
        "preprocess_ms=%.1f queue_ms=%.1f encode_ms=%.1f",
        request_id,
        num_items,
        sum(result.is_cached for result in outcome.results),
        status,
        total_ms,
        stages["fetch"],
        stages["decode"],
        stages["preprocess"],
        stages["queue"],
        stages["encode"],
    )
