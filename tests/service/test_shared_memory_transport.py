"""The shared-memory embedding transport through real services: encoder (tiny LLaVA, real vision tower,
its /dev/shm ring) and LLM service over gRPC on 127.0.0.1, driven by the SDK.

Every LLM server records the requests it received (at `_resolve_embeddings`), so the tests assert on
what crossed gRPC: a shared-memory reference with no feature bytes, or the bytes after a fallback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vlm.v1 import common_pb2, llm_service_pb2

import client_sdk
from client_sdk.errors import FailedPreconditionError
from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer, load_engine
from encoder_service.server import build_server as build_encoder_server
from llm_service.config import LlmServiceConfig
from llm_service.engine.async_engine import AsyncLLMEngine
from llm_service.engine.engine_core import EngineCore
from llm_service.engine.engine_process import ProcessEngineClient
from llm_service.server import LlmServer
from llm_service.server import build_server as build_llm_server
from vlm_protocol import shared_memory as shm
from vlm_protocol.grpc_server import ServerConfig
from vlm_protocol.shared_memory import SharedMemoryReader

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shm.SHM_DIRECTORY.is_dir(), reason="no /dev/shm on this host"),
]

PROMPT = "USER: <image>\nWhat is shown in this picture? Please answer in detail. ASSISTANT:"
MAX_TOKENS = 8
MiB = 1024 * 1024


def _image(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(40 + seed % 7, 48, 3) * 255).astype(np.uint8))


class Llm:
    """One LLM server on the shared engine, recording the Generate(Stream) requests it received."""

    def __init__(self, server: LlmServer) -> None:
        self.server = server
        self.requests: list[llm_service_pb2.GenerateRequest | llm_service_pb2.GenerateStreamRequest] = []
        servicer = server.servicer
        original = servicer._resolve_embeddings

        async def recording(request, *args, **kwargs):
            copy = type(request)()
            copy.CopyFrom(request)
            self.requests.append(copy)
            return await original(request, *args, **kwargs)

        servicer._resolve_embeddings = recording

    @property
    def address(self) -> str:
        return self.server.address

    def embeddings(self, index: int) -> list[common_pb2.Embedding]:
        return [i.embedding for i in self.requests[index].multimodal_inputs if i.HasField("embedding")]


class Stack:
    """Both services in-process, served by one event loop in a background thread."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.visual = load_engine(EncoderConfig(model_dir=checkpoint))
        self.engine = AsyncLLMEngine(EngineCore(self._llm_config(True).engine_config()))
        self._servers: list[EncoderServer | LlmServer] = []
        self.encoder = self.start_encoder(shared_memory_bytes=32 * MiB)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def _llm_config(self, accept: bool) -> LlmServiceConfig:
        return LlmServiceConfig(
            model_dir=str(self.checkpoint),
            host="127.0.0.1",
            port=0,
            device="cpu",
            block_size=4,
            max_num_batched_tokens=256,
            grace_period_s=1.0,
            accept_shared_memory=accept,
            # the servers share one engine: no KV prefix reuse across them, so that a bytes run
            # computes from the bytes it was sent, not from KV a shared-memory run left behind
            enable_prefix_caching=False,
        )

    def start_encoder(self, **overrides) -> EncoderServer:
        async def start() -> EncoderServer:
            config = EncoderConfig(
                model_dir=self.checkpoint, server=ServerConfig(host="127.0.0.1", port=0), **overrides
            )
            server = build_encoder_server(config, self.visual)
            await server.start()
            return server

        server = self.run(start())
        self._servers.append(server)
        return server

    def start_llm(self, *, accept: bool = True) -> Llm:
        async def start() -> LlmServer:
            server = build_llm_server(self._llm_config(accept), self.engine)
            await server.start()
            await server.start_serving(warmup=False)
            return server

        server = self.run(start())
        self._servers.append(server)
        return Llm(server)

    def client(self, llm: Llm, transport: str, encoder: EncoderServer | None = None) -> client_sdk.Client:
        encoder = encoder or self.encoder
        return client_sdk.Client(encoder.address, llm.address, timeout_s=120, embedding_transport=transport)

    def close(self) -> None:
        async def stop() -> None:
            for server in reversed(self._servers):
                await server.stop_now()

        self.run(stop())
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def stack(tiny_checkpoint) -> Iterator[Stack]:
    s = Stack(tiny_checkpoint("llava"))
    yield s
    s.close()


