"""vlm.v1.LlmService over real gRPC (127.0.0.1, ephemeral ports) with the tiny LLaVA checkpoint.

Correctness is Hugging Face greedy `generate()` on the same checkpoint and image rows. One engine is
shared by most tests (each test starts its own server on it); tests that need other engine bounds
build their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from vlm.v1 import (
    common_pb2,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    llm_service_pb2,
    llm_service_pb2_grpc,
)

from llm_service.config import LlmServiceConfig
from llm_service.engine import calls
from llm_service.engine.async_engine import AsyncLLMEngine
from llm_service.engine.engine_core import EngineCore, GenerationInput
from llm_service.engine.engine_process import ProcessEngineClient, process_counters
from llm_service.engine.model_runner import MultimodalEmbedding
from llm_service.server import LlmServer, build_server
from tests.engine.hf_reference import HFReference
from tests.engine.test_engine_parity import _images
from vlm_protocol.checkpoint_identity import model_fingerprint
from vlm_protocol.errors import (
    MISSING_CONTENT_IDS_METADATA_KEY,
    InternalError,
    InvalidArgumentError,
    parse_missing_content_ids,
)
from vlm_protocol.grpc_server import ServerConfig, ServiceRegistration, start_server
from vlm_protocol.tensor_codec import encode_torch

PROMPT = "USER: <image>\nWhat is shown in this picture? Please answer in detail. ASSISTANT:"
NUM_TOKENS = 8
REPO_ROOT = Path(__file__).resolve().parents[2]
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"
UNKNOWN_ID = "b3:" + "0" * 64
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    """(checkpoint, HF reference for image A, for image B); 8 greedy tokens each."""
    ckpt = tiny_checkpoint("llava")
    hf = HFReference("llava", ckpt)
    return ckpt, hf.run(PROMPT, _images(0, 1), NUM_TOKENS), hf.run(PROMPT, _images(1, 1), NUM_TOKENS)


def _config(ckpt: Path, **overrides) -> LlmServiceConfig:
    values = {
        "model_dir": str(ckpt),
        "host": "127.0.0.1",
        "port": 0,
        "device": "cpu",
        "block_size": 4,
        "grace_period_s": 5.0,
        "max_num_batched_tokens": 256,
    }
    return LlmServiceConfig(**{**values, **overrides})


def _engine(config: LlmServiceConfig) -> AsyncLLMEngine:
    return AsyncLLMEngine(EngineCore(config.engine_config()))


@pytest.fixture(scope="module")
def engine(llava):
    engine = _engine(_config(llava[0]))
    yield engine
    engine.shutdown()


def _embedding(ckpt: Path, e: MultimodalEmbedding, **fields) -> common_pb2.Embedding:
    rows = int(e.features.shape[0])
    message = common_pb2.Embedding(
        content_id=e.content_id,
        kind=common_pb2.EMBEDDING_KIND_PROMPT_TABLE,
        media_type=common_pb2.MEDIA_TYPE_IMAGE,
        model_family=common_pb2.MODEL_FAMILY_LLAVA,
        model_fingerprint=model_fingerprint(ckpt),
        num_rows=rows,
        num_prompt_tokens=rows,
    )
    encode_torch(e.features, out=message.features)
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def _full(ckpt: Path, ref) -> llm_service_pb2.MultimodalInput:
    return llm_service_pb2.MultimodalInput(embedding=_embedding(ckpt, ref.embeddings[0]))


def _by_id(ref) -> llm_service_pb2.MultimodalInput:
    return llm_service_pb2.MultimodalInput(content_id=ref.embeddings[0].content_id)


def _request(inputs, *, max_tokens: int = NUM_TOKENS, prompt: str = PROMPT, **sampling) -> dict:
    """Keyword arguments shared by GenerateRequest and GenerateStreamRequest."""
    return {
        "prompt": prompt,
        "multimodal_inputs": list(inputs),
        "sampling": llm_service_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
    }


@contextlib.asynccontextmanager
async def _serving(
    config: LlmServiceConfig, engine: AsyncLLMEngine | ProcessEngineClient, *, ready: bool = True
) -> AsyncIterator[tuple[LlmServer, llm_service_pb2_grpc.LlmServiceStub, grpc.aio.Channel]]:
    server = build_server(config, engine)
    await server.start()
    if ready:
        await server.start_serving()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield server, llm_service_pb2_grpc.LlmServiceStub(channel), channel
    finally:
        await channel.close()
        await server.stop_now()


async def _expect_error(call, code: grpc.StatusCode, *fragments: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    return info.value


async def _stream_all(stub, request, timeout: float = 30) -> list[llm_service_pb2.GenerateStreamResponse]:
    return [message async for message in stub.GenerateStream(request, timeout=timeout)]


async def _wait_idle(engine: AsyncLLMEngine, timeout_s: float = 10.0):
    stats = engine.stats()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == stats.num_kv_blocks_used == 0:
            return stats
        await asyncio.sleep(0.02)
    return stats


# --- generation ---------------------------------------------------------------------------------------


def test_generate_and_stream_match_hf_and_ids_reuse_the_cache(llava, engine):
    ckpt, ref_a, ref_b = llava

    async def scenario():
        async with _serving(_config(ckpt), engine) as (_, stub, _):
            unary = await stub.Generate(
                llm_service_pb2.GenerateRequest(**_request([_full(ckpt, ref_a)])), timeout=30
            )
            assert list(unary.token_ids) == ref_a.output_token_ids
            assert unary.finish_reason == llm_service_pb2.FINISH_REASON_LENGTH
            assert unary.request_id.startswith("req-")
            assert unary.usage.prompt_tokens == len(ref_a.prompt_token_ids)
            assert unary.usage.completion_tokens == NUM_TOKENS
            assert unary.usage.multimodal_prompt_tokens == ref_a.embeddings[0].features.shape[0]
            assert 0 < unary.timings.time_to_first_token_ms <= unary.timings.total_ms
            # decoding the sent embedding is timed, inside the time to first token
            assert 0 < unary.timings.inputs_ms < unary.timings.time_to_first_token_ms

            request = llm_service_pb2.GenerateStreamRequest(
                request_id="my-id", **_request([_full(ckpt, ref_b)])
            )
            messages = await _stream_all(stub, request)
            finals = [m for m in messages if m.finish_reason != llm_service_pb2.FINISH_REASON_UNSPECIFIED]
            assert finals == [messages[-1]], "exactly one final message, the last"
            assert all(m.request_id == "my-id" for m in messages)
            assert not any(m.HasField("usage") or m.HasField("timings") for m in messages[:-1])
            assert [t for m in messages for t in m.token_ids] == ref_b.output_token_ids
            assert messages[-1].usage.completion_tokens == NUM_TOKENS
            assert messages[-1].timings.total_ms >= messages[-1].timings.time_to_first_token_ms > 0

            # Streamed deltas join to the unary result of the same request.
            stream_a = await _stream_all(
                stub, llm_service_pb2.GenerateStreamRequest(**_request([_by_id(ref_a)]))
            )
            assert "".join(m.text for m in stream_a) == unary.text
            assert [t for m in stream_a for t in m.token_ids] == list(unary.token_ids)
            # Sent by id only: the embedding came from the cache and the prompt's KV from the prefix cache.
            usage = stream_a[-1].usage
            assert 0 < usage.cached_prompt_tokens < usage.prompt_tokens

            # Chat messages render with the checkpoint's template to the same prompt.
            chat = llm_service_pb2.ChatPrompt(
                messages=[
                    llm_service_pb2.ChatMessage(
                        role="user",
                        content=[
                            llm_service_pb2.ContentPart(image=llm_service_pb2.MediaRef()),
                            llm_service_pb2.ContentPart(
                                text="What is shown in this picture? Please answer in detail."
                            ),
                        ],
                    )
                ]
            )
            request = _request([_by_id(ref_a)])
            del request["prompt"]
            chat_reply = await stub.Generate(
                llm_service_pb2.GenerateRequest(
                    chat=chat,
                    output_options=llm_service_pb2.OutputOptions(echo_prompt=True, top_log_probs=2),
                    **request,
                ),
                timeout=30,
            )
            assert list(chat_reply.token_ids) == ref_a.output_token_ids
            assert list(chat_reply.prompt_token_ids) == ref_a.prompt_token_ids
            assert chat_reply.prompt_text.endswith("ASSISTANT:")
            assert [lp.position for lp in chat_reply.log_probs] == [
                len(ref_a.prompt_token_ids) + i for i in range(NUM_TOKENS)
            ]
            first = chat_reply.log_probs[0]
            assert first.token.token_id == ref_a.output_token_ids[0] and len(first.top_alternatives) == 2
            assert first.top_alternatives[0].token_id == first.token.token_id  # greedy: the argmax
            assert first.token.log_prob == pytest.approx(
                float(ref_a.first_logprobs[first.token.token_id]), abs=1e-4
            )

            tokens = await stub.Tokenize(
                llm_service_pb2.TokenizeRequest(prompt=PROMPT, return_token_strings=True)
            )
            assert tokens.num_image_placeholders == 1 and tokens.rendered_prompt == PROMPT
            assert len(tokens.token_strings) == len(tokens.token_ids)

            info = await stub.GetModelInfo(llm_service_pb2.LlmServiceGetModelInfoRequest())
            assert info.model_family == common_pb2.MODEL_FAMILY_LLAVA
            assert info.model_fingerprint == model_fingerprint(ckpt)
            assert info.image_placeholder == "<image>" and not info.supports_media_inputs
            assert info.hidden_size == ref_a.embeddings[0].features.shape[1]
            assert info.kv_cache_dtype == engine.describe(ckpt).dtype  # auto: the model dtype

    asyncio.run(scenario())


def test_unknown_content_ids_are_not_found_with_the_ids_in_the_trailer(llava, engine):
    ckpt, ref_a, ref_b = llava
    other = "b3:" + "1" * 64

    async def scenario():
        async with _serving(_config(ckpt), engine) as (_, stub, _):
            prompt = "USER: <image><image><image>\nCompare. ASSISTANT:"
            inputs = [
                _by_id(ref_a),
                llm_service_pb2.MultimodalInput(content_id=UNKNOWN_ID),
                llm_service_pb2.MultimodalInput(content_id=other),
            ]
            error = await _expect_error(
                stub.Generate(llm_service_pb2.GenerateRequest(**_request(inputs, prompt=prompt)), timeout=10),
                grpc.StatusCode.NOT_FOUND,
                UNKNOWN_ID,
                other,
            )
            trailer = dict(error.trailing_metadata())[MISSING_CONTENT_IDS_METADATA_KEY]
            assert parse_missing_content_ids(trailer) == (ref_a.embeddings[0].content_id, UNKNOWN_ID, other)

            # The stream answers the same way, before any message.
            error = await _expect_error(
                _stream_all(stub, llm_service_pb2.GenerateStreamRequest(**_request([_by_id(ref_b)]))),
                grpc.StatusCode.NOT_FOUND,
            )
            trailer = dict(error.trailing_metadata())[MISSING_CONTENT_IDS_METADATA_KEY]
            assert parse_missing_content_ids(trailer) == (ref_b.embeddings[0].content_id,)

    asyncio.run(scenario())


def test_raw_media_needs_an_encoder(llava, engine, sample_image):
    ckpt, _, _ = llava
    png = io.BytesIO()
    sample_image.save(png, format="PNG")
    media = llm_service_pb2.MultimodalInput(
        media=common_pb2.MediaItem(image=common_pb2.Image(data=png.getvalue()))
    )

    async def scenario():
        async with _serving(_config(ckpt), engine) as (_, stub, _):
            await _expect_error(
                stub.Generate(llm_service_pb2.GenerateRequest(**_request([media])), timeout=10),
                grpc.StatusCode.FAILED_PRECONDITION,
                "--encoder-address",
            )
        # An encoder address where nothing listens: the encoder is down.
        async with _serving(_config(ckpt, encoder_address="127.0.0.1:1", encoder_timeout_s=5), engine) as (
            _,
            stub,
            _,
        ):
            await _expect_error(
                stub.Generate(llm_service_pb2.GenerateRequest(**_request([media])), timeout=10),
                grpc.StatusCode.UNAVAILABLE,
                "encoder",
            )

    asyncio.run(scenario())


class _FakeEncoder(encoder_service_pb2_grpc.EncoderServiceServicer):
    """Answers every item with one fixed embedding (what a real encoder would compute for the image)."""

    def __init__(self, embedding: common_pb2.Embedding) -> None:
        self.embedding = embedding
        self.num_items = 0

    async def Encode(self, request, context):
        self.num_items += len(request.items)
        results = [encoder_service_pb2.EncodeResult(embedding=self.embedding) for _ in request.items]
        return encoder_service_pb2.EncodeResponse(request_id=request.request_id, results=results)


def test_one_call_mode_encodes_raw_media_through_the_encoder(llava, engine):
    ckpt, ref_a, _ = llava
    fake = _FakeEncoder(_embedding(ckpt, ref_a.embeddings[0]))
    media = llm_service_pb2.MultimodalInput(
        media=common_pb2.MediaItem(image=common_pb2.Image(url="https://x/a.png"))
    )

    async def scenario():
        encoder = await start_server(
            ServerConfig(host="127.0.0.1", port=0),
            [
                ServiceRegistration(
                    encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server,
                    fake,
                    "vlm.v1.EncoderService",
                )
            ],
        )
        try:
            async with _serving(_config(ckpt, encoder_address=encoder.address), engine) as (_, stub, _):
                reply = await stub.Generate(llm_service_pb2.GenerateRequest(**_request([media])), timeout=30)
                assert list(reply.token_ids) == ref_a.output_token_ids
                assert reply.timings.encode_ms > 0 and fake.num_items == 1
                # The encoded embedding is cached under its content id for the ids-first protocol.
                reply = await stub.Generate(
                    llm_service_pb2.GenerateRequest(**_request([_by_id(ref_a)])), timeout=30
                )
                assert list(reply.token_ids) == ref_a.output_token_ids and fake.num_items == 1
                info = await stub.GetModelInfo(llm_service_pb2.LlmServiceGetModelInfoRequest())
                assert info.supports_media_inputs
        finally:
            await encoder.stop_now()

    asyncio.run(scenario())


def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(llava, engine):
    ckpt, ref_a, ref_b = llava
    emb = ref_a.embeddings[0]
    truncated = _embedding(ckpt, emb)
    truncated.features.data = truncated.features.data[:-4]
    narrow = _embedding(ckpt, emb)
    encode_torch(emb.features[:, :32].contiguous(), out=narrow.features)
    sampling = llm_service_pb2.SamplingParams
    cases = [
        ("prompt too long", {"prompt": "USER: <image>\n" + "hello " * 600}, ["prompt is", "at most 512"]),
        ("max_tokens < 0", {"sampling": sampling(max_tokens=-1)}, ["sampling.max_tokens", ">= 1"]),
        (
            "temperature < 0",
            {"sampling": sampling(max_tokens=4, temperature=-0.5)},
            ["sampling.temperature", ">= 0"],
        ),
        ("top_p > 1", {"sampling": sampling(max_tokens=4, top_p=1.5)}, ["sampling.top_p", "(0, 1]"]),
        (
            "more images than placeholders",
            {"multimodal_inputs": [_full(ckpt, ref_a), _full(ckpt, ref_b)]},
            ["1 image and 0 video placeholder", "2 image and 0 video input"],
        ),
        (
            "tensor bytes do not match shape",
            {"multimodal_inputs": [llm_service_pb2.MultimodalInput(embedding=truncated)]},
            ["multimodal_inputs[0].embedding.features.data", "bytes"],
        ),
        (
            "wrong hidden size",
            {"multimodal_inputs": [llm_service_pb2.MultimodalInput(embedding=narrow)]},
            ["hidden size 32", "64"],
        ),
        (
            "another checkpoint's embedding",
            {
                "multimodal_inputs": [
                    llm_service_pb2.MultimodalInput(
                        embedding=_embedding(ckpt, emb, model_fingerprint="b3:" + "2" * 64)
                    )
                ]
            },
            ["model_fingerprint"],
        ),
        (
            "num_rows disagrees with the shape",
            {
                "multimodal_inputs": [
                    llm_service_pb2.MultimodalInput(embedding=_embedding(ckpt, emb, num_rows=3))
                ]
            },
            ["num_rows is 3"],
        ),
        (
            "malformed content id",
            {"multimodal_inputs": [llm_service_pb2.MultimodalInput(content_id="b3:xyz")]},
            ["content_id", "malformed"],
        ),
        ("no prompt", {"prompt": None}, ["set `prompt`"]),
        (
            "end_id outside the vocabulary",
            {"sampling": sampling(max_tokens=4, end_id=10**6)},
            ["sampling.end_id"],
        ),
    ]

    async def scenario():
        async with _serving(_config(ckpt), engine) as (_, stub, _):
            for name, change, fragments in cases:
                kwargs = {**_request([_full(ckpt, ref_a)]), **change}
                if kwargs["prompt"] is None:
                    del kwargs["prompt"]
                error = await _expect_error(
                    stub.Generate(llm_service_pb2.GenerateRequest(**kwargs), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                for fragment in fragments:
                    assert fragment in error.details(), (name, error.details())
            # Still serving, with every block back.
            reply = await stub.Generate(
                llm_service_pb2.GenerateRequest(**_request([_full(ckpt, ref_a)])), timeout=30
            )
            assert list(reply.token_ids) == ref_a.output_token_ids
            assert (await _wait_idle(engine)).num_kv_blocks_used == 0

    asyncio.run(scenario())


def test_a_full_queue_answers_resource_exhausted(llava):
    ckpt, ref_a, _ = llava
    config = _config(ckpt, max_num_seqs=1, max_queue_size=1)
    engine = _engine(config)

    async def scenario():
        async with _serving(config, engine) as (_, stub, _):
            long = llm_service_pb2.GenerateStreamRequest(
                **_request([_full(ckpt, ref_a)], max_tokens=400, ignore_eos=True)
            )
            calls = [stub.GenerateStream(long, timeout=30) for _ in range(4)]
            outcomes = []
            for call in calls:  # one running + one waiting fit; the others cannot
                try:
                    await call.read()
                    outcomes.append("ok")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                    assert "retry later" in exc.details()
                    outcomes.append("busy")
            assert outcomes.count("ok") >= 1 and outcomes.count("busy") >= 1, outcomes
            for call in calls:
                call.cancel()
            assert (await _wait_idle(engine)).num_kv_blocks_used == 0
            reply = await stub.Generate(
                llm_service_pb2.GenerateRequest(**_request([_by_id(ref_a)])), timeout=30
            )
            assert list(reply.token_ids) == ref_a.output_token_ids

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


def test_64_concurrent_streams_with_cancellations_and_deadlines_free_every_block(llava, engine):
    ckpt, ref_a, ref_b = llava
    rng = random.Random(1234)
    live_aborts: list[str] = []
    core_abort = engine.core.abort

    def counting_abort(request_id: str) -> bool:  # runs on the engine thread
        was_live = core_abort(request_id)
        if was_live:
            live_aborts.append(request_id)
        return was_live

    async def one(stub, index: int) -> str:
        ref = (ref_a, ref_b)[index % 2]
        mode = rng.choice(["complete", "cancel", "deadline"])
        # Cancelled streams ask for far more tokens than they get to read, so they are still running
        # in the engine when the client goes away.
        max_tokens = {"complete": NUM_TOKENS, "cancel": 400, "deadline": rng.choice([NUM_TOKENS, 60])}[mode]
        inputs = [_full(ckpt, ref)] if index % 3 == 0 else [_by_id(ref)]
        request = llm_service_pb2.GenerateStreamRequest(
            request_id=f"c{index}",
            **_request(inputs, max_tokens=max_tokens, ignore_eos=max_tokens > NUM_TOKENS),
        )
        call = stub.GenerateStream(request, timeout=rng.uniform(0.01, 0.4) if mode == "deadline" else 60)
        cancel_after = rng.randint(0, 3)
        tokens: list[int] = []
        try:
            async for message in call:
                tokens.extend(message.token_ids)
                if mode == "cancel" and len(tokens) >= cancel_after:
                    call.cancel()
                    return "cancelled"
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.details()
            return "deadline"
        assert tokens[: len(ref.output_token_ids)] == ref.output_token_ids, f"request c{index}"
        return "complete"

    async def scenario():
        async with _serving(_config(ckpt), engine) as (_, stub, _):
            for ref in (ref_a, ref_b):  # so that id-only requests find their embeddings
                await stub.Generate(
                    llm_service_pb2.GenerateRequest(**_request([_full(ckpt, ref)])), timeout=30
                )
            engine.core.abort = counting_abort
            try:
                outcomes = await asyncio.gather(*(one(stub, i) for i in range(64)))
                stats = await _wait_idle(engine)
            finally:
                del engine.core.abort  # back to the class method
            assert outcomes.count("complete") >= 10 and outcomes.count("cancelled") >= 10, outcomes
            assert stats.num_running == stats.num_waiting == 0
            assert stats.num_kv_blocks_used == 0
            assert not engine.core.has_unfinished_requests()
            # Every cancelled stream was aborted in the engine, not left to run to its 400 tokens.
            assert len(live_aborts) >= outcomes.count("cancelled")
            reply = await stub.Generate(
                llm_service_pb2.GenerateRequest(**_request([_by_id(ref_b)])), timeout=30
            )
            assert list(reply.token_ids) == ref_b.output_token_ids

    asyncio.run(scenario())


def test_max_tokens_past_the_context_stop_at_max_model_len(llava):
    ckpt, ref_a, _ = llava
    max_model_len = len(ref_a.prompt_token_ids) + 10
    config = _config(ckpt, max_model_len=max_model_len)
    engine = _engine(config)

    async def scenario():
        async with _serving(config, engine) as (_, stub, _):
            for max_tokens in (100, 0):  # explicit, and the server default (256)
                reply = await stub.Generate(
                    llm_service_pb2.GenerateRequest(
                        **_request([_full(ckpt, ref_a)], max_tokens=max_tokens, ignore_eos=True)
                    ),
                    timeout=30,
                )
                assert reply.finish_reason == llm_service_pb2.FINISH_REASON_LENGTH
                assert reply.usage.prompt_tokens + reply.usage.completion_tokens == max_model_len
                assert list(reply.token_ids[:NUM_TOKENS]) == ref_a.output_token_ids

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


def test_the_server_side_request_timeout_is_deadline_exceeded(llava, engine):
    ckpt, ref_a, _ = llava

    async def scenario():
        async with _serving(_config(ckpt, request_timeout_s=0.3), engine) as (_, stub, _):
            request = _request([_full(ckpt, ref_a)], max_tokens=400, ignore_eos=True)
            await _expect_error(
                stub.Generate(llm_service_pb2.GenerateRequest(**request), timeout=30),
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "limit of 0.3 s",
            )
            assert (await _wait_idle(engine)).num_kv_blocks_used == 0

    asyncio.run(scenario())


# --- lifecycle ----------------------------------------------------------------------------------------


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


def test_health_is_not_serving_until_warm_and_reflection_lists_the_service(llava, engine):
    ckpt, ref_a, _ = llava

    async def scenario():
        async with _serving(_config(ckpt), engine, ready=False) as (server, stub, channel):
            assert await _health(channel) == NOT_SERVING
            assert await _health(channel, "vlm.v1.LlmService") == NOT_SERVING
            await _expect_error(
                stub.Generate(llm_service_pb2.GenerateRequest(**_request([_full(ckpt, ref_a)])), timeout=10),
                grpc.StatusCode.UNAVAILABLE,
                "warming up",
            )
            await server.start_serving()
            assert await _health(channel) == SERVING
            assert await _health(channel, "vlm.v1.LlmService") == SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=5)]
            names = {s.name for s in responses[0].list_services_response.service}
            assert {"vlm.v1.LlmService", "grpc.health.v1.Health"} <= names

    asyncio.run(scenario())


def test_drain_lets_the_in_flight_stream_finish_and_refuses_new_calls(llava, engine):
    ckpt, ref_a, _ = llava

    async def scenario():
        async with _serving(_config(ckpt, grace_period_s=20.0), engine) as (server, stub, channel):
            long = llm_service_pb2.GenerateStreamRequest(
                **_request([_full(ckpt, ref_a)], max_tokens=400, ignore_eos=True)
            )
            call = stub.GenerateStream(long, timeout=60)
            first = await call.read()
            drain = asyncio.ensure_future(server.drain())
            while not server.running.is_draining:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert not drain.done(), "the stream should still be running"
            fresh = grpc.aio.insecure_channel(server.address)
            try:
                await _expect_error(
                    llm_service_pb2_grpc.LlmServiceStub(fresh).Generate(
                        llm_service_pb2.GenerateRequest(**_request([_by_id(ref_a)])), timeout=5
                    ),
                    grpc.StatusCode.UNAVAILABLE,
                )
            finally:
                await fresh.close()
            messages = [first]
            while (message := await call.read()) is not grpc.aio.EOF:
                messages.append(message)
            assert messages[-1].finish_reason == llm_service_pb2.FINISH_REASON_LENGTH
            assert sum(len(m.token_ids) for m in messages) == 400
            assert (await call.code()) == grpc.StatusCode.OK
            await asyncio.wait_for(drain, timeout=20)

    asyncio.run(scenario())


@pytest.mark.skipif(not BUF.exists(), reason="node_modules/.bin/buf is missing (run `npm ci`)")
def test_buf_curl_calls_the_server_through_reflection_without_proto_files(llava, engine, tmp_path):
    ckpt, _, _ = llava

    async def buf_curl(address: str, method: str, body: dict) -> dict:
        process = await asyncio.create_subprocess_exec(
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--data",
            json.dumps(body),
            f"http://{address}/vlm.v1.LlmService/{method}",
            cwd=tmp_path,  # no proto files around: the schema must come from reflection
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, stderr.decode()
        return json.loads(stdout)

    async def scenario():
        async with _serving(_config(ckpt), engine) as (server, _, _):
            info = await buf_curl(server.address, "GetModelInfo", {})
            assert info["modelFamily"] == "MODEL_FAMILY_LLAVA"
            reply = await buf_curl(
                server.address,
                "Generate",
                {"prompt": "USER: Hello! ASSISTANT:", "sampling": {"max_tokens": 4}},
            )
            assert len(reply["tokenIds"]) == 4 and reply["finishReason"] == "FINISH_REASON_LENGTH"

    asyncio.run(scenario())


def test_cli_rejects_bad_flags_before_loading_anything(capsys):
    from llm_service.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--model", "/nonexistent", "--max-num-seqs", "0"])
    assert info.value.code == 2
    assert "max_num_seqs must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("extra_flags", [[], ["--engine-process"]], ids=["in-process", "engine-process"])
def test_cli_serves_and_drains_on_sigterm(llava, extra_flags):
    ckpt, _, _ = llava
    command = [
        sys.executable,
        "-m",
        "llm_service",
        "--model",
        str(ckpt),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        "cpu",
        "--block-size",
        "4",
        "--grace-period-s",
        "5",
        *extra_flags,
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'protos/gen/python'}"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    log: list[str] = []
    try:
        address = None
        deadline = time.monotonic() + 120
        while address is None and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(queue.Empty):
                log.append(lines.get(timeout=1))
                if "LLM service ready on " in log[-1]:
                    address = log[-1].rsplit("ready on ", 1)[1].strip()
        assert address, "".join(log)
        with grpc.insecure_channel(address) as channel:
            stub = llm_service_pb2_grpc.LlmServiceStub(channel)
            reply = stub.Generate(
                llm_service_pb2.GenerateRequest(
                    prompt="USER: Hi ASSISTANT:",
                    sampling=llm_service_pb2.SamplingParams(max_tokens=3, ignore_eos=True),
                ),
                timeout=30,
            )
            assert len(reply.token_ids) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    time.sleep(0.2)
    while not lines.empty():
        log.append(lines.get())
    text = "".join(log)
    assert "draining" in text and "prompt=" in text and "USER" not in text  # summary line, no prompt
    # once serving, each process that runs the engine loop leaves its start-up objects out of GC
    frozen = [line for line in log if "start-up objects frozen out of garbage collection" in line]
    assert any("llm service: " in line for line in frozen), text
    assert any("llm engine process: " in line for line in frozen) == bool(extra_flags), text
    if extra_flags:  # the engine process stopped with the service: no orphan
        pid = int(text.split("engine process ", 1)[1].split()[0])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- the engine in its own process (--engine-process) -------------------------------------------------


@pytest.fixture(scope="module")
def process_engine(llava):
    # torch_threads=1: the engine process applies --torch-threads itself (CI's default count is 2)
    engine = ProcessEngineClient(_config(llava[0], engine_process=True, torch_threads=1).engine_config())
    engine._stager.min_bytes = 0  # the tiny model's embeddings take the shared-memory ring too
    yield engine
    engine.shutdown()
    assert not engine.process.is_alive()


async def _wait_idle_process(engine: ProcessEngineClient, timeout_s: float = 10.0) -> calls.EngineStats:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await engine.call(calls.engine_stats)
        idle = stats.num_running == stats.num_waiting == stats.num_kv_blocks_used == 0
        if idle or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


def test_engine_process_serves_the_same_tokens_as_the_in_process_engine(llava, engine, process_engine):
    ckpt, ref_a, _ = llava
    text_only = _request([], prompt="USER: Hello! How are you today? ASSISTANT:", max_tokens=12, ignore_eos=True)
    image = _request([_full(ckpt, ref_a)])
    options = llm_service_pb2.OutputOptions(echo_prompt=True, top_log_probs=2)

    async def replies(stub) -> list:
        out = []
        for kwargs in (text_only, image):
            unary = await stub.Generate(
                llm_service_pb2.GenerateRequest(output_options=options, **kwargs), timeout=30
            )
            stream = await _stream_all(stub, llm_service_pb2.GenerateStreamRequest(**kwargs))
            out.append(
                (
                    list(unary.token_ids),
                    unary.text,
                    list(unary.prompt_token_ids),
                    [(lp.token.token_id, round(lp.token.log_prob, 4)) for lp in unary.log_probs],
                    [t for m in stream for t in m.token_ids],
                    "".join(m.text for m in stream),
                )
            )
        tokens = await stub.Tokenize(llm_service_pb2.TokenizeRequest(prompt=PROMPT, return_token_strings=True))
        out.append((list(tokens.token_ids), list(tokens.token_strings), tokens.num_image_placeholders))
        return out

    async def scenario():
        async with _serving(_config(ckpt), engine) as (_, stub, _):
            expected = await replies(stub)
        config = _config(ckpt, engine_process=True)
        async with _serving(config, process_engine, ready=False) as (server, stub, channel):
            assert await _health(channel) == NOT_SERVING
            await server.start_serving()  # the warm-up generation runs in the engine process
            assert await _health(channel) == SERVING
            got = await replies(stub)
            info = await stub.GetModelInfo(llm_service_pb2.LlmServiceGetModelInfoRequest())
            assert info.model_fingerprint == model_fingerprint(ckpt) and info.hidden_size == 64
        assert got == expected
        assert got[1][0] == ref_a.output_token_ids and got[1][4] == ref_a.output_token_ids
        assert len(got[0][0]) == 12 and got[0][1]
        # the image's embedding crossed through the frontend's ring once (every slot released), and
        # the second request sent it by content id: the engine process held it
        assert process_engine._stager.staged >= 1 and process_engine._stager.unread == 0
        assert process_engine._held.sent_by_id >= 1 and ref_a.embeddings[0].content_id in process_engine._held

    asyncio.run(scenario())


def test_engine_process_recovers_from_an_embedding_it_lost(llava, process_engine):
    """The frontend believes the engine process holds an embedding it does not (an add that should
    have kept it failed first): that request fails INTERNAL, the id is forgotten, the retry sends it
    whole and gets the reference tokens."""
    from llm_service.engine.held_embeddings import HeldTensor
    from llm_service.engine.sampling_params import SamplingParams

    _, _, ref_b = llava
    lost = dataclasses.replace(ref_b.embeddings[0], content_id="b3:" + "e" * 64)  # never sent before
    held = HeldTensor(content_id=lost.content_id, dtype=lost.features.dtype, shape=tuple(lost.features.shape))
    process_engine._held._held[lost.content_id] = dataclasses.replace(lost, features=held)

    async def tokens(request_id: str) -> list[int]:
        inp = GenerationInput(
            request_id, prompt=PROMPT, embeddings=(lost,), sampling=SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0)
        )
        return [t async for out in process_engine.generate(inp) for t in out.new_token_ids]

    async def scenario():
        with pytest.raises(InternalError, match="does not hold embedding"):
            await tokens("lost-1")
        assert await tokens("lost-2") == ref_b.output_token_ids
        assert lost.content_id in process_engine._held  # kept this time
        assert await tokens("lost-3") == ref_b.output_token_ids  # by id, from the engine's store

    asyncio.run(scenario())


def test_engine_process_bad_requests_and_cancelled_streams(llava, process_engine):
    ckpt, ref_a, _ = llava

    async def scenario():
        async with _serving(_config(ckpt, engine_process=True), process_engine) as (_, stub, _):
            # Refused by add_request in the engine process: the status crosses the pipe.
            for change, fragment in (
                ({"prompt": "USER: <image>\n" + "hello " * 600}, "at most 512"),
                ({"multimodal_inputs": [_full(ckpt, ref_a), _full(ckpt, ref_a)]}, "2 image and 0 video input"),
            ):
                await _expect_error(
                    stub.Generate(
                        llm_service_pb2.GenerateRequest(**{**_request([_full(ckpt, ref_a)]), **change}), timeout=10
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    fragment,
                )
            reply = await stub.Generate(llm_service_pb2.GenerateRequest(**_request([_by_id(ref_a)])), timeout=30)
            assert list(reply.token_ids) == ref_a.output_token_ids

            # A stream cancelled after two messages is aborted in the engine process, blocks freed.
            before = await process_engine.call(process_counters)
            assert before["torch_threads"] == 1
            call = stub.GenerateStream(
                llm_service_pb2.GenerateStreamRequest(
                    **_request([_by_id(ref_a)], max_tokens=400, ignore_eos=True)
                ),
                timeout=30,
            )
            await call.read()
            await call.read()
            call.cancel()
            stats = await _wait_idle_process(process_engine)
            assert stats.num_running == stats.num_waiting == stats.num_kv_blocks_used == 0
            after = await process_engine.call(process_counters)
            assert after["live_aborts"] == before["live_aborts"] + 1
            assert after["steps"] - before["steps"] < 200, "the request ran on instead of being aborted"
            with pytest.raises(InternalError, match="pickle"):  # closures do not cross the process boundary
                await process_engine.call(lambda core: core.has_unfinished_requests())
            with pytest.raises(InvalidArgumentError, match="exactly one"):  # raised in the engine process
                await process_engine.call(calls.tokenize_prompt, GenerationInput("no-prompt"))

    asyncio.run(scenario())


def test_a_dead_engine_process_fails_requests_with_unavailable(llava):
    ckpt, ref_a, _ = llava
    config = _config(ckpt, engine_process=True)
    engine = ProcessEngineClient(config.engine_config())

    async def scenario():
        async with _serving(config, engine) as (_, stub, channel):
            assert await _health(channel) == SERVING
            call = stub.GenerateStream(
                llm_service_pb2.GenerateStreamRequest(**_request([_full(ckpt, ref_a)], max_tokens=400, ignore_eos=True)),
                timeout=30,
            )
            await call.read()
            os.kill(engine.process.pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "engine process" in info.value.details()
            await _expect_error(
                stub.Generate(llm_service_pb2.GenerateRequest(**_request([_by_id(ref_a)])), timeout=10),
                grpc.StatusCode.UNAVAILABLE,
                "engine process",
            )
            await _expect_error(
                stub.Tokenize(llm_service_pb2.TokenizeRequest(prompt=PROMPT), timeout=10),
                grpc.StatusCode.UNAVAILABLE,
            )
            deadline = time.monotonic() + 5
            while await _health(channel) != NOT_SERVING and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert await _health(channel) == NOT_SERVING  # so that an orchestrator restarts the service

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown(timeout_s=5)
    assert not engine.process.is_alive() and engine.process.exitcode == -signal.SIGKILL
