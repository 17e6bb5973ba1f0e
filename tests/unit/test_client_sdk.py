"""The client SDK against small in-process fake servers (grpc.aio, real wire, no model).

The fakes implement the generated servicer base classes and raise the domain errors the real
services raise (through vlm_protocol's error table, so NOT_FOUND carries the missing-ids trailer).
The encoder fake computes content ids from what it receives with the shared functions, so the SDK's
locally computed ids are checked against a server-side computation.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image
from vlm.v1 import (
    common_pb2,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    llm_service_pb2,
    llm_service_pb2_grpc,
)

import client_sdk
from client_sdk import cli
from client_sdk.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    VlmClientError,
)
from client_sdk.held_ids import HeldIds
from client_sdk.media import prepare_image
from client_sdk.media_plan import MediaPlan
from vlm_protocol import errors as protocol_errors
from vlm_protocol.grpc_server import handle_rpc_errors
from vlm_protocol.media_ids import (
    IMAGE_BYTES,
    IMAGE_PIXELS,
    VIDEO_BYTES,
    VIDEO_FRAMES,
    PreprocessingIdentity,
    array_media_id,
    encoded_media_id,
)
from vlm_protocol.tensor_codec import decode_numpy, encode_numpy

IDENTITY = PreprocessingIdentity("llava", "b3:" + "f" * 64, "b3:" + "p" * 64)
DEFAULT_NUM_FRAMES = 4
HIDDEN = 8
ROWS = 3


def _png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    rng = np.random.RandomState(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- fake services ---------------------------------------------------------------------------------


class FakeEncoder(encoder_service_pb2_grpc.EncoderServiceServicer):
    def __init__(self) -> None:
        self.cache: dict[str, common_pb2.Embedding] = {}
        self.calls: list[tuple[str, object]] = []
        self.urls: dict[str, bytes] = {}
        self.drop_on_fetch = False  # LookupEmbeddings(return_embeddings) returns nothing ("evicted")
        self.identity = IDENTITY  # what it computes ids with (a restart with another model changes it)

    def methods(self) -> list[str]:
        return [name for name, _ in self.calls]

    def _content_id(self, item: common_pb2.MediaItem) -> str:
        if item.HasField("image"):
            source = item.image.WhichOneof("source")
            if source == "data":
                return encoded_media_id(IMAGE_BYTES, item.image.data, self.identity)
            if source == "url":
                if item.image.url not in self.urls:
                    raise protocol_errors.PermissionDeniedError(f"fetching {item.image.url} is refused")
                return encoded_media_id(IMAGE_BYTES, self.urls[item.image.url], self.identity)
            return array_media_id(IMAGE_PIXELS, decode_numpy(item.image.pixels_hwc_uint8), self.identity)
        video = item.video
        if video.WhichOneof("source") == "frames":
            frames = decode_numpy(video.frames)
            return array_media_id(
                VIDEO_FRAMES, frames, self.identity, num_frames=video.num_frames or frames.shape[0]
            )
        data = self.urls[video.url] if video.WhichOneof("source") == "url" else video.data
        return encoded_media_id(
            VIDEO_BYTES, data, self.identity, num_frames=video.num_frames or DEFAULT_NUM_FRAMES
        )

    @handle_rpc_errors
    async def Encode(self, request, context):
        self.calls.append(("Encode", request))
        results = []
        for item in request.items:
            if item.content_id:
                raise protocol_errors.InvalidArgumentError("this fake does not expect client content ids")
            cid = self._content_id(item)
            cached = cid in self.cache
            if not cached:
                features = np.frombuffer(bytes.fromhex(cid[3:]), dtype=np.uint8)[: ROWS * HIDDEN].astype(
                    np.float32
                )
                self.cache[cid] = common_pb2.Embedding(
                    content_id=cid,
                    kind=common_pb2.EMBEDDING_KIND_PROMPT_TABLE,
                    features=encode_numpy(features.reshape(ROWS, HIDDEN)),
                    model_family=common_pb2.MODEL_FAMILY_LLAVA,
                    num_rows=ROWS,
                    num_prompt_tokens=ROWS,
                )
            results.append(encoder_service_pb2.EncodeResult(embedding=self.cache[cid], cached=cached))
        return encoder_service_pb2.EncodeResponse(request_id=request.request_id, results=results)

    @handle_rpc_errors
    async def LookupEmbeddings(self, request, context):
        self.calls.append(("LookupEmbeddings", request))
        found = [cid for cid in request.content_ids if cid in self.cache]
        response = encoder_service_pb2.LookupEmbeddingsResponse(
            found_content_ids=found,
            missing_content_ids=[c for c in request.content_ids if c not in self.cache],
        )
        if request.return_embeddings and not self.drop_on_fetch:
            response.embeddings.extend(self.cache[cid] for cid in found)
        return response

    @handle_rpc_errors
    async def GetModelInfo(self, request, context):
        self.calls.append(("GetModelInfo", request))
        return encoder_service_pb2.EncoderServiceGetModelInfoResponse(
            model_family=common_pb2.MODEL_FAMILY_LLAVA,
            model_fingerprint=self.identity.model_fingerprint,
            processor_config_hash=self.identity.processor_config_hash,
            default_num_frames=DEFAULT_NUM_FRAMES,
            llm_hidden_size=HIDDEN,
        )


class FakeLlm(llm_service_pb2_grpc.LlmServiceServicer):
    """Generates token i = (len(prompt) + i) % 100 with text "w<i> "; counts repeated prompts as cached."""

    def __init__(self) -> None:
        self.held: dict[str, common_pb2.Embedding] = {}
        self.calls: list[tuple[str, object]] = []
        self.seen_prompts: set[str] = set()
        self.always_missing = False
        self.delay_s = 0.0
        self.token_delay_s = 0.0
        self.fail_with: protocol_errors.VlmError | None = None
        self.fail_mid_stream: protocol_errors.VlmError | None = None  # raised after the first message
        self.stream_cancelled = threading.Event()

    def methods(self) -> list[str]:
        return [name for name, _ in self.calls]

    def _admit(self, request) -> int:
        if self.fail_with is not None:
            raise self.fail_with
        if self.always_missing and request.multimodal_inputs:
            ids = [i.content_id or i.embedding.content_id for i in request.multimodal_inputs]
            raise protocol_errors.NotFoundError("unknown content ids", ids)
        missing = []
        for item in request.multimodal_inputs:
            source = item.WhichOneof("source")
            if source == "embedding":
                self.held[item.embedding.content_id] = item.embedding
            elif source == "content_id" and item.content_id not in self.held:
                missing.append(item.content_id)
            elif source == "media":
                raise protocol_errors.FailedPreconditionError("raw media need --encoder-address")
        if missing:
            raise protocol_errors.NotFoundError("unknown content ids; resend the embeddings", missing)
        return len(request.multimodal_inputs)

    def _tokens(self, request) -> list[int]:
        count = request.sampling.max_tokens or 4
        return [(len(request.prompt) + i) % 100 for i in range(count)]

    def _usage(self, request, num_media: int, completion: int) -> llm_service_pb2.Usage:
        key = (
            request.prompt
            + "|"
            + ",".join(i.content_id or i.embedding.content_id for i in request.multimodal_inputs)
        )
        prompt_tokens = len(request.prompt.split()) + num_media * ROWS
        cached = prompt_tokens - 1 if key in self.seen_prompts else 0
        self.seen_prompts.add(key)
        return llm_service_pb2.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion, cached_prompt_tokens=cached
        )

    @handle_rpc_errors
    async def Generate(self, request, context):
        self.calls.append(("Generate", request))
        num_media = self._admit(request)
        await asyncio.sleep(self.delay_s)
        tokens = self._tokens(request)
        response = llm_service_pb2.GenerateResponse(
            request_id=request.request_id,
            text="".join(f"w{t} " for t in tokens),
            token_ids=tokens,
            finish_reason=llm_service_pb2.FINISH_REASON_LENGTH,
            usage=self._usage(request, num_media, len(tokens)),
            timings=llm_service_pb2.GenerateTimings(
                time_to_first_token_ms=1.5, total_ms=3.0, tokenize_ms=0.25, inputs_ms=0.5
            ),
        )
        if request.output_options.log_probs:
            for pos, t in enumerate(tokens):
                response.log_probs.add(
                    position=pos, token=llm_service_pb2.TokenLogProb(token_id=t, token=f"w{t}")
                )
        return response

    @handle_rpc_errors
    async def GenerateStream(self, request, context):
        self.calls.append(("GenerateStream", request))
        num_media = self._admit(request)
        await asyncio.sleep(self.delay_s)
        tokens = self._tokens(request)
        try:
            for i, t in enumerate(tokens):
                await asyncio.sleep(self.token_delay_s)
                last = i == len(tokens) - 1
                message = llm_service_pb2.GenerateStreamResponse(
                    request_id=request.request_id, text=f"w{t} ", token_ids=[t]
                )
                if last:
                    message.finish_reason = llm_service_pb2.FINISH_REASON_LENGTH
                    message.usage.CopyFrom(self._usage(request, num_media, len(tokens)))
                    message.timings.time_to_first_token_ms = 1.5
                yield message
                if self.fail_mid_stream is not None:
                    raise self.fail_mid_stream
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    @handle_rpc_errors
    async def GetModelInfo(self, request, context):
        self.calls.append(("GetModelInfo", request))
        return llm_service_pb2.LlmServiceGetModelInfoResponse(image_placeholder="<image>")


class Servers:
    """Both fakes on loopback ports, served by a grpc.aio loop in a background thread."""

    def __init__(self) -> None:
        self.encoder, self.llm = FakeEncoder(), FakeLlm()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._servers, ports = self._run(self._start())
        self.encoder_address, self.llm_address = (f"127.0.0.1:{p}" for p in ports)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _start(self):
        servers, ports = [], []
        for servicer, add in (
            (self.encoder, encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server),
            (self.llm, llm_service_pb2_grpc.add_LlmServiceServicer_to_server),
        ):
            server = grpc.aio.server()
            add(servicer, server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            servers.append(server)
        return servers, ports

    def reset(self) -> None:
        self.encoder.__init__()
        self.llm.__init__()

    def client(self, **kwargs) -> client_sdk.Client:
        return client_sdk.Client(self.encoder_address, self.llm_address, **kwargs)

    def close(self) -> None:
        async def stop():
            for server in self._servers:
                await server.stop(None)

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def module_servers() -> Iterator[Servers]:
    servers = Servers()
    yield servers
    servers.close()


@pytest.fixture
def servers(module_servers: Servers) -> Servers:
    module_servers.reset()
    return module_servers


@pytest.fixture
def client(servers: Servers) -> Iterator[client_sdk.Client]:
    with servers.client(timeout_s=10) as c:
        yield c


@pytest.fixture
def encoder_first_client(servers: Servers) -> Iterator[client_sdk.Client]:
    """No LLM-first shortcut: every call with media asks the encoder first, as the ids-first flow does."""
    with servers.client(timeout_s=10, held_ids_capacity=0) as c:
        yield c


PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


# --- ids-first flow --------------------------------------------------------------------------------


def test_text_only_never_touches_the_encoder(servers, client):
    result = client.generate("Tell me a story.", max_tokens=3)
    assert result.token_ids == tuple((len("Tell me a story.") + i) % 100 for i in range(3))
    assert result.text == "".join(f"w{t} " for t in result.token_ids)
    assert result.finish_reason == "length"
    assert servers.encoder.calls == []
    assert result.encoder_cache_hits == 0 and result.tensors_uploaded == 0 and result.timings.encode_ms == 0.0
    assert (result.timings.server_tokenize_ms, result.timings.server_inputs_ms) == (0.25, 0.5)
    [(_, request)] = servers.llm.calls
    assert not request.multimodal_inputs and request.prompt == "Tell me a story."


def test_first_request_encodes_and_sends_the_fresh_tensor_at_once(servers, client):
    image = _png(1)
    result = client.generate(PROMPT, images=[image], max_tokens=2)
    expected_id = encoded_media_id(IMAGE_BYTES, image, IDENTITY)
    assert servers.encoder.methods() == ["GetModelInfo", "LookupEmbeddings", "Encode"]
    assert servers.encoder.calls[1][1].content_ids == [expected_id]
    # the encoder has just computed it, so no LLM service holds it: no ids-only attempt, no NOT_FOUND
    [(method, request)] = servers.llm.calls
    assert method == "Generate"
    assert [i.WhichOneof("source") for i in request.multimodal_inputs] == ["embedding"]
    sent = request.multimodal_inputs[0].embedding
    assert sent == servers.encoder.cache[expected_id]
    assert request.request_id != ""
    assert result.content_ids == (expected_id,)
    assert result.tensors_uploaded == 1 and result.encoder_cache_hits == 0
    assert result.timings.encode_ms > 0 and result.timings.total_ms >= result.timings.encode_ms


def test_tensor_the_encoder_had_cached_goes_ids_first(servers, client):
    image = _png(21)
    with servers.client(timeout_s=10) as other:  # another client had it encoded (and sent to the LLM)
        other.generate(PROMPT, images=[image], max_tokens=1)
    servers.llm.held.clear()  # ... to an LLM replica that no longer holds it
    servers.llm.calls.clear()
    result = client.generate(PROMPT, images=[image], max_tokens=2)
    first, second = (request for _, request in servers.llm.calls)
    assert [i.WhichOneof("source") for i in first.multimodal_inputs] == ["content_id"]
    assert [i.WhichOneof("source") for i in second.multimodal_inputs] == ["embedding"]
    assert first.request_id == second.request_id != ""
    assert result.tensors_uploaded == 1 and result.encoder_cache_hits == 1


def test_url_the_encoder_reports_cached_goes_ids_first(servers, client):
    servers.encoder.urls["https://example.com/cat.png"] = _png(22)
    client.generate(PROMPT, images=["https://example.com/cat.png"], max_tokens=1)
    servers.llm.calls.clear()
    result = client.generate(PROMPT, images=["https://example.com/cat.png"], max_tokens=1)
    [(_, request)] = servers.llm.calls  # Encode said cached=True: the LLM got it the first time
    assert [i.WhichOneof("source") for i in request.multimodal_inputs] == ["content_id"]
    assert result.tensors_uploaded == 0 and result.encoder_cache_hits == 1


def test_identical_second_request_sends_no_tensor_and_hits_the_encoder_cache(servers, encoder_first_client):
    client, image = encoder_first_client, _png(2)
    client.generate(PROMPT, images=[image], max_tokens=2)
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    result = client.generate(PROMPT, images=[image], max_tokens=2)
    assert servers.encoder.methods() == ["LookupEmbeddings"]  # model info cached, no Encode
    assert servers.llm.methods() == ["Generate"]
    assert result.encoder_cache_hits == 1 and result.tensors_uploaded == 0 and not result.encoder_skipped
    assert result.usage.cached_prompt_tokens > 0


def test_llm_that_lost_the_embedding_gets_it_from_the_encoder_cache(servers, encoder_first_client):
    client, image = encoder_first_client, _png(3)
    client.generate(PROMPT, images=[image], max_tokens=2)
    servers.llm.held.clear()  # e.g. the LLM service restarted
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    result = client.generate(PROMPT, images=[image], max_tokens=2)
    assert servers.encoder.methods() == ["LookupEmbeddings", "LookupEmbeddings"]
    fetch = servers.encoder.calls[1][1]
    assert fetch.return_embeddings and list(fetch.content_ids) == list(result.content_ids)
    assert servers.llm.methods() == ["Generate", "Generate"]
    assert result.tensors_uploaded == 1 and result.encoder_cache_hits == 1


def test_embedding_evicted_from_both_is_encoded_again(servers, encoder_first_client):
    client, image = encoder_first_client, _png(4)
    client.generate(PROMPT, images=[image], max_tokens=2)
    servers.llm.held.clear()
    servers.encoder.drop_on_fetch = True
    servers.encoder.calls.clear()
    result = client.generate(PROMPT, images=[image], max_tokens=2)
    assert servers.encoder.methods() == ["LookupEmbeddings", "LookupEmbeddings", "Encode"]
    assert result.tensors_uploaded == 1


def test_not_found_twice_raises_after_exactly_one_resend(servers, client):
    servers.llm.always_missing = True
    with pytest.raises(NotFoundError) as info:
        client.generate(PROMPT, images=[_png(5)], max_tokens=2)
    assert servers.llm.methods() == ["Generate", "Generate"]
    assert info.value.content_ids == (encoded_media_id(IMAGE_BYTES, _png(5), IDENTITY),)
    assert isinstance(info.value, protocol_errors.NotFoundError)


def test_only_the_missing_ids_are_resent_with_the_fresh_ones(servers, client):
    known, lost, new = _png(6), _png(7), _png(23)
    client.generate("USER: <image> <image>\nCompare. ASSISTANT:", images=[known, lost], max_tokens=1)
    lost_id = encoded_media_id(IMAGE_BYTES, lost, IDENTITY)
    del servers.llm.held[lost_id]
    servers.llm.calls.clear()
    servers.encoder.calls.clear()
    prompt = "USER: <image> <image> <image> <image>\nCompare. ASSISTANT:"
    result = client.generate(prompt, images=[known, lost, new, new], max_tokens=1)
    first, resend = (request for _, request in servers.llm.calls)
    sources = [[i.WhichOneof("source") for i in r.multimodal_inputs] for r in (first, resend)]
    assert sources[0] == ["content_id", "content_id", "embedding", "content_id"]
    # the fresh embedding goes again: the replica that answered NOT_FOUND may not have kept it
    assert sources[1] == ["content_id", "embedding", "embedding", "content_id"]
    assert resend.multimodal_inputs[1].embedding.content_id == lost_id
    assert result.tensors_uploaded == 3
    assert len(set(result.content_ids)) == 3 and result.content_ids[2] == result.content_ids[3]
    [encode] = [r for name, r in servers.encoder.calls if name == "Encode"]
    assert len(encode.items) == 1  # the duplicate image is encoded once


def test_every_image_form_gets_the_servers_content_id(servers, encoder_first_client, tmp_path):
    client, png = encoder_first_client, _png(8)  # the second call asks the encoder
    path = tmp_path / "x.png"
    path.write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    forms = [png, str(path), path, data_uri, Image.open(io.BytesIO(png)), pixels, pixels[:, :, 0]]
    prompt = "USER:" + " <image>" * len(forms) + " ASSISTANT:"
    result = client.generate(prompt, images=forms, max_tokens=1)
    byte_id = encoded_media_id(IMAGE_BYTES, png, IDENTITY)
    assert result.content_ids[:4] == (byte_id,) * 4
    assert result.content_ids[5] == array_media_id(IMAGE_PIXELS, pixels, IDENTITY)
    gray = np.repeat(pixels[:, :, :1], 3, axis=2)
    assert result.content_ids[6] == array_media_id(IMAGE_PIXELS, gray, IDENTITY)
    # a second call finds every locally computed id in the encoder cache: no Encode
    servers.encoder.calls.clear()
    client.generate(prompt, images=forms, max_tokens=1)
    assert servers.encoder.methods() == ["LookupEmbeddings"]


def test_urls_are_sent_to_the_encoder_to_fetch(servers, client):
    servers.encoder.urls["https://example.com/a.png"] = _png(9)
    result = client.generate(PROMPT, images="https://example.com/a.png", max_tokens=1)
    assert servers.encoder.methods() == ["GetModelInfo", "Encode"]  # no local id -> no look-up
    assert servers.encoder.calls[1][1].items[0].image.url == "https://example.com/a.png"
    assert result.content_ids == (encoded_media_id(IMAGE_BYTES, _png(9), IDENTITY),)
    with pytest.raises(PermissionDeniedError, match="refused"):
        client.generate(PROMPT, images=["https://10.0.0.1/x.png"], max_tokens=1)


def test_video_frames_and_bytes(servers, client):
    frames = np.random.RandomState(0).randint(0, 255, (6, 8, 10, 3), dtype=np.uint8)
    result = client.generate("<video> what happens?", video=frames, num_frames=3, max_tokens=1)
    [encode] = [r for name, r in servers.encoder.calls if name == "Encode"]
    assert encode.items[0].video.num_frames == 3
    assert result.content_ids == (array_media_id(VIDEO_FRAMES, frames, IDENTITY, num_frames=3),)
    result = client.generate("<video> what happens?", video=b"fake mp4 bytes", max_tokens=1)
    assert result.content_ids == (
        encoded_media_id(VIDEO_BYTES, b"fake mp4 bytes", IDENTITY, num_frames=DEFAULT_NUM_FRAMES),
    )
    servers.encoder.calls.clear()
    client.generate("<video> what happens?", video=b"fake mp4 bytes", max_tokens=1)
    assert "Encode" not in servers.encoder.methods()


def test_one_call_mode_sends_raw_media_to_the_llm(servers):
    with servers.client(one_call=True) as c, pytest.raises(FailedPreconditionError, match="encoder-address"):
        c.generate(PROMPT, images=[_png(10)])
    assert servers.encoder.calls == []
    assert servers.llm.calls[0][1].multimodal_inputs[0].media.image.data == _png(10)


# --- LLM-first shortcut -----------------------------------------------------------------------------


def _plan(*images: bytes | str) -> MediaPlan:
    return MediaPlan([prepare_image(image) for image in images], IDENTITY)


def _id(png: bytes) -> str:
    return encoded_media_id(IMAGE_BYTES, png, IDENTITY)


def test_repeat_call_skips_the_encoder(servers, client):
    a, b = _png(30), _png(31)
    two = "USER: <image> <image>\nCompare. ASSISTANT:"
    first = client.generate("USER: <image> <image> <image>\nCompare. ASSISTANT:", images=[a, b, a])
    assert not first.encoder_skipped and first.tensors_uploaded == 2
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    # any combination of media the LLM service accepted: no encoder RPC at all, ids only
    result = client.generate(two, images=[b, a], max_tokens=2)
    assert servers.encoder.calls == []
    [(method, request)] = servers.llm.calls
    assert method == "Generate"
    assert [i.content_id for i in request.multimodal_inputs] == [_id(b), _id(a)]
    assert result.encoder_skipped and result.encoder_cache_hits == 0 and result.tensors_uploaded == 0
    assert result.content_ids == (_id(b), _id(a))
    assert result.usage.cached_prompt_tokens == 0  # (new prompt) but the next repeat hits the KV prefix
    again = client.generate(two, images=[b, a], max_tokens=2)
    assert again.encoder_skipped and again.usage.cached_prompt_tokens > 0
    assert again.token_ids == result.token_ids
    assert servers.encoder.calls == []
    # an item the LLM service never accepted sends the whole call through the encoder
    client.generate(two, images=[a, _png(32)], max_tokens=1)
    assert servers.encoder.methods() == ["LookupEmbeddings", "Encode"]


def test_shortcut_not_found_falls_back_to_the_encoder_and_uploads(servers, client):
    image = _png(33)
    client.generate(PROMPT, images=[image], max_tokens=1)
    servers.llm.held.clear()  # the LLM service evicted it (or another replica answers)
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    result = client.generate(PROMPT, images=[image], max_tokens=2)
    first, resend = (request for _, request in servers.llm.calls)
    assert [i.WhichOneof("source") for i in first.multimodal_inputs] == ["content_id"]
    assert [i.WhichOneof("source") for i in resend.multimodal_inputs] == ["embedding"]
    assert resend.multimodal_inputs[0].embedding == servers.encoder.cache[_id(image)]
    assert first.request_id == resend.request_id
    # one encoder round trip: the look-up that also fetches what it holds
    [(method, fetch)] = servers.encoder.calls
    assert method == "LookupEmbeddings" and fetch.return_embeddings
    assert list(fetch.content_ids) == [_id(image)]
    assert not result.encoder_skipped and result.tensors_uploaded == 1 and result.encoder_cache_hits == 1
    # the resend was accepted: the id is remembered again
    servers.encoder.calls.clear()
    assert client.generate(PROMPT, images=[image], max_tokens=1).encoder_skipped
    assert servers.encoder.calls == []


def test_shortcut_fallback_fetches_only_what_the_llm_lacks(servers, client):
    kept, lost = _png(34), _png(35)
    prompt = "USER: <image> <image>\nCompare. ASSISTANT:"
    client.generate(prompt, images=[kept, lost], max_tokens=1)
    del servers.llm.held[_id(lost)]
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    result = client.generate(prompt, images=[kept, lost], max_tokens=1)
    [(_, fetch)] = servers.encoder.calls
    assert list(fetch.content_ids) == [_id(lost)]  # the trailer named it alone
    resend = servers.llm.calls[1][1]
    assert [i.WhichOneof("source") for i in resend.multimodal_inputs] == ["content_id", "embedding"]
    assert result.tensors_uploaded == 1 and result.encoder_cache_hits == 1  # the encoder was asked once


def test_shortcut_fallback_encodes_what_the_encoder_evicted_too(servers, client):
    image = _png(36)
    client.generate(PROMPT, images=[image], max_tokens=1)
    servers.llm.held.clear()
    servers.encoder.cache.clear()
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    result = client.generate(PROMPT, images=[image], max_tokens=1)
    assert servers.encoder.methods() == ["LookupEmbeddings", "Encode"]
    assert servers.llm.calls[1][1].multimodal_inputs[0].WhichOneof("source") == "embedding"
    assert result.tensors_uploaded == 1 and result.encoder_cache_hits == 0 and not result.encoder_skipped


def test_shortcut_not_found_twice_raises_and_forgets_the_ids(servers, client):
    image = _png(37)
    client.generate(PROMPT, images=[image], max_tokens=1)
    servers.llm.always_missing = True
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    with pytest.raises(NotFoundError) as info:
        client.generate(PROMPT, images=[image], max_tokens=1)
    assert info.value.content_ids == (_id(image),)
    assert servers.llm.methods() == ["Generate", "Generate"]  # exactly one resend
    assert servers.encoder.methods() == ["LookupEmbeddings"]
    servers.llm.always_missing = False
    servers.encoder.calls.clear()
    client.generate(PROMPT, images=[image], max_tokens=1)  # forgotten: the encoder is asked first again
    assert servers.encoder.methods() == ["LookupEmbeddings"]
    assert not servers.encoder.calls[0][1].return_embeddings


def test_urls_never_take_the_shortcut(servers, client):
    url, body = "https://example.com/shortcut.png", _png(38)
    servers.encoder.urls[url] = body
    client.generate(PROMPT, images=[url], max_tokens=1)
    servers.encoder.calls.clear()
    result = client.generate(PROMPT, images=[url], max_tokens=1)
    assert servers.encoder.methods() == ["Encode"]  # only the encoder can learn a URL's id
    assert not result.encoder_skipped and result.encoder_cache_hits == 1
    servers.encoder.calls.clear()
    both = client.generate("USER: <image> <image>\nCompare. ASSISTANT:", images=[body, url], max_tokens=1)
    assert servers.encoder.methods() == ["LookupEmbeddings", "Encode"]  # one URL: the encoder for all
    assert not both.encoder_skipped
    # the id the encoder served for the URL was recorded: the same bytes sent directly skip it
    servers.encoder.calls.clear()
    assert client.generate(PROMPT, images=[body], max_tokens=1).encoder_skipped
    assert servers.encoder.calls == []


def test_held_ids_capacity_bounds_the_lru_least_recently_accepted_first(servers):
    a, b, c = _png(39), _png(40), _png(41)
    with servers.client(timeout_s=10, held_ids_capacity=2) as client:
        for image in (a, b, a, c):  # a accepted again after b: b is the least recent when c comes
            client.generate(PROMPT, images=[image], max_tokens=1)
        assert client._held_ids.ids() == [_id(a), _id(c)]
        servers.encoder.calls.clear()
        assert client.generate(PROMPT, images=[a], max_tokens=1).encoder_skipped
        assert client.generate(PROMPT, images=[c], max_tokens=1).encoder_skipped
        assert servers.encoder.calls == []
        assert not client.generate(PROMPT, images=[b], max_tokens=1).encoder_skipped  # evicted
        assert servers.encoder.methods() == ["LookupEmbeddings"]
        assert client._held_ids.ids() == [_id(c), _id(b)]


def test_held_ids_lru_bookkeeping():
    a, b, c = _png(42), _png(43), _png(44)
    held = HeldIds(2)
    held.accepted(_plan(a, b, a))
    assert held.ids() == [_id(a), _id(b)]
    held.accepted(_plan(a))  # touched: now the most recent
    held.accepted(_plan(c))
    assert held.ids() == [_id(a), _id(c)] and len(held) == 2 and _id(b) not in held
    held.accepted(_plan(a, b, c))  # more than fit: the call's last ones stay
    assert held.ids() == [_id(b), _id(c)]
    plan = _plan(c, b, c)
    assert held.take_shortcut(plan) and plan.encoder_skipped
    assert [str(s) for s in plan.llm_inputs()] == [_id(c), _id(b), _id(c)] and plan.tensors_uploaded == 0
    assert plan.result_extras()["encoder_skipped"] is True
    partial = _plan(a, b)
    assert not held.take_shortcut(partial) and not partial.encoder_skipped
    assert not held.take_shortcut(_plan(b, "https://example.com/x.png"))  # a URL has no local id
    assert not held.take_shortcut(MediaPlan([prepare_image(b)], None))  # one-call mode
    assert not held.take_shortcut(_plan())  # text only
    held.not_found(_plan(b, c), [_id(b)])  # the trailer names b: only b is forgotten
    assert held.ids() == [_id(c)]
    held.accepted(_plan(b))
    held.not_found(_plan(b, c), [])  # names none: all of the call's
    assert held.ids() == []
    held.accepted(_plan(a, b))
    held.not_found(_plan(a), ["b3:" + "0" * 64])  # names only foreign ids: the call's go too
    assert held.ids() == [_id(b)]
    held.clear()
    assert len(held) == 0


def test_held_ids_capacity_zero_disables_the_shortcut(servers):
    held = HeldIds(0)
    held.accepted(_plan(_png(45)))
    assert len(held) == 0 and not held.take_shortcut(_plan(_png(45)))
    image = _png(46)
    with servers.client(timeout_s=10, held_ids_capacity=0) as client:
        client.generate(PROMPT, images=[image], max_tokens=1)
        servers.encoder.calls.clear()
        result = client.generate(PROMPT, images=[image], max_tokens=1)
        assert servers.encoder.methods() == ["LookupEmbeddings"] and not result.encoder_skipped
        assert len(client._held_ids) == 0
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(InvalidArgumentError, match="held_ids_capacity"):
            client_sdk.Client("127.0.0.1:1", "127.0.0.1:1", held_ids_capacity=bad)
        with pytest.raises(InvalidArgumentError, match="held_ids_capacity"):
            HeldIds(bad)


def test_shortcut_stream_falls_back_before_any_message(servers, client):
    image = _png(47)
    client.generate(PROMPT, images=[image], max_tokens=1)
    deltas = list(client.generate(PROMPT, images=[image], max_tokens=2, stream=True))
    assert deltas[-1].encoder_skipped and deltas[-1].tensors_uploaded == 0
    servers.llm.held.clear()
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    deltas = list(client.generate(PROMPT, images=[image], max_tokens=2, stream=True))
    assert servers.llm.methods() == ["GenerateStream", "GenerateStream"]
    assert servers.encoder.methods() == ["LookupEmbeddings"] and servers.encoder.calls[0][1].return_embeddings
    first, resend = (request for _, request in servers.llm.calls)
    assert first.multimodal_inputs[0].WhichOneof("source") == "content_id"
    assert resend.multimodal_inputs[0].WhichOneof("source") == "embedding"
    last = deltas[-1]
    assert not last.encoder_skipped and last.tensors_uploaded == 1 and last.encoder_cache_hits == 1
    assert client_sdk.join_deltas(deltas).token_ids == deltas[0].token_ids + deltas[1].token_ids


def test_stream_error_after_a_message_is_not_resent(servers, client):
    image = _png(48)
    client.generate(PROMPT, images=[image], max_tokens=1)
    servers.llm.fail_mid_stream = protocol_errors.NotFoundError("gone", [_id(image)])
    servers.encoder.calls.clear()
    servers.llm.calls.clear()
    stream = client.generate(PROMPT, images=[image], max_tokens=3, stream=True)
    assert next(stream).token_ids  # the LLM service resolved the id and started generating
    with pytest.raises(NotFoundError):
        next(stream)
    assert servers.llm.methods() == ["GenerateStream"] and servers.encoder.calls == []


def test_ids_the_encoder_disagrees_with_clear_the_shortcut(servers, client):
    old, new = _png(49), _png(50)
    client.generate(PROMPT, images=[old], max_tokens=1)
    assert _id(old) in client._held_ids
    # the encoder restarts with another model: it computes other ids than the client's cached identity
    servers.encoder.identity = PreprocessingIdentity("llava", "b3:" + "e" * 64, "b3:" + "p" * 64)
    servers.encoder.calls.clear()
    result = client.generate(PROMPT, images=[new], max_tokens=1)
    assert result.content_ids == (encoded_media_id(IMAGE_BYTES, new, servers.encoder.identity),)
    assert client._held_ids.ids() == list(result.content_ids)  # cleared, then the accepted id
    servers.encoder.calls.clear()
    client.generate(PROMPT, images=[old], max_tokens=1)  # no shortcut: the identity is fetched again
    assert servers.encoder.methods() == ["GetModelInfo", "LookupEmbeddings", "Encode"]


def test_sync_client_shares_the_shortcut_between_threads(servers):
    images = [_png(60 + i) for i in range(4)]
    errors: list[BaseException] = []
    with servers.client(timeout_s=10, held_ids_capacity=2) as client:

        def worker(offset: int) -> None:
            try:
                for i in range(12):
                    client.generate(PROMPT, images=[images[(offset + i) % 4]], max_tokens=1)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert len(client._held_ids) == 2 and set(client._held_ids.ids()) <= {_id(i) for i in images}


def test_async_client_llm_first_shortcut(servers):
    image, other = _png(51), _png(52)

    async def main() -> dict:
        seen: dict = {}
        async with client_sdk.AsyncClient(servers.encoder_address, servers.llm_address, timeout_s=10) as c:
            await c.generate(PROMPT, images=[image], max_tokens=1)
            servers.encoder.calls.clear()
            seen["skipped"] = await c.generate(PROMPT, images=[image], max_tokens=1)
            stream = c.generate(PROMPT, images=[image], max_tokens=2, stream=True)
            seen["streamed"] = [d async for d in stream]
            seen["skipped_rpcs"] = servers.encoder.methods()
            servers.llm.held.clear()
            servers.llm.calls.clear()
            seen["fallback"] = await c.generate(PROMPT, images=[image], max_tokens=1)
            seen["unary_rpcs"] = servers.llm.methods()
            servers.llm.held.clear()
            servers.llm.calls.clear()
            stream = c.generate(PROMPT, images=[image], max_tokens=2, stream=True)
            seen["stream_fallback"] = [d async for d in stream]
            seen["stream_rpcs"] = servers.llm.methods()
            await c.generate(PROMPT, images=[image, other], max_tokens=1)  # other is new: the encoder
            seen["held"] = c._held_ids.ids()
        async with client_sdk.AsyncClient(
            servers.encoder_address, servers.llm_address, timeout_s=10, held_ids_capacity=0
        ) as c:
            seen["disabled"] = await c.generate(PROMPT, images=[image], max_tokens=1)
        return seen

    seen = asyncio.run(main())
    skipped = seen["skipped"]
    assert seen["skipped_rpcs"] == []
    assert skipped.encoder_skipped and skipped.encoder_cache_hits == 0 and skipped.tensors_uploaded == 0
    assert seen["streamed"][-1].encoder_skipped
    assert seen["unary_rpcs"] == ["Generate", "Generate"]
    assert seen["stream_rpcs"] == ["GenerateStream", "GenerateStream"]
    for result in (seen["fallback"], seen["stream_fallback"][-1]):
        assert not result.encoder_skipped and result.tensors_uploaded == 1 and result.encoder_cache_hits == 1
    assert seen["held"] == [_id(image), _id(other)]
    assert not seen["disabled"].encoder_skipped and seen["disabled"].encoder_cache_hits == 1


# --- sampling keywords ------------------------------------------------------------------------------


def test_sampling_keywords_use_the_proto_names(servers, client):
    client.generate(
        "hi",
        max_tokens=5,
        min_tokens=1,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        min_p=0.1,
        seed=7,
        repetition_penalty=1.1,
        presence_penalty=0.2,
        frequency_penalty=0.3,
        stop="END",
        stop_token_ids=[2],
        end_id=1,
        pad_id=0,
        ignore_eos=True,
        log_probs=True,
        top_log_probs=2,
        echo_prompt=True,
        prompt_format="triton",
        add_special_tokens=False,
        request_id="req-42",
    )
    request = servers.llm.calls[0][1]
    s = request.sampling
    assert (s.max_tokens, s.min_tokens, s.top_k, s.seed, s.end_id, s.pad_id) == (5, 1, 3, 7, 1, 0)
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert list(s.stop_strings) == ["END"] and list(s.stop_token_ids) == [2] and s.ignore_eos
    assert s.repetition_penalty == pytest.approx(1.1) and s.min_p == pytest.approx(0.1)
    assert s.presence_penalty == pytest.approx(0.2) and s.frequency_penalty == pytest.approx(0.3)
    o = request.output_options
    assert o.log_probs and o.top_log_probs == 2 and o.echo_prompt
    assert request.prompt_format == llm_service_pb2.PROMPT_FORMAT_TRITON_ENSEMBLE
    assert request.HasField("add_special_tokens") and not request.add_special_tokens
    assert request.request_id == "req-42"


def test_unset_sampling_fields_stay_unset(servers, client):
    client.generate("hi", temperature=0.0, top_k=None)
    request = servers.llm.calls[0][1]
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert not request.sampling.HasField("top_k")
    assert not request.HasField("output_options")


def test_unknown_keyword_is_a_type_error_naming_the_valid_ones(client):
    with pytest.raises(TypeError, match="max_new_tokens.*valid ones: max_tokens"):
        client.generate("hi", max_new_tokens=3)
    with pytest.raises(TypeError, match="either stop or stop_strings"):
        client.generate("hi", stop="a", stop_strings=["b"])


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": "3"}, {"max_tokens": 2.5}, {"ignore_eos": 1}, {"stop": [""]}, {"top_k": True}]
)
def test_wrong_types_are_invalid_argument(client, kwargs):
    with pytest.raises(InvalidArgumentError):
        client.generate("hi", **kwargs)


def test_bad_media_fail_before_any_rpc(servers, client, tmp_path):
    for bad in (tmp_path / "missing.png", b"", np.zeros((4, 4, 3), np.float32), 42):
        with pytest.raises(InvalidArgumentError):
            client.generate(PROMPT, images=[bad])
    with pytest.raises(InvalidArgumentError, match="num_frames"):
        client.generate("x", num_frames=3)
    assert servers.encoder.calls == [] and servers.llm.calls == []


def test_chat_prompt(servers, client):
    client.generate([{"role": "user", "content": [{"type": "image"}, "What is it?"]}], images=[_png(11)])
    chat = servers.llm.calls[0][1].chat
    assert chat.messages[0].role == "user"
    assert [p.WhichOneof("part") for p in chat.messages[0].content] == ["image", "text"]


# --- errors and timeouts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        (protocol_errors.InvalidArgumentError("prompt too long"), InvalidArgumentError),
        (protocol_errors.ResourceExhaustedError("queue full"), ResourceExhaustedError),
        (protocol_errors.FailedPreconditionError("no chat template"), FailedPreconditionError),
        (protocol_errors.UnavailableError("draining"), UnavailableError),
        (protocol_errors.PermissionDeniedError("nope"), PermissionDeniedError),
        (protocol_errors.InternalError("bug"), InternalError),
        (RuntimeError("secret details"), InternalError),
    ],
)
def test_status_codes_become_typed_exceptions(servers, client, error, cls):
    servers.llm.fail_with = error
    with pytest.raises(cls) as info:
        client.generate("hi")
    exc = info.value
    assert isinstance(exc, VlmClientError) and exc.code == cls.default_code
    assert exc.target == servers.llm_address and exc.method == "LlmService.Generate"
    assert "secret" not in str(exc)
    with pytest.raises(cls):  # streaming raises the same while iterating
        list(client.generate("hi", stream=True))


def test_unreachable_service_is_unavailable():
    with (
        client_sdk.Client("127.0.0.1:1", "127.0.0.1:1", timeout_s=5) as c,
        pytest.raises(UnavailableError) as info,
    ):
        c.generate("hi")
    assert "127.0.0.1:1" in str(info.value)


def test_timeout_is_deadline_exceeded(servers, client):
    servers.llm.delay_s = 2.0
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        client.generate("hi", timeout_s=0.3)
    assert time.monotonic() - started < 1.5
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(DeadlineExceededError):
        list(client.generate("hi", stream=True, timeout_s=0.3))


def test_closed_client_refuses_calls(servers):
    c = servers.client()
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.generate("hi")


# --- streaming --------------------------------------------------------------------------------------


def test_stream_deltas_join_to_the_unary_result(servers, client):
    image = _png(12)
    unary = client.generate(PROMPT, images=[image], max_tokens=4)
    deltas = list(client.generate(PROMPT, images=[image], max_tokens=4, stream=True))
    assert len(deltas) == 4 and all(d.text and len(d.token_ids) == 1 for d in deltas)
    assert [d.finish_reason for d in deltas] == [None, None, None, "length"]
    last = deltas[-1]
    assert last.usage is not None and last.timings is not None and deltas[0].usage is None
    # the LLM accepted the id in the unary call: the stream skips the encoder (LLM-first shortcut)
    assert last.encoder_skipped and last.encoder_cache_hits == 0 and last.tensors_uploaded == 0
    assert not any(d.encoder_skipped for d in deltas[:-1])  # counters come with the last delta only
    assert servers.encoder.methods() == ["GetModelInfo", "LookupEmbeddings", "Encode"]  # unary call only
    joined = client_sdk.join_deltas(deltas)
    assert (joined.text, joined.token_ids, joined.finish_reason) == (
        unary.text,
        unary.token_ids,
        unary.finish_reason,
    )
    assert 0 < last.timings.time_to_first_token_ms <= last.timings.total_ms


def test_stream_sends_a_fresh_tensor_at_once(servers, client):
    deltas = list(client.generate(PROMPT, images=[_png(24)], max_tokens=2, stream=True))
    assert servers.llm.methods() == ["GenerateStream"]
    assert deltas[-1].tensors_uploaded == 1
    assert servers.llm.calls[0][1].multimodal_inputs[0].WhichOneof("source") == "embedding"


def test_stream_resends_the_tensor_on_not_found(servers, encoder_first_client):
    client = encoder_first_client  # look-up first (the shortcut's fallback: test_shortcut_stream_...)
    client.generate(PROMPT, images=[_png(13)], max_tokens=1)
    servers.llm.held.clear()
    servers.llm.calls.clear()
    servers.encoder.calls.clear()
    deltas = list(client.generate(PROMPT, images=[_png(13)], max_tokens=2, stream=True))
    assert servers.encoder.methods() == ["LookupEmbeddings", "LookupEmbeddings"]  # look-up, fetch
    assert servers.llm.methods() == ["GenerateStream", "GenerateStream"]
    assert deltas[-1].tensors_uploaded == 1
    assert servers.llm.calls[0][1].multimodal_inputs[0].WhichOneof("source") == "content_id"
    assert servers.llm.calls[1][1].multimodal_inputs[0].WhichOneof("source") == "embedding"


def test_closing_a_stream_cancels_the_call(servers, client):
    servers.llm.token_delay_s = 0.2
    stream = client.generate("hi", max_tokens=50, stream=True)
    next(stream)
    stream.close()
    assert servers.llm.stream_cancelled.wait(timeout=5)


# --- async client -----------------------------------------------------------------------------------


def test_async_client_same_flow(servers):
    image = _png(14)

    async def main():
        async with client_sdk.AsyncClient(servers.encoder_address, servers.llm_address, timeout_s=10) as c:
            first = await c.generate(PROMPT, images=[image], max_tokens=3)
            deltas = [d async for d in c.generate(PROMPT, images=[image], max_tokens=3, stream=True)]
            awaited = [d async for d in await c.generate("text", stream=True, max_tokens=2)]
            return first, deltas, awaited

    first, deltas, awaited = asyncio.run(main())
    assert first.tensors_uploaded == 1 and first.encoder_cache_hits == 0
    joined = client_sdk.join_deltas(deltas)
    assert joined.token_ids == first.token_ids and joined.text == first.text
    # the LLM accepted the id in the first call: the stream skips the encoder (LLM-first shortcut)
    assert joined.tensors_uploaded == 0 and joined.encoder_cache_hits == 0 and joined.encoder_skipped
    assert not first.encoder_skipped
    assert servers.encoder.methods() == ["GetModelInfo", "LookupEmbeddings", "Encode"]  # first call only
    assert servers.llm.methods() == ["Generate", "GenerateStream", "GenerateStream"]
    assert [i.WhichOneof("source") for i in servers.llm.calls[0][1].multimodal_inputs] == ["embedding"]
    assert len(awaited) == 2


def test_async_client_resends_on_not_found(servers):
    image = _png(25)

    async def main():
        async with client_sdk.AsyncClient(
            servers.encoder_address, servers.llm_address, timeout_s=10, held_ids_capacity=0
        ) as c:  # look-up first (the shortcut's fallback: test_async_client_llm_first_shortcut)
            await c.generate(PROMPT, images=[image], max_tokens=1)
            servers.llm.held.clear()
            servers.llm.calls.clear()
            unary = await c.generate(PROMPT, images=[image], max_tokens=1)
            servers.llm.held.clear()
            deltas = [d async for d in c.generate(PROMPT, images=[image], max_tokens=1, stream=True)]
            return unary, deltas

    unary, deltas = asyncio.run(main())
    assert servers.llm.methods() == ["Generate", "Generate", "GenerateStream", "GenerateStream"]
    assert unary.tensors_uploaded == 1 and deltas[-1].tensors_uploaded == 1


def test_async_client_errors_and_timeouts(servers):
    async def main():
        async with client_sdk.AsyncClient(servers.encoder_address, servers.llm_address) as c:
            servers.llm.always_missing = True
            with pytest.raises(NotFoundError):
                await c.generate(PROMPT, images=[_png(15)])
            servers.llm.always_missing = False
            servers.llm.delay_s = 2.0
            with pytest.raises(DeadlineExceededError):
                await c.generate("hi", timeout_s=0.3)
            with pytest.raises(DeadlineExceededError):
                async for _ in c.generate("hi", stream=True, timeout_s=0.3):
                    pass
            with pytest.raises(TypeError):
                c.generate("hi", bogus=1)

    asyncio.run(main())
    assert servers.llm.methods()[:2] == ["Generate", "Generate"]


# --- module-level generate --------------------------------------------------------------------------


def test_module_generate_reads_the_environment_at_call_time(servers, monkeypatch):
    monkeypatch.setenv("VLM_LLM_ADDR", servers.llm_address)
    monkeypatch.setenv("VLM_ENCODER_ADDR", servers.encoder_address)
    result = client_sdk.generate(PROMPT, images=[_png(16)], max_tokens=2)
    assert result.tensors_uploaded == 1
    deltas = list(client_sdk.generate("hi", stream=True, max_tokens=2))
    assert client_sdk.join_deltas(deltas).token_ids == ((2 + 0) % 100, (2 + 1) % 100)
    monkeypatch.setenv("VLM_LLM_ADDR", "127.0.0.1:1")
    with pytest.raises(UnavailableError):
        client_sdk.generate("hi", timeout_s=5)
    explicit = client_sdk.generate("hi", llm_address=servers.llm_address, max_tokens=1)
    assert explicit.token_ids == (2,)


def test_settings_defaults_and_validation(monkeypatch):
    monkeypatch.delenv("VLM_LLM_ADDR", raising=False)
    monkeypatch.delenv("VLM_ENCODER_ADDR", raising=False)
    c = client_sdk.Client()
    assert (c.encoder_address, c.llm_address) == ("localhost:50051", "localhost:50052")
    monkeypatch.setenv("VLM_LLM_ADDR", "llm:9")
    assert client_sdk.Client().llm_address == "llm:9"  # read at construction
    assert client_sdk.Client(llm_address="other:1").llm_address == "other:1"
    with pytest.raises(InvalidArgumentError):
        client_sdk.Client(timeout_s=0)


# --- CLI --------------------------------------------------------------------------------------------


def _cli(servers, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(
        ["--encoder-address", servers.encoder_address, "--llm-address", servers.llm_address, *args],
        out=out,
        err=err,
    )
    return code, out.getvalue(), err.getvalue()


def test_cli_unary_prints_answer_and_timings(servers, tmp_path):
    (tmp_path / "a.png").write_bytes(_png(17))
    code, out, err = _cli(
        servers,
        "--text",
        "Question: which city is this? Answer:",
        "--image",
        str(tmp_path / "a.png"),
        "--request-output-len",
        "3",
        "--temperature",
        "0",
        "--top-k",
        "1",
        "--top-p",
        "0.5",
        "--seed",
        "3",
        "--end-id",
        "2",
        "--pad-id",
        "0",
        "--return-log-probs",
    )
    assert code == 0, err
    tokens = [(len("Question: which city is this? Answer:") + i) % 100 for i in range(3)]
    assert out.splitlines()[0] == "".join(f"w{t} " for t in tokens)
    assert "time to first token:" in out and "total latency:" in out and "embeddings uploaded 1" in out
    request = servers.llm.calls[0][1]
    assert request.prompt_format == llm_service_pb2.PROMPT_FORMAT_TRITON_ENSEMBLE  # auto: no placeholder
    s = request.sampling
    assert (s.max_tokens, s.top_k, s.seed, s.end_id, s.pad_id) == (3, 1, 3, 2, 0)
    assert request.output_options.log_probs


def test_cli_streaming_and_comma_separated_images(servers, tmp_path):
    for name, seed in (("a.png", 18), ("b.png", 19)):
        (tmp_path / name).write_bytes(_png(seed))
    data_uri = "data:image/png;base64," + base64.b64encode(_png(20)).decode()
    images = f"{tmp_path / 'a.png'},{tmp_path / 'b.png'},{data_uri}"
    code, out, err = _cli(servers, "--text", "<image><image><image> hi", "--image", images, "--streaming")
    assert code == 0, err
    assert len(servers.encoder.calls[-1][1].items) == 3
    assert servers.llm.calls[0][1].prompt_format == llm_service_pb2.PROMPT_FORMAT_UNSPECIFIED
    assert servers.llm.methods() == ["GenerateStream"]  # all three fresh: sent whole at once
    assert out.startswith("w") and "time to first token:" in out


def test_cli_errors_have_messages_and_exit_codes(servers, tmp_path, capsys):
    code, _, err = _cli(servers, "--text", "hi", "--image", str(tmp_path / "nope.png"))
    assert code == 2 and "does not exist" in err
    servers.llm.fail_with = protocol_errors.ResourceExhaustedError("queue full")
    code, _, err = _cli(servers, "--text", "hi")
    assert code == 1 and "RESOURCE_EXHAUSTED" in err and "queue full" in err
    code = cli.main(
        ["--text", "hi", "--llm-address", "127.0.0.1:1", "--timeout", "5"],
        out=io.StringIO(),
        err=io.StringIO(),
    )
    assert code == 1
    with pytest.raises(SystemExit) as info:
        cli.main(["--image", "x.png"])  # --text is required
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--text", "x", "--video-num-frames", "4"])
    capsys.readouterr()


def test_cli_split_media_list():
    uri = "data:image/png;base64,AAAA"
    assert cli.split_media_list(f"a.png, https://x/y.jpg,{uri}") == ["a.png", "https://x/y.jpg", uri]


def test_calls_spread_over_every_encoder_replica(servers):
    """Round-robin load balancing: a target naming several encoders (as DNS does for scaled replicas)
    gets calls on each of them, not only on the first (gRPC's default pick_first)."""
    second = FakeEncoder()

    async def start_second():
        server = grpc.aio.server()
        encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server(second, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = servers._run(start_second())
    try:
        first_port = servers.encoder_address.rsplit(":", 1)[1]
        target = f"ipv4:127.0.0.1:{first_port},127.0.0.1:{port}"
        with client_sdk.Client(target, servers.llm_address, timeout_s=10) as client:
            for seed in range(8):
                client.generate(PROMPT, images=[_png(seed)], max_tokens=2)
        assert servers.encoder.calls and second.calls, "every replica should serve some calls"
    finally:
        servers._run(server.stop(None))
