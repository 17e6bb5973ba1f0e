"""Greedy parity with Hugging Face `generate()` for every family, under in-flight batching.

Each case runs alone through HF (batch of one, fp32, CPU). Our engine then runs 1, 3 or 16 such
requests together, arriving at different steps, with the prefill chunk forced down to 7 tokens and
small KV blocks, and must produce the same token ids for every request.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from llm_service.engine.engine_core import EngineConfig, EngineCore, GenerationInput
from llm_service.engine.sampling_params import SamplingParams

MAX_NEW_TOKENS = 10
VIDEO_FRAMES = -4  # a case with this "image count" is a 4-frame video instead

# (prompt, number of images) per family; 0 images = text only; VIDEO_FRAMES = a video
CASES = {
    "llava": [
        ("USER: <image>\nWhat is shown in this picture? ASSISTANT:", 1),
        ("USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:", 2),
        ("USER: Tell me a story about a small robot. ASSISTANT:", 0),
    ],
    "blip2": [
        ("Question: which city is this? Answer:", 1),
        ("a picture of", 1),
    ],
    "vila": [
        ("A chat. USER: <image>\nDescribe the image. ASSISTANT:", 1),
        ("USER: <image>\n<image>\nWhat differs between these? ASSISTANT:", 2),
        ("USER: Write a short poem about rain. ASSISTANT:", 0),
    ],
    "llava_onevision": [
        ("<|im_start|>user <image>\nWhat is this?<|im_end|><|im_start|>assistant\n", 1),
        ("<|im_start|>user <image>\n<image>\nCompare them.<|im_end|><|im_start|>assistant\n", 2),
        ("<|im_start|>user Name three colours.<|im_end|><|im_start|>assistant\n", 0),
        ("<|im_start|>user <video>\nWhat happens in this video?<|im_end|><|im_start|>assistant\n", VIDEO_FRAMES),
    ],
    "mllama": [
        ("<|image|>If I had to write a haiku for this one", 1),
        ("<|begin_of_text|>The weather today is", 0),
        ("Tell me about the sea", 0),
    ],
}


def _images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    sizes = [(40, 48), (64, 30), (33, 70)]
    return [
        Image.fromarray((rng.rand(*sizes[(seed + i) % 3], 3) * 255).astype(np.uint8)) for i in range(count)
    ]


def _video_frames(seed: int, count: int) -> list[Image.Image]:
    """Frames of one video: all the same size (HF's video processor requires it)."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(36, 44, 3) * 255).astype(np.uint8)) for _ in range(count)]


def run_case(hf, seed: int, prompt: str, num_images: int, max_new_tokens: int):
    """HF reference of one CASES entry (images, a video, or text only)."""
    if num_images == VIDEO_FRAMES:
        return hf.run(prompt, None, max_new_tokens, videos=[_video_frames(seed, -VIDEO_FRAMES)])
    return hf.run(prompt, _images(seed, num_images) or None, max_new_tokens)


def _run_engine(
    ckpt, cases, num_requests: int, prepare=None, **engine_kwargs
) -> tuple[EngineCore, dict[str, list[int]]]:
    """`prepare(engine)`, if given, runs once before the first request (e.g. to switch a runner path on)."""
    engine = EngineCore(
        EngineConfig(
            model_dir=str(ckpt),
            block_size=engine_kwargs.pop("block_size", 4),
            max_prefill_chunk_tokens=engine_kwargs.pop("max_prefill_chunk_tokens", 7),
            max_num_batched_tokens=engine_kwargs.pop("max_num_batched_tokens", 64),
            max_num_seqs=engine_kwargs.pop("max_num_seqs", 16),
            **engine_kwargs,
        )
    )
    if prepare is not None:
        prepare(engine)
    pending = [(f"req-{i}", cases[i % len(cases)]) for i in range(num_requests)]
    outputs: dict[str, list[int]] = {rid: [] for rid, _ in pending}
    for step in itertools.count():
        # one new request every other step, so arrivals interleave with prefill and decode
        if pending and step % 2 == 0:
            rid, (prompt, ref) = pending.pop(0)
            request = engine.add_request(
                GenerationInput(
                    rid,
                    prompt=prompt,
                    embeddings=ref.embeddings,
                    sampling=SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0),
                )
            )
            assert list(request.prompt_token_ids) == ref.prompt_token_ids, "prompt tokenization differs from HF"
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        if not pending and not engine.has_unfinished_requests():
            return engine, outputs
        assert step < 10_000


FAMILIES = list(CASES)


@pytest.mark.parametrize("num_requests", [1, 3, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf(references, family, num_requests):
    ckpt, cases = references(family)
    # with one request, run every case one at a time; otherwise mix them
    runs = [[case] for case in cases] if num_requests == 1 else [cases]
    for run_cases in runs:
        _, outputs = _run_engine(ckpt, run_cases, num_requests if num_requests > 1 else 1)
        for i, (rid, tokens) in enumerate(sorted(outputs.items(), key=lambda kv: int(kv[0].split("-")[1]))):
            prompt, ref = run_cases[i % len(run_cases)]
            assert tokens == ref.output_token_ids, f"{family} {rid} ({prompt!r})"
            if len(tokens) == MAX_NEW_TOKENS:  # (a reference may also end early on EOS)
                assert len(set(tokens)) >= 3, "degenerate reference: the tiny checkpoint repeats one token"


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_attention_backend_matches_hf(references, family):
    """The per-sequence attention kept behind `attention_backend="reference"` stays exact too."""
    ckpt, cases = references(family)
    _, outputs = _run_engine(ckpt, cases, 3, attention_backend="reference")
    for i, (rid, tokens) in enumerate(sorted(outputs.items(), key=lambda kv: int(kv[0].split("-")[1]))):
        assert tokens == cases[i % len(cases)][1].output_token_ids, f"{family} {rid}"