def _generate(client: client_sdk.Client, image: Image.Image, *, stream: bool = False):
    if stream:
        deltas = list(
            client.generate(PROMPT, images=[image], stream=True, max_tokens=MAX_TOKENS, temperature=0.0)
        )
        return client_sdk.join_deltas(deltas)
    return client.generate(PROMPT, images=[image], max_tokens=MAX_TOKENS, temperature=0.0)


def _only_references(embeddings: list[common_pb2.Embedding], region: str) -> bool:
    return bool(embeddings) and all(
        e.features.HasField("shared_memory")
        and e.features.data == b""
        and e.features.shared_memory.region == region
        for e in embeddings
    )


def _only_bytes(embeddings: list[common_pb2.Embedding]) -> bool:
    return bool(embeddings) and all(
        e.features.data and not e.features.HasField("shared_memory") for e in embeddings
    )


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_shared_memory_gives_the_tokens_of_bytes_and_sends_no_feature_bytes(stack, stream):
    image = _image(1 if stream else 2)
    region = stack.encoder.shared_memory.name
    for transport in ("shared_memory", "auto"):
        llm = stack.start_llm()
        with stack.client(llm, transport) as client:
            # auto: both addresses are loopback, the encoder offers shared memory, the LLM service accepts
            shared = _generate(client, _image(100 + stream) if transport == "auto" else image, stream=stream)
        assert len(llm.requests) == 1, "one Generate call, no resend"
        assert _only_references(llm.embeddings(0), region)
        assert llm.requests[0].ByteSize() < 4096  # the 576-row embedding did not cross gRPC
        assert shared.tensors_uploaded == 1 and len(shared.token_ids) == MAX_TOKENS
        if transport == "shared_memory":
            reference = shared

    # the same image through bytes, against a fresh LLM service (the encoder now has it cached: the
    # SDK sends its id, gets NOT_FOUND and uploads the bytes it fetched from the encoder)
    llm = stack.start_llm()
    with stack.client(llm, "bytes") as client:
        plain = _generate(client, image, stream=stream)
    assert _only_bytes(llm.embeddings(-1))
    assert plain.token_ids == reference.token_ids
    assert plain.text == reference.text


def test_shared_memory_skips_the_lookup_and_sends_encoder_hits_whole(stack):
    """With shared memory an Encode hit is as cheap as a look-up: the SDK calls Encode straight away, and
    an embedding the encoder already held goes whole (a reference) in the first LLM request, not by id
    (which a fresh LLM service would answer with NOT_FOUND)."""
    image = _image(50)  # an image no other test of this module encodes
    region = stack.encoder.shared_memory.name
    methods: list[str] = []
    for round_ in range(2):
        llm = stack.start_llm()  # a fresh LLM service each time: it never holds the embedding
        with stack.client(llm, "shared_memory") as client:
            def counting(which, method, *args, _call=client._call, **kwargs):
                methods.append(method)
                return _call(which, method, *args, **kwargs)

            client._call = counting
            result = _generate(client, image)
        assert "LookupEmbeddings" not in methods
        assert len(llm.requests) == 1, "no NOT_FOUND resend"
        assert _only_references(llm.embeddings(0), region)
        assert result.tensors_uploaded == 1
        assert result.encoder_cache_hits == round_  # the second round is an encoder-cache hit
        methods.clear()


