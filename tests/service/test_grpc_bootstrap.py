"""The shared gRPC bootstrap over a real channel: reflection, health, error mapping, limits, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from vlm.v1 import encoder_service_pb2, encoder_service_pb2_grpc, llm_service_pb2, llm_service_pb2_grpc

from vlm_protocol.errors import (
    MISSING_CONTENT_IDS_METADATA_KEY,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnavailableError,
    VlmError,
    parse_missing_content_ids,
)
from vlm_protocol.grpc_server import (
    RunningServer,
    ServerConfig,
    ServiceRegistration,
    build_server,
    handle_rpc_errors,
    install_signal_handlers,
    start_server,
    status_for_exception,
)

LIMIT_BYTES = 1024 * 1024
SECRET = "secret-detail-/opt/weights/model.safetensors"
MISSING_ID = "b3:" + "ab" * 32
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 64 * LIMIT_BYTES),
    ("grpc.max_receive_message_length", 64 * LIMIT_BYTES),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeEncoder(encoder_service_pb2_grpc.EncoderServiceServicer):
    @handle_rpc_errors
    async def GetModelInfo(self, request, context):
        return encoder_service_pb2.EncoderServiceGetModelInfoResponse(model_id="fake-encoder")

    @handle_rpc_errors
    async def LookupEmbeddings(self, request, context):
        raise InvalidArgumentError("content_ids[0] is malformed; expected 'b3:' + 64 hex characters")

    @handle_rpc_errors
    async def Encode(self, request, context):
        raise NotFoundError(f"embedding {MISSING_ID} is not cached", [MISSING_ID])


class FakeLlm(llm_service_pb2_grpc.LlmServiceServicer):
    def __init__(self) -> None:
        self.stream_closed = asyncio.Event()

    @handle_rpc_errors
    async def GetModelInfo(self, request, context):
        raise RuntimeError(SECRET)

    @handle_rpc_errors
    async def Tokenize(self, request, context):
        # Echo twice the prompt, so a prompt over half the limit makes the *response* too large.
        return llm_service_pb2.TokenizeResponse(rendered_prompt=request.prompt * 2)

    @handle_rpc_errors
    async def Generate(self, request, context):
        await asyncio.sleep(float(request.prompt or 0))
        return llm_service_pb2.GenerateResponse(text="done")

    @handle_rpc_errors
    async def GenerateStream(self, request, context):
        try:
            yield llm_service_pb2.GenerateStreamResponse(text="first")
            if request.prompt == "fail":
                raise RuntimeError(SECRET)
            if request.prompt == "hang":
                await asyncio.sleep(3600)
            yield llm_service_pb2.GenerateStreamResponse(text="second")
        finally:
            self.stream_closed.set()


def _registrations(encoder: FakeEncoder, llm: FakeLlm) -> list[ServiceRegistration]:
    return [
        ServiceRegistration(
            encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server,
            encoder,
            encoder_service_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name,
        ),
        ServiceRegistration(
            llm_service_pb2_grpc.add_LlmServiceServicer_to_server,
            llm,
            llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name,
        ),
    ]


def _config(**overrides) -> ServerConfig:
    values = {"host": "127.0.0.1", "port": 0, "max_message_bytes": LIMIT_BYTES, "grace_period_s": 2.0}
    return ServerConfig(**{**values, **overrides})


@contextlib.asynccontextmanager
async def _serving(
    config: ServerConfig | None = None,
) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel, FakeLlm]]:
    llm = FakeLlm()
    running = await start_server(config or _config(), _registrations(FakeEncoder(), llm))
    channel = grpc.aio.insecure_channel(running.address, options=CLIENT_OPTIONS)
    try:
        yield running, channel, llm
    finally:
        await channel.close()
        await running.stop_now()


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return response.status


async def _reflect(channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]), timeout=5)]
    assert len(responses) == 1
    return responses[0]


def test_reflection_lists_our_services_health_and_reflection():
    async def scenario():
        async with _serving() as (running, channel, _):
            assert running.port > 0
            response = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
            names = {service.name for service in response.list_services_response.service}
            assert {"vlm.v1.EncoderService", "vlm.v1.LlmService", "grpc.health.v1.Health"} <= names
            assert "grpc.reflection.v1alpha.ServerReflection" in names
            # grpcurl also needs the descriptors behind the names.
            response = await _reflect(
                channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol="vlm.v1.LlmService")
            )
            assert response.file_descriptor_response.file_descriptor_proto

    asyncio.run(scenario())


def test_health_is_not_serving_until_set_serving():
    async def scenario():
        async with _serving() as (running, channel, _):
            for service in ("", "vlm.v1.EncoderService", "vlm.v1.LlmService"):
                assert await _health(channel, service) == NOT_SERVING
            await running.set_serving()
            for service in ("", "vlm.v1.EncoderService", "vlm.v1.LlmService"):
                assert await _health(channel, service) == SERVING
            await running.set_not_serving()
            assert await _health(channel) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _health(channel, "vlm.v1.NoSuchService")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_domain_errors_keep_code_and_message_and_bugs_do_not_leak(caplog):
    async def scenario():
        async with _serving() as (running, channel, _):
            await running.set_serving()
            encoder = encoder_service_pb2_grpc.EncoderServiceStub(channel)
            llm = llm_service_pb2_grpc.LlmServiceStub(channel)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await encoder.LookupEmbeddings(encoder_service_pb2.LookupEmbeddingsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "content_ids[0] is malformed; expected 'b3:' + 64 hex characters"

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await encoder.Encode(encoder_service_pb2.EncodeRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            trailing = dict(info.value.trailing_metadata())
            assert parse_missing_content_ids(trailing[MISSING_CONTENT_IDS_METADATA_KEY]) == (MISSING_ID,)

            with (
                caplog.at_level(logging.ERROR, logger="vlm_protocol.grpc_server"),
                pytest.raises(grpc.aio.AioRpcError) as info,
            ):
                await llm.GetModelInfo(
                    llm_service_pb2.LlmServiceGetModelInfoRequest(),
                    metadata=(("x-request-id", "req-42"),),
                    timeout=5,
                )
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert SECRET not in info.value.details() and "RuntimeError" not in info.value.details()
            assert "req-42" in info.value.details()
            logged = [record for record in caplog.records if "req-42" in record.getMessage()]
            assert logged and logged[0].exc_info and SECRET in str(logged[0].exc_info[1])

            # The server keeps serving after a bug.
            info_response = await encoder.GetModelInfo(
                encoder_service_pb2.EncoderServiceGetModelInfoRequest(), timeout=5
            )
            assert info_response.model_id == "fake-encoder"
            assert await _health(channel) == SERVING

    asyncio.run(scenario())


def test_streaming_errors_and_cancellation_close_the_handler():
    async def scenario():
        async with _serving() as (_, channel, llm):
            stub = llm_service_pb2_grpc.LlmServiceStub(channel)
            texts = [
                r.text async for r in stub.GenerateStream(llm_service_pb2.GenerateStreamRequest(prompt="ok"))
            ]
            assert texts == ["first", "second"]

            received = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in stub.GenerateStream(
                    llm_service_pb2.GenerateStreamRequest(prompt="fail")
                ):
                    received.append(response.text)
            assert received == ["first"]
            assert info.value.code() == grpc.StatusCode.INTERNAL and SECRET not in info.value.details()

            llm.stream_closed.clear()
            call = stub.GenerateStream(llm_service_pb2.GenerateStreamRequest(prompt="hang"))
            assert (await call.read()).text == "first"
            call.cancel()
            await asyncio.wait_for(llm.stream_closed.wait(), timeout=5)

    asyncio.run(scenario())


def test_messages_over_the_limit_are_rejected_both_ways():
    async def scenario():
        async with _serving() as (_, channel, _):
            stub = llm_service_pb2_grpc.LlmServiceStub(channel)
            small = "x" * (LIMIT_BYTES // 4)
            response = await stub.Tokenize(llm_service_pb2.TokenizeRequest(prompt=small), timeout=5)
            assert len(response.rendered_prompt) == 2 * len(small)

            # Request too large for the server (below gRPC's 4 MiB default, so the limit is ours). The
            # handler would answer INVALID_ARGUMENT if the request reached it.
            encoder = encoder_service_pb2_grpc.EncoderServiceStub(channel)
            too_big = encoder_service_pb2.LookupEmbeddingsRequest(content_ids=["x" * 1024] * 1100)
            assert LIMIT_BYTES < too_big.ByteSize() < 4 * LIMIT_BYTES
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await encoder.LookupEmbeddings(too_big, timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            with pytest.raises(grpc.aio.AioRpcError) as info:  # response too large to send
                await stub.Tokenize(
                    llm_service_pb2.TokenizeRequest(prompt="x" * (LIMIT_BYTES // 2 + 16)), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            response = await stub.Tokenize(llm_service_pb2.TokenizeRequest(prompt="ok"), timeout=5)
            assert response.rendered_prompt == "okok"

    asyncio.run(scenario())


def test_drain_reports_not_serving_finishes_in_flight_work_and_stops():
    async def scenario():
        async with _serving(_config(drain_delay_s=0.5, grace_period_s=3.0)) as (running, channel, _):
            await running.set_serving()
            stub = llm_service_pb2_grpc.LlmServiceStub(channel)
            in_flight = asyncio.ensure_future(
                stub.Generate(llm_service_pb2.GenerateRequest(prompt="0.8"), timeout=10)
            )
            await asyncio.sleep(0.1)

            drain = asyncio.ensure_future(running.drain())
            await asyncio.sleep(0.1)
            assert running.is_draining
            assert await _health(channel) == NOT_SERVING
            await running.set_serving()  # ignored once draining
            assert await _health(channel, "vlm.v1.LlmService") == NOT_SERVING

            await asyncio.wait_for(drain, timeout=10)
            assert (await in_flight).text == "done"
            await asyncio.wait_for(running.wait_for_termination(), timeout=1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _health(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_sigterm_drains_the_server():
    async def scenario():
        async with _serving(_config(grace_period_s=0.5)) as (running, channel, _):
            await running.set_serving()
            remove = install_signal_handlers(running)
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(running.wait_for_termination(), timeout=10)
            finally:
                remove()
            assert running.is_draining
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _health(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_port_already_in_use_is_an_error():
    async def scenario():
        async with _serving() as (running, _, _):
            with pytest.raises(OSError, match="could not bind"):
                build_server(_config(port=running.port), _registrations(FakeEncoder(), FakeLlm()))

    asyncio.run(scenario())


def test_unknown_or_duplicate_service_names_are_rejected():
    async def scenario():
        encoder, llm = FakeEncoder(), FakeLlm()
        registrations = _registrations(encoder, llm)
        bad_name = ServiceRegistration(registrations[0].add_servicer_fn, encoder, "EncoderService")
        with pytest.raises(InvalidArgumentError, match="full name"):
            build_server(_config(), [bad_name])
        with pytest.raises(InvalidArgumentError, match="duplicate"):
            build_server(_config(), [registrations[0], registrations[0]])

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": -1},
        {"port": 65536},
        {"host": ""},
        {"max_message_bytes": 0},
        {"max_message_bytes": 2**31},
        {"grace_period_s": -1.0},
        {"drain_delay_s": -0.1},
        {"max_concurrent_rpcs": 0},
    ],
)
def test_server_config_validation(overrides):
    field = next(iter(overrides))
    with pytest.raises(InvalidArgumentError, match=field):
        _config(**overrides)


def test_server_config_defaults():
    config = ServerConfig()
    assert config.max_message_bytes == 256 * 1024 * 1024 and config.port == 0
    assert ServerConfig(host="::1", port=50051).bind_address == "[::1]:50051"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgumentError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("gone", ["b3:" + "0" * 64]), grpc.StatusCode.NOT_FOUND),
        (ResourceExhaustedError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (PermissionDeniedError("private address"), grpc.StatusCode.PERMISSION_DENIED),
        (FailedPreconditionError("no video"), grpc.StatusCode.FAILED_PRECONDITION),
        (UnavailableError("warming up"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceededError("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RequestCancelledError("client went away"), grpc.StatusCode.CANCELLED),
        (InternalError("engine stopped"), grpc.StatusCode.INTERNAL),
        (VlmError("unclassified"), grpc.StatusCode.UNKNOWN),
    ],
)
def test_status_table_for_domain_errors(error, code):
    assert status_for_exception(error, request_id="r1") == (code, str(error))


def test_status_table_hides_unexpected_exceptions():
    for error in (RuntimeError(SECRET), KeyError(SECRET), ValueError(SECRET)):
        code, message = status_for_exception(error, request_id="r7")
        assert code == grpc.StatusCode.INTERNAL
        assert SECRET not in message and "r7" in message


def test_handle_rpc_errors_requires_async_methods():
    with pytest.raises(TypeError, match="async def"):
        handle_rpc_errors(lambda self, request, context: None)
