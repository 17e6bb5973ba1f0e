"""EncoderService over real gRPC on 127.0.0.1: content ids, cache, batching, dtypes, bad input, health.

Most tests use a fast fake engine (tests/encoder/fakes.py) so they can gate and count model runs; the
tests marked "real" run the tiny LLaVA checkpoint end to end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from vlm.v1 import common_pb2, encoder_service_pb2, encoder_service_pb2_grpc

from encoder_service.config import EncoderConfig, MediaLimits, UrlPolicy
from encoder_service.engines.base import VisualEngine
from encoder_service.server import EncoderServer, build_server
from tests.encoder.fakes import HIDDEN, ROWS, SIDE, FakeEngine, fake_checkpoint
from tests.encoder.http_fixtures import media_server
from tests.encoder.media_samples import compressed_bomb_png, encode_image, make_video, png_with_header_size
from vlm_protocol import media_ids
from vlm_protocol.grpc_server import ServerConfig
from vlm_protocol.tensor_codec import decode_torch, encode_numpy

CLIENT_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Harness:
    server: EncoderServer
    stub: encoder_service_pb2_grpc.EncoderServiceStub
    channel: grpc.aio.Channel

    @property
    def engine(self):
        return self.server.pipeline.engine

    async def encode(self, *items: common_pb2.MediaItem, **fields) -> encoder_service_pb2.EncodeResponse:
        request = encoder_service_pb2.EncodeRequest(items=list(items), **fields)
        return await self.stub.Encode(request, timeout=30)

    async def health(self, service: str = "") -> int:
        response = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return response.status


def _config(model_dir: Path, **overrides) -> EncoderConfig:
    values = {
        "model_dir": model_dir,
        "max_queue_delay_ms": 5.0,
        "server": ServerConfig(host="127.0.0.1", port=0, grace_period_s=1.0),
    }
    values.update(overrides)
    return EncoderConfig(**values)


@contextlib.asynccontextmanager
async def serving(
    model_dir: Path, engine: VisualEngine | None = None, *, warm_up: bool = True, **overrides
) -> AsyncIterator[Harness]:
    server = build_server(_config(model_dir, **overrides), engine or FakeEngine())
    channel = grpc.aio.insecure_channel(server.address, options=CLIENT_OPTIONS)
    try:
        await server.start(warm_up=warm_up)
        yield Harness(server, encoder_service_pb2_grpc.EncoderServiceStub(channel), channel)
    finally:
        await channel.close()
        await server.stop_now()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return fake_checkpoint(tmp_path / "fake-llava")


def _image(seed: int = 0, size: tuple[int, int] = (20, 16)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode_image(Image.fromarray(pixels))


def image_item(
    data: bytes | None = None, *, url: str | None = None, content_id: str = ""
) -> common_pb2.MediaItem:
    image = common_pb2.Image(url=url) if url is not None else common_pb2.Image(data=data)
    return common_pb2.MediaItem(image=image, content_id=content_id)


def pixels_item(array: np.ndarray) -> common_pb2.MediaItem:
    return common_pb2.MediaItem(image=common_pb2.Image(pixels_hwc_uint8=encode_numpy(array)))


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def features(embedding: common_pb2.Embedding) -> torch.Tensor:
    return decode_torch(embedding.features)


async def expect_error(call, code: grpc.StatusCode, pattern: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    import re

    assert re.search(pattern, details), details
    return details


# -- health, reflection, model info -----------------------------------------------------------------------


def test_health_is_not_serving_until_warm_and_encode_is_unavailable_meanwhile(model_dir):
    async def scenario():
        engine = FakeEngine()
        engine.gate = threading.Event()
        server = build_server(_config(model_dir), engine)
        channel = grpc.aio.insecure_channel(server.address)
        harness = Harness(server, encoder_service_pb2_grpc.EncoderServiceStub(channel), channel)
        try:
            starting = asyncio.ensure_future(server.start())
            await asyncio.sleep(0.2)
            assert not starting.done()
            assert await harness.health() == NOT_SERVING
            assert await harness.health("vlm.v1.EncoderService") == NOT_SERVING
            await expect_error(
                harness.encode(image_item(_image())), grpc.StatusCode.UNAVAILABLE, "warming up"
            )
            engine.gate.set()  # the warm-up encode may now run
            await starting
            assert engine.num_encode_calls == 1
            assert await harness.health() == SERVING
            assert await harness.health("vlm.v1.EncoderService") == SERVING
            response = await harness.encode(image_item(_image()))
            assert len(response.results) == 1
        finally:
            engine.gate.set()
            await channel.close()
            await server.stop_now()

    run(scenario())


def test_reflection_lists_the_encoder_service(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
            names = {service.name for service in responses[0].list_services_response.service}
            assert {"vlm.v1.EncoderService", "grpc.health.v1.Health"} <= names

    run(scenario())


def test_get_model_info_describes_model_output_and_limits(model_dir):
    async def scenario():
        async with serving(model_dir, limits=MediaLimits(max_items_per_request=3)) as harness:
            info = await harness.stub.GetModelInfo(
                encoder_service_pb2.EncoderServiceGetModelInfoRequest(), timeout=5
            )
            pipeline = harness.server.pipeline
            assert info.model_family == common_pb2.MODEL_FAMILY_LLAVA
            assert info.model_id == "fake-llava"
            assert info.model_fingerprint == pipeline.identity.model_fingerprint
            assert info.model_fingerprint.startswith("b3:") and info.processor_config_hash.startswith("b3:")
            assert info.embedding_kind == common_pb2.EMBEDDING_KIND_PROMPT_TABLE
            assert (info.llm_hidden_size, info.num_rows_per_image, info.image_size) == (HIDDEN, ROWS, SIDE)
            assert info.output_dtype == common_pb2.DATA_TYPE_FLOAT32
            assert info.supports_url and info.supports_pixel_values and not info.supports_video
            assert info.default_num_frames == 8
            assert info.limits.max_items_per_request == 3
            assert info.limits.max_receive_message_bytes == 256 << 20
            assert info.limits.url_fetch_timeout_ms == 30_000

    run(scenario())


# -- content ids and the cache --------------------------------------------------------------------------


def test_same_picture_as_bytes_and_data_uri_gets_the_same_id_and_is_served_from_cache(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            png = _image(1)
            pipeline = harness.server.pipeline
            expected_id = media_ids.encoded_media_id(media_ids.IMAGE_BYTES, png, pipeline.identity)
            calls_before = harness.engine.num_encode_calls

            first = await harness.encode(image_item(png))
            assert harness.engine.num_encode_calls == calls_before + 1
            embedding = first.results[0].embedding
            assert not first.results[0].cached
            assert embedding.content_id == expected_id
            assert embedding.kind == common_pb2.EMBEDDING_KIND_PROMPT_TABLE
            assert embedding.model_family == common_pb2.MODEL_FAMILY_LLAVA
            assert embedding.model_fingerprint == pipeline.identity.model_fingerprint
            assert embedding.processor_config_hash == pipeline.identity.processor_config_hash
            assert (embedding.num_rows, embedding.num_prompt_tokens) == (ROWS, ROWS)
            assert (embedding.source_height, embedding.source_width) == (16, 20)
            assert list(embedding.features.shape) == [ROWS, HIDDEN]
            assert embedding.media_type == common_pb2.MEDIA_TYPE_IMAGE

            # The same picture as a data: URI, with the client's (correct) id: a cache hit, no model run.
            second = await harness.encode(image_item(url=data_uri(png), content_id=expected_id))
            assert second.results[0].cached
            assert second.results[0].embedding.content_id == expected_id
            assert torch.equal(features(second.results[0].embedding), features(embedding))
            assert harness.engine.num_encode_calls == calls_before + 1
            stats = pipeline.cache_stats()
            assert stats.num_hits == 1 and stats.num_entries == 1

            # bypass_cache encodes again (same result) and still stores it.
            third = await harness.encode(image_item(png), bypass_cache=True)
            assert not third.results[0].cached
            assert harness.engine.num_encode_calls == calls_before + 2
            assert torch.equal(features(third.results[0].embedding), features(embedding))

            found = await harness.stub.LookupEmbeddings(
                encoder_service_pb2.LookupEmbeddingsRequest(
                    content_ids=[expected_id, "b3:" + "0" * 64], return_embeddings=True
                ),
                timeout=5,
            )
            assert list(found.found_content_ids) == [expected_id]
            assert list(found.missing_content_ids) == ["b3:" + "0" * 64]
            assert torch.equal(features(found.embeddings[0]), features(embedding))
            assert harness.engine.num_encode_calls == calls_before + 2  # lookups never encode
            await expect_error(
                harness.stub.LookupEmbeddings(
                    encoder_service_pb2.LookupEmbeddingsRequest(content_ids=["nope"])
                ),
                INVALID,
                r"content_ids\[0\] 'nope' is malformed",
            )

    run(scenario())


def test_duplicate_items_in_one_request_are_encoded_once(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            png = _image(2)
            before = harness.engine.num_encode_calls
            response = await harness.encode(
                image_item(png), image_item(url=data_uri(png)), image_item(_image(3))
            )
            ids = [result.embedding.content_id for result in response.results]
            assert ids[0] == ids[1] != ids[2]
            assert harness.server.pipeline.batcher.num_items - 1 == 2  # warm-up + 2 distinct items
            assert harness.engine.num_encode_calls - before <= 2

    run(scenario())


def test_eviction_respects_the_byte_budget(model_dir):
    async def scenario():
        record_bytes = ROWS * HIDDEN * 4 + 512  # fp32 features + per-entry overhead
        async with serving(model_dir, cache_bytes=2 * record_bytes + 10) as harness:
            pipeline = harness.server.pipeline
            ids = []
            for seed in range(3):
                response = await harness.encode(image_item(_image(10 + seed)))
                ids.append(response.results[0].embedding.content_id)
            stats = pipeline.cache_stats()
            assert stats.num_bytes <= stats.max_bytes
            assert (stats.num_entries, stats.num_evictions) == (2, 1)
            lookup = await harness.stub.LookupEmbeddings(
                encoder_service_pb2.LookupEmbeddingsRequest(content_ids=ids), timeout=5
            )
            assert list(lookup.missing_content_ids) == ids[:1]
            assert list(lookup.found_content_ids) == ids[1:]

    run(scenario())


def test_client_content_id_must_match(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            png = _image(4)
            wrong = media_ids.encoded_media_id(
                media_ids.IMAGE_BYTES, _image(5), harness.server.pipeline.identity
            )
            await expect_error(
                harness.encode(image_item(png, content_id=wrong)), INVALID, "does not match the media"
            )
            await expect_error(harness.encode(image_item(png, content_id="b3:xyz")), INVALID, "malformed")

    run(scenario())


# -- batching -------------------------------------------------------------------------------------------


def test_32_concurrent_calls_share_model_batches_and_match_one_by_one(model_dir):
    async def scenario():
        async with serving(model_dir, max_batch_size=8, max_queue_delay_ms=20.0) as harness:
            pipeline = harness.server.pipeline
            images = [_image(100 + i) for i in range(32)]
            batches_before = pipeline.num_model_batches
            concurrent = await asyncio.gather(*(harness.encode(image_item(png)) for png in images))
            num_batches = pipeline.num_model_batches - batches_before
            assert num_batches < 32
            assert max(harness.engine.batch_sizes) > 1
            for png, response in zip(images, concurrent, strict=True):
                single = await harness.encode(image_item(png), bypass_cache=True)
                assert single.results[0].embedding.content_id == response.results[0].embedding.content_id
                assert torch.equal(
                    features(single.results[0].embedding), features(response.results[0].embedding)
                )

    run(scenario())


def test_full_queue_is_resource_exhausted_and_cancelled_calls_free_their_slot(model_dir):
    async def scenario():
        async with serving(model_dir, max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0.0) as harness:
            engine = harness.engine
            engine.gate = threading.Event()
            running = asyncio.ensure_future(harness.encode(image_item(_image(20))))  # in the model
            await asyncio.sleep(0.2)
            queued = harness.stub.Encode(encoder_service_pb2.EncodeRequest(items=[image_item(_image(21))]))
            await asyncio.sleep(0.2)
            await expect_error(
                harness.encode(image_item(_image(22))), grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"
            )
            queued.cancel()  # the client gives up: its queue slot must free at once
            for _ in range(50):
                if harness.server.pipeline.batcher.queue_size == 0:
                    break
                await asyncio.sleep(0.02)
            assert harness.server.pipeline.batcher.queue_size == 0
            engine.gate.set()
            assert len((await running).results) == 1
            assert len((await harness.encode(image_item(_image(23)))).results) == 1

    run(scenario())


# -- output dtypes and other input forms ------------------------------------------------------------------


def test_output_dtypes(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            png = _image(30)
            reference = features((await harness.encode(image_item(png))).results[0].embedding)
            assert reference.dtype == torch.float32
            for dtype, torch_dtype in [
                (common_pb2.DATA_TYPE_FLOAT16, torch.float16),
                (common_pb2.DATA_TYPE_BFLOAT16, torch.bfloat16),
                (common_pb2.DATA_TYPE_FLOAT32, torch.float32),
            ]:
                response = await harness.encode(image_item(png), output_dtype=dtype)
                assert response.results[0].cached
                embedding = response.results[0].embedding
                assert embedding.features.dtype == dtype
                assert torch.equal(features(embedding), reference.to(torch_dtype))
            await expect_error(
                harness.encode(image_item(png), output_dtype=common_pb2.DATA_TYPE_INT8),
                INVALID,
                "not a float output type",
            )

    run(scenario())


def test_pixels_and_pixel_values_inputs(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            from PIL import Image

            png = _image(40)
            pixels = np.asarray(Image.open(__import__("io").BytesIO(png)).convert("RGB"))
            from_bytes = (await harness.encode(image_item(png))).results[0].embedding
            from_pixels = (await harness.encode(pixels_item(pixels))).results[0].embedding
            assert from_pixels.content_id == media_ids.array_media_id(
                media_ids.IMAGE_PIXELS, pixels, harness.server.pipeline.identity
            )
            assert from_pixels.content_id != from_bytes.content_id
            assert torch.equal(features(from_pixels), features(from_bytes))  # same picture, same features

            values = np.random.default_rng(0).random((3, SIDE, SIDE), dtype=np.float32)
            item = common_pb2.MediaItem(image=common_pb2.Image(pixel_values=encode_numpy(values)))
            embedding = (await harness.encode(item)).results[0].embedding
            assert (embedding.source_height, embedding.source_width) == (0, 0)
            assert list(embedding.features.shape) == [ROWS, HIDDEN]

    run(scenario())


def test_video_needs_a_video_model_and_frames_and_files_are_sampled(tmp_path):
    async def scenario():
        plain_dir = fake_checkpoint(tmp_path / "plain")
        async with serving(plain_dir) as harness:
            frames = np.zeros((4, 8, 8, 3), np.uint8)
            item = common_pb2.MediaItem(video=common_pb2.Video(frames=encode_numpy(frames)))
            await expect_error(
                harness.encode(item), grpc.StatusCode.FAILED_PRECONDITION, "does not accept video"
            )

        video_dir = fake_checkpoint(tmp_path / "video")
        engine = FakeEngine(family="llava_onevision", supports_video=True)
        async with serving(video_dir, engine) as harness:
            identity = harness.server.pipeline.identity
            frames = np.stack([np.full((6, 10, 3), 20 * i, np.uint8) for i in range(12)])
            item = common_pb2.MediaItem(video=common_pb2.Video(frames=encode_numpy(frames), num_frames=4))
            embedding = (await harness.encode(item)).results[0].embedding
            assert embedding.media_type == common_pb2.MEDIA_TYPE_VIDEO
            assert embedding.num_frames == 4 and (embedding.source_height, embedding.source_width) == (6, 10)
            assert embedding.content_id == media_ids.array_media_id(
                media_ids.VIDEO_FRAMES, frames, identity, num_frames=4
            )
            data = make_video(num_frames=12)
            item = common_pb2.MediaItem(video=common_pb2.Video(data=data))
            embedding = (await harness.encode(item)).results[0].embedding
            assert embedding.num_frames == 8  # the server default
            assert embedding.content_id == media_ids.encoded_media_id(
                media_ids.VIDEO_BYTES, data, identity, num_frames=8
            )
            too_many = common_pb2.MediaItem(video=common_pb2.Video(data=data, num_frames=65))
            await expect_error(harness.encode(too_many), INVALID, r"num_frames is 65.*max_video_frames")
            more_than_sent = common_pb2.MediaItem(
                video=common_pb2.Video(frames=encode_numpy(frames), num_frames=13)
            )
            await expect_error(harness.encode(more_than_sent), INVALID, "has only 12")

    run(scenario())


# -- URLs -----------------------------------------------------------------------------------------------


def test_urls_from_an_allow_listed_local_server(model_dir):
    async def scenario():
        png = _image(50)
        with media_server({"/cat.png": png}, slow_s=1.5) as web:
            _, networks = UrlPolicy.parse_allow_list(["127.0.0.1"])
            policy = UrlPolicy(allowed_networks=networks, read_timeout_s=0.3, total_timeout_s=2.0)
            async with serving(model_dir, url_policy=policy) as harness:
                response = await harness.encode(image_item(url=web.url("/cat.png")))
                expected = media_ids.encoded_media_id(
                    media_ids.IMAGE_BYTES, png, harness.server.pipeline.identity
                )
                assert response.results[0].embedding.content_id == expected
                assert response.timings.fetch_ms > 0
                # A redirect from the allowed server to a private address is refused at that hop.
                await expect_error(
                    harness.encode(image_item(url=web.url("/redirect?to=http://10.0.0.1/cat.png"))),
                    DENIED,
                    r"items\[0\]: URL host '10.0.0.1' resolves to 10.0.0.1, a private address",
                )
                await expect_error(
                    harness.encode(image_item(url=web.url("/slow"))),
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "url_read_timeout_s",
                )
                assert (await harness.encode(image_item(url=web.url("/cat.png")))).results[0].cached

    run(scenario())


# -- bad input: each answered with its status, and the server keeps serving ---------------------------


def _bad_requests(
    harness: Harness,
) -> list[tuple[str, encoder_service_pb2.EncodeRequest, grpc.StatusCode, str]]:
    png = _image(60)
    good_pixels = np.zeros((4, 4, 3), np.uint8)

    def req(*items, **fields):
        return encoder_service_pb2.EncodeRequest(items=list(items), **fields)

    def tensor(array: np.ndarray, **overrides) -> common_pb2.Tensor:
        message = encode_numpy(array)
        for key, value in overrides.items():
            if key == "shape":
                del message.shape[:]
                message.shape.extend(value)
            else:
                setattr(message, key, value)
        return message

    pixels = lambda t: common_pb2.MediaItem(image=common_pb2.Image(pixels_hwc_uint8=t))  # noqa: E731
    values = lambda t: common_pb2.MediaItem(image=common_pb2.Image(pixel_values=t))  # noqa: E731
    return [
        (
            "truncated png",
            req(image_item(png[: len(png) // 2])),
            INVALID,
            r"items\[0\]: image is truncated or corrupt",
        ),
        (
            "non-image bytes",
            req(image_item(b"%PDF-1.7 this is not an image" * 4)),
            INVALID,
            "not a supported image file",
        ),
        (
            "forged 20000x20000 bomb",
            req(image_item(png_with_header_size(20000, 20000))),
            INVALID,
            "max_image_pixels",
        ),
        (
            "compressed 20000x20000 bomb",
            req(image_item(compressed_bomb_png(20000, 20000))),
            INVALID,
            "max_image_pixels",
        ),
        ("zero-byte image", req(image_item(b"")), INVALID, r"image data is empty \(0 bytes\)"),
        ("0x0 image", req(image_item(png_with_header_size(0, 0))), INVALID, "zero width or height"),
        ("url 127.0.0.1", req(image_item(url="http://127.0.0.1/x.png")), DENIED, "loopback address"),
        ("url 10.0.0.1", req(image_item(url="http://10.0.0.1/x.png")), DENIED, "private address"),
        (
            "url metadata",
            req(image_item(url="http://169.254.169.254/latest/meta-data/")),
            DENIED,
            "cloud metadata",
        ),
        ("file url", req(image_item(url="file:///etc/passwd")), DENIED, "no media root"),
        (
            "gopher url",
            req(image_item(url="gopher://example.com/x")),
            DENIED,
            "scheme 'gopher' is not allowed",
        ),
        (
            "pixels wrong dtype",
            req(pixels(encode_numpy(good_pixels.astype(np.float32)))),
            INVALID,
            r"items\[0\].image.pixels_hwc_uint8.dtype: expected uint8, got float32",
        ),
        (
            "pixels wrong shape",
            req(pixels(encode_numpy(np.zeros((4, 4, 4), np.uint8)))),
            INVALID,
            r"pixels_hwc_uint8.shape: expected \[\*, \*, 3\]",
        ),
        (
            "pixels short data",
            req(pixels(tensor(good_pixels, data=b"\x00" * 5))),
            INVALID,
            "expected 48 bytes",
        ),
        (
            "pixels unspecified dtype",
            req(pixels(tensor(good_pixels, dtype=0))),
            INVALID,
            "DATA_TYPE_UNSPECIFIED",
        ),
        (
            "pixel_values wrong shape",
            req(values(encode_numpy(np.zeros((3, 5, 5), np.float32)))),
            INVALID,
            rf"pixel_values must have shape \[3, {SIDE}, {SIDE}\]",
        ),
        (
            "pixel_values wrong dtype",
            req(values(encode_numpy(np.zeros((3, SIDE, SIDE), np.int32)))),
            INVALID,
            "must be float32, float16 or bfloat16",
        ),
        ("too many images", req(*[image_item(png)] * 17), INVALID, r"17 items, over the limit of 16"),
        ("empty request", req(), INVALID, "no items"),
        ("item without media", req(common_pb2.MediaItem()), INVALID, r"items\[0\]: set image or video"),
        (
            "image without source",
            req(common_pb2.MediaItem(image=common_pb2.Image())),
            INVALID,
            "set one of data, url",
        ),
        (
            "bad output dtype",
            req(image_item(png), output_dtype=common_pb2.DATA_TYPE_UINT8),
            INVALID,
            "float output",
        ),
        ("second item bad", req(image_item(png), image_item(b"junk")), INVALID, r"items\[1\]"),
    ]


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            good = _image(61)
            expected = features(
                (await harness.encode(image_item(good), bypass_cache=True)).results[0].embedding
            )
            for name, request, code, pattern in _bad_requests(harness):
                details = await expect_error(harness.stub.Encode(request, timeout=30), code, pattern)
                assert "Traceback" not in details, name
                response = await harness.encode(image_item(good), bypass_cache=True)
                assert torch.equal(features(response.results[0].embedding), expected), name
            assert await harness.health() == SERVING

    run(scenario())


def test_engine_bugs_are_internal_and_the_server_keeps_serving(model_dir, caplog):
    async def scenario():
        async with serving(model_dir) as harness:
            harness.engine.fail_next = RuntimeError("secret /weights/path exploded")
            details = await expect_error(
                harness.encode(image_item(_image(70))), grpc.StatusCode.INTERNAL, "internal error"
            )
            assert "secret" not in details
            assert len((await harness.encode(image_item(_image(70)))).results) == 1

    run(scenario())


def test_request_summary_is_logged_without_media(model_dir, caplog):
    async def scenario():
        async with serving(model_dir) as harness:
            png = _image(80)
            with caplog.at_level("INFO", logger="encoder_service.service"):
                await harness.encode(image_item(url=data_uri(png)), request_id="req-42")
            lines = [r.getMessage() for r in caplog.records if r.name == "encoder_service.service"]
            assert len(lines) == 1 and "id=req-42" in lines[0] and "status=OK" in lines[0]
            assert base64.b64encode(png).decode()[:40] not in lines[0]

    run(scenario())


def test_drain_stops_serving_gracefully(model_dir):
    async def scenario():
        async with serving(model_dir) as harness:
            harness.engine.gate = threading.Event()
            in_flight = asyncio.ensure_future(harness.encode(image_item(_image(90))))
            await asyncio.sleep(0.2)
            draining = asyncio.ensure_future(harness.server.drain(grace_period_s=5.0))
            await asyncio.sleep(0.1)
            harness.engine.gate.set()
            assert len((await in_flight).results) == 1  # in-flight work finished during the drain
            await draining
            assert harness.server.running.is_draining

    run(scenario())


# -- the real tiny LLaVA checkpoint -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llava")


def test_real_llava_engine_end_to_end(llava_dir):
    from encoder_service.engines import load_visual_engine

    async def scenario():
        engine = load_visual_engine(llava_dir)
        async with serving(llava_dir, engine, max_batch_size=8, max_queue_delay_ms=20.0) as harness:
            pipeline = harness.server.pipeline
            images = [_image(200 + i, size=(40, 30)) for i in range(32)]
            batches_before = pipeline.num_model_batches
            concurrent = await asyncio.gather(*(harness.encode(image_item(png)) for png in images))
            assert pipeline.num_model_batches - batches_before < 32
            for png, response in zip(images[:4], concurrent[:4], strict=True):
                single = await harness.encode(image_item(png), bypass_cache=True)
                assert torch.equal(
                    features(single.results[0].embedding), features(response.results[0].embedding)
                )
            embedding = concurrent[0].results[0].embedding
            assert list(embedding.features.shape) == [engine.num_rows_per_image, engine.llm_hidden_size]

            # Same picture as bytes and as a data URI: same id, served from the cache without a model run.
            batches = pipeline.num_model_batches
            again = await harness.encode(image_item(url=data_uri(images[0])))
            assert again.results[0].cached and pipeline.num_model_batches == batches
            assert again.results[0].embedding.content_id == embedding.content_id

            # The engine's own features for the decoded picture, through its public interface.
            from PIL import Image

            from encoder_service.engines.base import MediaInput

            decoded = Image.open(__import__("io").BytesIO(images[0])).convert("RGB")
            direct = engine.encode([engine.preprocess(MediaInput(images=[decoded]))])[0].features
            assert torch.equal(features(embedding), direct)

            await expect_error(
                harness.encode(image_item(png_with_header_size(20000, 20000))), INVALID, "max_image_pixels"
            )
            assert len((await harness.encode(image_item(images[1]))).results) == 1

    run(scenario())


@pytest.mark.parametrize("family", ["blip2", "llava", "vila", "llava_onevision", "mllama"])
def test_real_engines_every_input_form_gives_the_same_embedding(tiny_checkpoint, family):
    from PIL import Image

    from encoder_service.engines import load_visual_engine
    from encoder_service.engines.base import MediaInput

    checkpoint = tiny_checkpoint(family)
    engine = load_visual_engine(checkpoint)
    png = _image(300, size=(45, 30))
    pixels = np.asarray(Image.open(__import__("io").BytesIO(png)).convert("RGB"))

    async def scenario():
        async with serving(checkpoint, engine) as harness:
            info = await harness.stub.GetModelInfo(
                encoder_service_pb2.EncoderServiceGetModelInfoRequest(), timeout=5
            )
            forms = [image_item(png), image_item(url=data_uri(png)), pixels_item(pixels)]
            if info.supports_pixel_values:
                prepared = engine.preprocess(MediaInput(images=[Image.fromarray(pixels)]))
                # what a client sends: the processor's float output (preprocess leaves uint8 pixels
                # that encode() normalises on the device)
                values = engine.pixel_normalization(prepared.pixel_values)[0].numpy()
                forms.append(common_pb2.MediaItem(image=common_pb2.Image(pixel_values=encode_numpy(values))))
            response = await harness.encode(*forms, bypass_cache=True)
            embeddings = [result.embedding for result in response.results]
            reference = features(embeddings[0])
            for embedding in embeddings[1:]:
                assert torch.equal(features(embedding), reference)
            assert embeddings[0].content_id == embeddings[1].content_id != embeddings[2].content_id
            first = embeddings[0]
            assert first.model_family == info.model_family != common_pb2.MODEL_FAMILY_UNSPECIFIED
            assert first.features.shape[-1] == info.llm_hidden_size
            assert (first.source_height, first.source_width) == (30, 45)
            if family == "mllama":
                assert first.kind == common_pb2.EMBEDDING_KIND_CROSS_ATTENTION
                assert info.embedding_kind == common_pb2.EMBEDDING_KIND_CROSS_ATTENTION
                num_images, max_tiles, num_patches, _ = first.features.shape
                assert num_images == 1 and first.num_prompt_tokens == 1
                assert first.num_rows == max_tiles * num_patches
                mask = decode_torch(first.aspect_ratio_mask)
                assert list(mask.shape) == [1, max_tiles] and int(mask.sum()) == first.num_tiles[0] >= 1
                assert list(decode_torch(first.aspect_ratio_ids).shape) == [1]
            else:
                assert first.kind == common_pb2.EMBEDDING_KIND_PROMPT_TABLE
                assert first.num_rows == first.num_prompt_tokens == first.features.shape[0]
                if info.num_rows_per_image:
                    assert first.num_rows == info.num_rows_per_image
            if family == "llava_onevision":
                assert first.num_patches >= 1 and info.num_rows_rule
                assert info.supports_video
                video = make_video(num_frames=10, width=32, height=24)
                item = common_pb2.MediaItem(video=common_pb2.Video(data=video, num_frames=3))
                embedding = (await harness.encode(item)).results[0].embedding
                assert embedding.media_type == common_pb2.MEDIA_TYPE_VIDEO and embedding.num_frames == 3
                assert embedding.num_rows == embedding.features.shape[0] > 0

    run(scenario())


def test_allow_list_config_parses_cidrs_and_hosts():
    hosts, networks = UrlPolicy.parse_allow_list(["127.0.0.1", "10.0.0.0/8", "Media.Local", "[::1]"])
    assert hosts == ("media.local",)
    assert networks == tuple(ipaddress.ip_network(n) for n in ("127.0.0.1/32", "10.0.0.0/8", "::1/128"))