def test_llm_refusing_shared_memory(stack):
    llm = stack.start_llm(accept=False)
    with stack.client(llm, "shared_memory") as client, pytest.raises(FailedPreconditionError) as info:
        _generate(client, _image(3))
    assert info.value.shared_memory_region == stack.encoder.shared_memory.name
    assert "does not accept shared-memory tensors" in info.value.details
    assert len(llm.requests) == 1  # refused, not resent: the caller asked for shared memory explicitly

    # auto: the LLM service says it does not accept shared memory, so the client never tries it
    llm = stack.start_llm(accept=False)
    with stack.client(llm, "auto") as client:
        first = _generate(client, _image(4))
        second = _generate(client, _image(5))
        assert not client._transport.disabled
    assert len(first.token_ids) == len(second.token_ids) == MAX_TOKENS
    assert [_only_bytes(llm.embeddings(i)) for i in range(len(llm.requests))] == [True, True]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_auto_falls_back_to_bytes_when_the_region_is_not_visible(stack, tmp_path, caplog, stream):
    # An LLM service that accepts shared memory but cannot see the encoder's /dev/shm (other containers)
    llm = stack.start_llm()
    llm.server.servicer.shared_memory = SharedMemoryReader(directory=tmp_path)
    image = _image(10 + stream)
    with caplog.at_level(logging.WARNING, logger="client_sdk"), stack.client(llm, "auto") as client:
        result = _generate(client, image, stream=stream)
        assert client._transport.disabled
        again = _generate(client, _image(20 + stream), stream=stream)
    assert len(result.token_ids) == len(again.token_ids) == MAX_TOKENS
    assert _only_references(llm.embeddings(0), stack.encoder.shared_memory.name)  # refused ...
    assert _only_bytes(llm.embeddings(1))  # ... resent as bytes at once
    assert _only_bytes(llm.embeddings(2))  # and bytes from then on, without trying again
    assert len(llm.requests) == 3
    warnings = [r for r in caplog.records if "shared-memory embedding transport refused" in r.getMessage()]
    assert len(warnings) == 1

    reference_llm = stack.start_llm()
    with stack.client(reference_llm, "bytes") as client:
        assert _generate(client, image, stream=stream).token_ids == result.token_ids


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_reused_slot_is_resent_as_bytes(stack, stream):
    llm = stack.start_llm()
    ring = stack.encoder.shared_memory
    image = _image(30 + stream)
    with stack.client(llm, "shared_memory") as client:
        encode = client._encode
        scribbled = []

        def encode_then_reuse_the_ring(plan, *args, **kwargs):
            encode(plan, *args, **kwargs)
            if not scribbled:  # the encoder serves others before this client reaches the LLM service
                scribbled.append(ring.put(b"\0" * ring.max_item_bytes))

        client._encode = encode_then_reuse_the_ring
        result = _generate(client, image, stream=stream)
        assert scribbled
        # the client keeps using shared memory afterwards: a reused slot is not a refusal
        client._encode = encode
        again = _generate(client, _image(40 + stream), stream=stream)
    assert len(llm.requests) == 3
    assert _only_references(llm.embeddings(0), ring.name)  # stale by the time the LLM service read it
    assert _only_bytes(llm.embeddings(1))  # the resend carried bytes
    assert _only_references(llm.embeddings(2), ring.name)
    assert result.tensors_uploaded == 2 and len(again.token_ids) == MAX_TOKENS

    reference_llm = stack.start_llm()
    with stack.client(reference_llm, "bytes") as client:
        assert _generate(client, image, stream=stream).token_ids == result.token_ids


def test_encoder_without_shared_memory(stack):
    encoder = stack.start_encoder()  # no --shared-memory-mb
    llm = stack.start_llm()
    client = stack.client(llm, "shared_memory", encoder)
    with client, pytest.raises(FailedPreconditionError, match="--shared-memory-mb"):
        _generate(client, _image(50))
    assert llm.requests == []
    with stack.client(llm, "auto", encoder) as client:  # auto: the encoder does not offer it: bytes
        result = _generate(client, _image(51))
    assert len(result.token_ids) == MAX_TOKENS and _only_bytes(llm.embeddings(0))

    # auto with a stale view of the encoder (it offered shared memory when asked, then restarted
    # without): its refusal switches the client to bytes and the Encode is repeated at once
    with stack.client(llm, "auto", encoder) as client:
        info = type(client.encoder_info())()
        info.CopyFrom(client.encoder_info())
        info.shared_memory_available = True
        client._encoder_info = info
        result = _generate(client, _image(52))
        assert client._transport.disabled
    assert len(result.token_ids) == MAX_TOKENS and _only_bytes(llm.embeddings(1))


def test_model_info_advertises_the_transport(stack):
    accepting, refusing = stack.start_llm(), stack.start_llm(accept=False)
    with stack.client(accepting, "auto") as client:
        assert client.encoder_info().shared_memory_available
        assert client.llm_info().accepts_shared_memory
    with stack.client(refusing, "auto") as client:
        assert not client.llm_info().accepts_shared_memory


