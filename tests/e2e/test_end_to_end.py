"""The whole path: both services as real subprocesses, the SDK (and the CLI, and the demo) as clients.

For every family the services start once (a module-scoped fixture parametrized by family) on free
loopback ports, serving the tiny checkpoint; the Hugging Face reference runs in this process on the
same checkpoint (fp32, CPU). Checked: greedy token ids equal HF ``generate()``, streamed deltas join to
the unary result, and an identical second request sends no tensor, hits the encoder cache and reuses
KV prefix blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import client_sdk
from client_sdk.convert import preprocessing_identity
from client_sdk.media import prepare_image
from vlm_demo.services import ServiceProcess, child_env, wait_until_serving

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("blip2", "llava", "vila", "llava_onevision", "mllama")
MAX_TOKENS = 10
STARTUP_TIMEOUT_S = 300.0

# (prompt, number of images) per family, as the engine parity tests use them; 0 images = text only.
CASES: dict[str, list[tuple[str, int]]] = {
    "blip2": [("Question: which city is this? Answer:", 1)],
    "llava": [
        ("USER: <image>\nWhat is shown in this picture? ASSISTANT:", 1),
        ("USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:", 2),
        ("USER: Tell me a story about a small robot. ASSISTANT:", 0),
    ],
    "vila": [
        ("A chat. USER: <image>\nDescribe the image. ASSISTANT:", 1),
        ("USER: <image>\n<image>\nWhat differs between these? ASSISTANT:", 2),
    ],
    "llava_onevision": [
        ("<|im_start|>user <image>\nWhat is this?<|im_end|><|im_start|>assistant\n", 1),
        # several images: OneVision encodes each as one crop, not anyres tiles (num_prompt_images)
        ("<|im_start|>user <image>\n<image>\nCompare them.<|im_end|><|im_start|>assistant\n", 2),
    ],
    "mllama": [("<|image|>If I had to write a haiku for this one", 1), ("Tell me about the sea", 0)],
}

# Long enough that the prompt fills at least one whole KV block (16 tokens), so a repeat can reuse it.
CACHE_PROMPTS = {
    "blip2": "Question: which city is shown in this photograph, and what is the weather like? Answer:",
    "llava": "USER: <image>\nDescribe every object in this picture in detail. ASSISTANT:",
    "vila": "A chat. USER: <image>\nDescribe every object in this picture in detail. ASSISTANT:",
    "llava_onevision": (
        "<|im_start|>user <image>\nDescribe every object in this picture in detail.<|im_end|><|im_start|>assistant\n"
    ),
    "mllama": "<|image|>Describe every object in this picture in detail, one sentence for each of them",
}


def make_images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    sizes = [(40, 48), (64, 30), (33, 70)]
    return [
        Image.fromarray((rng.rand(*sizes[(seed + i) % 3], 3) * 255).astype(np.uint8)) for i in range(count)
    ]


@dataclass
class Stack:
    family: str
    checkpoint: Path
    client: client_sdk.Client
    services: list[ServiceProcess]
    _hf: object | None = None
    _refs: dict = field(default_factory=dict)

    @property
    def hf(self):
        """The Hugging Face reference model of this family, loaded on first use."""
        if self._hf is None:
            from tests.engine.hf_reference import HFReference, VilaHFReference

            vila = self.family == "vila"
            self._hf = VilaHFReference(self.checkpoint) if vila else HFReference(self.family, self.checkpoint)
        return self._hf

    def reference(self, prompt: str, images: list[Image.Image], seed: int) -> list[int]:
        """HF greedy token ids for (prompt, images), computed once per case."""
        key = (prompt, seed, len(images))
        if key not in self._refs:
            self._refs[key] = self.hf.run(prompt, images or None, MAX_TOKENS).output_token_ids
        return self._refs[key]


# Tests that only make sense for some families; the others do not even start services for them.
FAMILIES_OF_TEST = {"test_onevision_video_matches_hf": ("llava_onevision",)}


def pytest_generate_tests(metafunc):
    # Always all families in the same order (pytest groups tests by parameter index, so every test of
    # a family shares one stack); families a test does not apply to are skipped before any set-up.
    if "stack" in metafunc.fixturenames:
        wanted = FAMILIES_OF_TEST.get(metafunc.function.__name__, FAMILIES)
        params = [
            pytest.param(
                family, marks=() if family in wanted else pytest.mark.skip(reason=f"not for {family}")
            )
            for family in FAMILIES
        ]
        metafunc.parametrize("stack", params, indirect=True, scope="module", ids=FAMILIES)


@pytest.fixture(scope="module")
def stack(request, tiny_checkpoint, tmp_path_factory):
    family = request.param
    checkpoint = tiny_checkpoint(family)
    log_dir = tmp_path_factory.mktemp(f"e2e-logs-{family}")
    services = [
        ServiceProcess("encoder", "encoder_service", checkpoint, log_dir / "encoder.log"),
        ServiceProcess("llm", "llm_service", checkpoint, log_dir / "llm.log"),
    ]
    try:
        for service in services:
            service.start()
        wait_until_serving(services, STARTUP_TIMEOUT_S)
        with client_sdk.Client(services[0].address, services[1].address, timeout_s=120) as client:
            yield Stack(family, checkpoint, client, services)
    finally:
        codes = {service.name: service.stop() for service in services}
    assert codes == {"encoder": 0, "llm": 0}, f"unclean shutdown {codes}; logs in {log_dir}"


def test_greedy_output_matches_hf(stack):
    for seed, (prompt, num_images) in enumerate(CASES[stack.family]):
        images = make_images(seed, num_images)
        result = stack.client.generate(prompt, images=images or None, max_tokens=MAX_TOKENS, temperature=0.0)
        expected = stack.reference(prompt, images, seed)
        assert list(result.token_ids) == expected, f"{stack.family} {prompt!r} ({num_images} images)"
        assert result.finish_reason in ("length", "stop")
        assert result.usage.completion_tokens == len(result.token_ids)


def test_onevision_video_matches_hf(stack):
    prompt = "<|im_start|>user <video>\nWhat happens in this video?<|im_end|><|im_start|>assistant\n"
    frames = (np.random.RandomState(3).rand(4, 36, 44, 3) * 255).astype(np.uint8)
    result = stack.client.generate(prompt, video=frames, max_tokens=MAX_TOKENS, temperature=0.0)
    expected = stack.hf.run(prompt, None, MAX_TOKENS, videos=[frames]).output_token_ids
    assert list(result.token_ids) == expected


def test_stream_deltas_join_to_the_unary_result(stack):
    prompt, num_images = CASES[stack.family][0]
    images = make_images(0, num_images)
    unary = stack.client.generate(prompt, images=images, max_tokens=MAX_TOKENS, temperature=0.0)
    deltas = list(
        stack.client.generate(prompt, images=images, stream=True, max_tokens=MAX_TOKENS, temperature=0.0)
    )
    assert all(isinstance(d.text, str) and isinstance(d.token_ids, tuple) for d in deltas)
    assert [d.finish_reason is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    joined = client_sdk.join_deltas(deltas)
    assert joined.token_ids == unary.token_ids
    assert joined.text == unary.text
    assert joined.finish_reason == unary.finish_reason
    last = deltas[-1]
    assert last.usage.completion_tokens == len(unary.token_ids)
    assert 0 < last.timings.time_to_first_token_ms <= last.timings.total_ms


def test_identical_second_request_uses_every_cache(stack):
    prompt = CACHE_PROMPTS[stack.family]
    image = make_images(1000 + FAMILIES.index(stack.family), 1)
    first = stack.client.generate(prompt, images=image, max_tokens=4, temperature=0.0)
    # a client without the LLM-first shortcut asks the encoder first: its cache hits
    encoder_address, llm_address = (service.address for service in stack.services)
    with client_sdk.Client(encoder_address, llm_address, timeout_s=120, held_ids_capacity=0) as via_encoder:
        second = via_encoder.generate(prompt, images=image, max_tokens=4, temperature=0.0)
    # the first client remembers that the LLM service accepted the id: it skips the encoder
    third = stack.client.generate(prompt, images=image, max_tokens=4, temperature=0.0)
    assert (first.encoder_cache_hits, first.tensors_uploaded) == (
        0,
        1,
    )  # a new picture: encoded, uploaded once
    assert not first.encoder_skipped
    assert second.encoder_cache_hits == 1 and not second.encoder_skipped
    assert second.tensors_uploaded == 0
    assert second.usage.cached_prompt_tokens > 0
    assert third.encoder_skipped and third.encoder_cache_hits == 0 and third.tensors_uploaded == 0
    assert third.usage.cached_prompt_tokens > 0
    assert second.token_ids == first.token_ids == third.token_ids
    # the id the SDK computed locally is the one the encoder served (so the look-up could hit)
    info = stack.client.encoder_info()
    local_id = prepare_image(image[0]).content_id(preprocessing_identity(info))
    assert second.content_ids == third.content_ids == (local_id,)


def test_text_only_needs_no_encoder(stack):
    prompt = {"mllama": "Tell me about the sea"}.get(stack.family, "USER: Name three colours. ASSISTANT:")
    with client_sdk.Client("127.0.0.1:1", stack.services[1].address, timeout_s=60) as client:
        result = client.generate(prompt, max_tokens=3, temperature=0.0)
    assert len(result.token_ids) >= 1 and result.encoder_cache_hits == 0 and result.timings.encode_ms == 0.0


def test_async_client_agrees(stack):
    import asyncio

    prompt, num_images = CASES[stack.family][0]
    images = make_images(0, num_images)
    expected = stack.client.generate(prompt, images=images, max_tokens=MAX_TOKENS, temperature=0.0)

    async def main():
        async with client_sdk.AsyncClient(stack.services[0].address, stack.services[1].address) as client:
            unary = await client.generate(prompt, images=images, max_tokens=MAX_TOKENS, temperature=0.0)
            deltas = [
                d
                async for d in client.generate(
                    prompt, images=images, stream=True, max_tokens=MAX_TOKENS, temperature=0.0
                )
            ]
            return unary, client_sdk.join_deltas(deltas)

    unary, joined = asyncio.run(main())
    assert unary.token_ids == joined.token_ids == expected.token_ids


def test_cli_against_the_services(stack, tmp_path):
    image_path = tmp_path / "picture.png"
    make_images(7, 1)[0].save(image_path)
    command = [
        sys.executable,
        "-m",
        "client_sdk",
        "--text",
        "What is shown?",
        "--image",
        str(image_path),
        "--request-output-len",
        "5",
        "--temperature",
        "0",
        "--streaming",
        "--encoder-address",
        stack.services[0].address,
        "--llm-address",
        stack.services[1].address,
    ]
    run = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "time to first token:" in run.stdout and "total latency:" in run.stdout
    bad = subprocess.run(
        [*command[:5], "--image", str(tmp_path / "missing.png"), "--llm-address", stack.services[1].address],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_demo_smoke(tmp_path):
    """`python -m vlm_demo` builds (or reuses) the tiny checkpoint, serves it, answers twice, exits 0."""
    cache = (
        Path(os.environ["VLM_TINY_CACHE"]) / "demo" if os.environ.get("VLM_TINY_CACHE") else tmp_path / "tiny"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_demo",
            "--family",
            "llava",
            "--max-tokens",
            "8",
            "--cache-dir",
            str(cache),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "random weights" in out
    assert out.count("A: ") == 2 and "time to first token:" in out
    # request 2 skips the encoder (LLM-first shortcut: the LLM service accepted the picture's id), so the
    # demo's "encoder cache hit" reads "no"; the summary of request 2 (only) says why
    assert out.count("encoder skipped: the LLM service held every content id") == 1
    assert "encoder: skipped (the LLM service still held the embedding)" in out
    assert "embeddings uploaded: 1 then 0" in out
    assert "encoder exited with code 0" in out and "llm exited with code 0" in out
    # both services leave their start-up objects out of garbage collection once serving
    for log, owner in (("encoder.log", "encoder service: "), ("llm.log", "llm service: ")):
        lines = (tmp_path / "logs" / log).read_text().splitlines()
        assert any(owner in line and "frozen out of garbage collection" in line for line in lines), log
