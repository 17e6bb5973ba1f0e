"""EncoderService with EMBEDDING_TRANSPORT_SHARED_MEMORY: features written into its /dev/shm ring.

Real gRPC on 127.0.0.1 with the fast fake engine (tests/encoder/fakes.py); the slices are read back with
the LLM service's reader and compared with the bytes transport bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from vlm.v1 import common_pb2, encoder_service_pb2

from encoder_service.__main__ import parse_config
from encoder_service.config import MediaLimits
from tests.encoder.fakes import fake_checkpoint
from tests.encoder.test_encoder_service import _image, expect_error, image_item, run, serving
from vlm_protocol import shared_memory as shm
from vlm_protocol.errors import SHARED_MEMORY_UNAVAILABLE_METADATA_KEY
from vlm_protocol.shared_memory import SharedMemoryReader
from vlm_protocol.tensor_codec import decode_torch

pytestmark = pytest.mark.skipif(not shm.SHM_DIRECTORY.is_dir(), reason="no /dev/shm on this host")

BYTES = common_pb2.EMBEDDING_TRANSPORT_BYTES
SHARED = common_pb2.EMBEDDING_TRANSPORT_SHARED_MEMORY
MiB = 1024 * 1024


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return fake_checkpoint(tmp_path / "fake-llava")


@pytest.fixture
def reader():
    r = SharedMemoryReader()
    yield r
    r.close()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def test_without_a_ring_shared_memory_is_failed_precondition(model_dir):
    async def scenario():
        async with serving(model_dir) as h:
            info = await h.stub.GetModelInfo(
                encoder_service_pb2.EncoderServiceGetModelInfoRequest(), timeout=5
            )
            assert not info.shared_memory_available
            call = h.stub.Encode(
                encoder_service_pb2.EncodeRequest(items=[image_item(_image(0))], output_transport=SHARED),
                timeout=30,
            )
            await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, r"--shared-memory-mb")
            trailer = dict(await call.trailing_metadata())
            assert SHARED_MEMORY_UNAVAILABLE_METADATA_KEY in trailer  # the SDK's auto mode falls back on it
            assert h.engine.num_encode_calls == 1  # the warm-up only: refused before any encoding
            # bytes (explicit or unset) still work
            for transport in (BYTES, common_pb2.EMBEDDING_TRANSPORT_UNSPECIFIED):
                response = await h.encode(image_item(_image(0)), output_transport=transport)
                assert response.results[0].embedding.features.data

    run(scenario())


@pytest.mark.parametrize("output_dtype", ["float32", "float16", "bfloat16"])
def test_features_go_through_the_ring_bit_exact(model_dir, reader, output_dtype):
    dtype = {"float32": common_pb2.DATA_TYPE_FLOAT32, "float16": common_pb2.DATA_TYPE_FLOAT16}.get(
        output_dtype, common_pb2.DATA_TYPE_BFLOAT16
    )

    async def scenario():
        async with serving(model_dir, shared_memory_bytes=4 * MiB) as h:
            ring = h.server.shared_memory
            assert ring is not None and ring.path.exists()
            info = await h.stub.GetModelInfo(
                encoder_service_pb2.EncoderServiceGetModelInfoRequest(), timeout=5
            )
            assert info.shared_memory_available
            items = [image_item(_image(1)), image_item(_image(2))]
            by_bytes = await h.encode(*items, output_dtype=dtype, output_transport=BYTES)
            by_shm = await h.encode(*items, output_dtype=dtype, output_transport=SHARED)
            generations = []
            for plain, shared in zip(by_bytes.results, by_shm.results, strict=True):
                features = shared.embedding.features
                assert shared.cached  # the second request hit the cache: hits go through the ring too
                assert features.HasField("shared_memory") and features.data == b""
                assert features.shared_memory.region == ring.name
                assert features.dtype == plain.embedding.features.dtype
                assert list(features.shape) == list(plain.embedding.features.shape)
                generations.append(features.shared_memory.generation)
                expected = decode_torch(plain.embedding.features)
                got = decode_torch(features, shared_memory=reader)
                assert torch.equal(_bits(got), _bits(expected))
                # the rest of the Embedding is the same whichever way the features travel
                a, b = common_pb2.Embedding(), common_pb2.Embedding()
                a.CopyFrom(plain.embedding)
                b.CopyFrom(shared.embedding)
                a.ClearField("features")
                b.ClearField("features")
                assert a == b
            assert len(set(generations)) == 2

            # LookupEmbeddings(return_embeddings) always returns bytes
            lookup = await h.stub.LookupEmbeddings(
                encoder_service_pb2.LookupEmbeddingsRequest(
                    content_ids=[r.embedding.content_id for r in by_shm.results], return_embeddings=True
                ),
                timeout=10,
            )
            assert all(
                e.features.data and not e.features.HasField("shared_memory") for e in lookup.embeddings
            )
        assert not ring.path.exists()  # the server unlinked its region when it stopped

    run(scenario())


def test_items_that_would_overwrite_the_same_response_go_as_bytes(model_dir, reader):
    # Fake features are [4, 6] float32 = 96 bytes, 192 bytes per slot: a 4 KiB ring holds 21 of them.
    async def scenario():
        async with serving(
            model_dir, shared_memory_bytes=4096, limits=MediaLimits(max_items_per_request=32)
        ) as h:
            items = [image_item(_image(100 + i)) for i in range(30)]
            response = await h.encode(*items, output_transport=SHARED)
            shared = [r for r in response.results if r.embedding.features.HasField("shared_memory")]
            plain = [r for r in response.results if not r.embedding.features.HasField("shared_memory")]
            assert len(shared) == 4096 // 192 and len(plain) == 30 - len(shared)
            for result in shared:  # none was overwritten by a later item of the same response
                assert decode_torch(result.embedding.features, shared_memory=reader).shape == (4, 6)
            assert all(r.embedding.features.data for r in plain)

    run(scenario())


def test_unknown_transport_value_is_invalid_argument(model_dir):
    async def scenario():
        async with serving(model_dir, shared_memory_bytes=MiB) as h:
            call = h.stub.Encode(
                encoder_service_pb2.EncodeRequest(items=[image_item(_image(0))], output_transport=7),
                timeout=30,
            )
            await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, r"output_transport 7")

    run(scenario())


def test_shared_memory_flag_and_environment(model_dir, monkeypatch):
    config, _ = parse_config(["--model", str(model_dir), "--shared-memory-mb", "64"], environ={})
    assert config.shared_memory_bytes == 64 * MiB
    config, _ = parse_config(["--model", str(model_dir)], environ={"VLM_ENCODER_SHARED_MEMORY_MB": "8"})
    assert config.shared_memory_bytes == 8 * MiB
    config, _ = parse_config(["--model", str(model_dir)], environ={})
    assert config.shared_memory_bytes == 0
    with pytest.raises(SystemExit):
        parse_config(["--model", str(model_dir), "--shared-memory-mb", "-1"], environ={})


def test_a_too_small_dev_shm_fails_the_start_clearly(model_dir, monkeypatch, caplog):
    import errno
    import os

    from encoder_service.__main__ import main

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shm.os, "posix_fallocate", no_space)
    loaded = []
    monkeypatch.setattr("encoder_service.server.load_engine", lambda config: loaded.append(config))
    assert main(["--model", str(model_dir), "--port", "0", "--shared-memory-mb", "64"]) == 1
    assert loaded == []  # failed before the model was loaded
    assert "cannot reserve 64 MiB of shared memory" in caplog.text and "shm_size" in caplog.text