def test_async_client_shared_memory_and_stale_resend(stack):
    ring = stack.encoder.shared_memory
    llm = stack.start_llm()
    images = [_image(60), _image(61)]

    async def main():
        async with client_sdk.AsyncClient(
            stack.encoder.address, llm.address, timeout_s=120, embedding_transport="shared_memory"
        ) as client:
            plain = await client.generate(PROMPT, images=[images[0]], max_tokens=MAX_TOKENS, temperature=0.0)
            encode = client._encode

            async def encode_then_reuse_the_ring(plan, *args, **kwargs):
                await encode(plan, *args, **kwargs)
                ring.put(b"\0" * ring.max_item_bytes)

            client._encode = encode_then_reuse_the_ring
            deltas = [
                d
                async for d in client.generate(
                    PROMPT, images=[images[1]], stream=True, max_tokens=MAX_TOKENS, temperature=0.0
                )
            ]
            return plain, client_sdk.join_deltas(deltas)

    first, stale = asyncio.run(main())
    assert len(llm.requests) == 3
    assert _only_references(llm.embeddings(0), ring.name)
    assert _only_references(llm.embeddings(1), ring.name) and _only_bytes(llm.embeddings(2))
    reference_llm = stack.start_llm()
    with stack.client(reference_llm, "bytes") as client:
        assert _generate(client, images[0]).token_ids == first.token_ids
        assert _generate(client, images[1]).token_ids == stale.token_ids


@pytest.fixture(scope="module")
def process_llm(stack) -> Iterator[Llm]:
    """An LLM service whose engine runs in its own process (--engine-process), on the stack's encoder."""
    config = dataclasses.replace(stack._llm_config(True), engine_process=True)
    engine = ProcessEngineClient(config.engine_config())

    async def start() -> LlmServer:
        server = build_llm_server(config, engine)
        await server.start()
        await server.start_serving(warmup=False)
        return server

    server = stack.run(start())
    yield Llm(server)
    stack.run(server.stop_now())
    engine.shutdown()


def test_engine_process_reads_the_encoders_slot_itself(stack, process_llm):
    """The service forwards the encoder's shared-memory reference to the engine process, which reads
    it (the service reads nothing, its own ring stays unused); a repeat goes by id from the engine's
    store; a slot reused before the engine read it is resent as bytes. Prefix caching is off, so
    every answer was computed from the features that arrived."""
    engine = process_llm.server.engine
    ring = stack.encoder.shared_memory
    images = [_image(70), _image(71)]
    reference_llm = stack.start_llm()
    with stack.client(reference_llm, "bytes") as client:
        expected = [_generate(client, image).token_ids for image in images]

    with stack.client(process_llm, "shared_memory") as client:
        first = _generate(client, images[0])
        assert len(process_llm.requests) == 1 and _only_references(process_llm.embeddings(0), ring.name)
        assert process_llm.server.servicer.shared_memory.open_regions == ()  # not read by the service
        assert engine._stager.staged == 0 and engine.held_embedding(first.content_ids[0]) is not None
        again = _generate(client, images[0], stream=True)  # by id: the engine process holds it
        # echo_prompt tokenizes in the engine process before the add, from the metadata alone
        echoed = client.generate(PROMPT, images=[images[0]], max_tokens=2, temperature=0.0, echo_prompt=True)
        assert echoed.prompt_token_ids and len(echoed.token_ids) == 2

        encode = client._encode

        def encode_then_reuse_the_ring(plan, *args, **kwargs):
            encode(plan, *args, **kwargs)
            ring.put(b"\0" * ring.max_item_bytes)

        client._encode = encode_then_reuse_the_ring
        stale = _generate(client, images[1])
    assert first.token_ids == again.token_ids == expected[0]
    assert engine._held.sent_by_id >= 1
    assert stale.token_ids == expected[1] and stale.tensors_uploaded == 2
    assert _only_references(process_llm.embeddings(-2), ring.name) and _only_bytes(process_llm.embeddings(-1))


def test_llm_flag():
    from llm_service.__main__ import build_parser, config_from_args

    def parse(*flags: str) -> LlmServiceConfig:
        return config_from_args(build_parser().parse_args(["--model", "/m", *flags]))

    assert parse().accept_shared_memory
    assert not parse("--no-accept-shared-memory").accept_shared_memory
    assert parse("--accept-shared-memory").accept_shared_memory
