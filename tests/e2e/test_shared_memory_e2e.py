"""The shared-memory embedding transport between real service processes (tiny LLaVA, CPU).

The encoder runs with ``--shared-memory-mb``; the LLM service maps its region from another process. The
SDK's ``shared_memory`` transport must give the tokens of ``bytes``, and the encoder must unlink its
region when SIGTERM drains it.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import client_sdk
from vlm_demo.services import ServiceProcess, wait_until_serving
from vlm_protocol import shared_memory as shm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shm.SHM_DIRECTORY.is_dir(), reason="no /dev/shm on this host"),
]

PROMPT = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"


def _regions() -> set[str]:
    return {name for name in shm.os.listdir(shm.SHM_DIRECTORY) if shm.is_region_name(name)}


def test_shared_memory_between_processes(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llava")
    before = _regions()
    services = [
        ServiceProcess(
            "encoder",
            "encoder_service",
            checkpoint,
            tmp_path / "encoder.log",
            extra_args=["--shared-memory-mb", "8"],
        ),
        # no embedding cache and no KV prefix reuse: the bytes run below must use the bytes it is sent
        ServiceProcess(
            "llm",
            "llm_service",
            checkpoint,
            tmp_path / "llm.log",
            extra_args=["--embedding-cache-bytes", "0", "--no-prefix-caching"],
        ),
    ]
    try:
        for service in services:
            service.start()
        wait_until_serving(services, 300)
        regions = _regions() - before
        assert len(regions) == 1, regions  # the encoder's ring
        (region,) = regions
        assert region.startswith(f"vlm-emb-{services[0].process.pid}-")
        rng = np.random.RandomState(7)
        images = [Image.fromarray((rng.rand(40, 48, 3) * 255).astype(np.uint8)) for _ in range(2)]
        tokens = {}
        for transport, image in (("shared_memory", images[0]), ("auto", images[1])):
            with client_sdk.Client(
                services[0].address, services[1].address, timeout_s=120, embedding_transport=transport
            ) as client:
                sent = []
                original = client._call

                def recording(which, method, request, *args, _sent=sent, _original=original):
                    if method == "Generate":
                        _sent.append(request)
                    return _original(which, method, request, *args)

                client._call = recording
                result = client.generate(PROMPT, images=[image], max_tokens=6, temperature=0.0)
                features = sent[0].multimodal_inputs[0].embedding.features
                assert features.shared_memory.region == region and features.data == b""
                assert len(sent) == 1 and not client._transport.disabled
                tokens[transport] = result.token_ids
        # the same images as bytes (the encoder holds them: ids first, NOT_FOUND, then the bytes)
        with client_sdk.Client(
            services[0].address, services[1].address, timeout_s=120, embedding_transport="bytes"
        ) as client:
            for transport, image in (("shared_memory", images[0]), ("auto", images[1])):
                plain = client.generate(PROMPT, images=[image], max_tokens=6, temperature=0.0)
                assert plain.tensors_uploaded == 1 and plain.token_ids == tokens[transport]
    finally:
        codes = {service.name: service.stop() for service in services}
    assert codes == {"encoder": 0, "llm": 0}, codes
    assert _regions() - before == set(), "the encoder unlinks its region when it stops"
