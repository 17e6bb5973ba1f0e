"""Rescale + normalize on the engine's device (`PixelNormalization`) for the single-crop families.

`preprocess` stops the HF image processor after resize/crop (uint8); `encode` applies the rescale and
normalize. What the tower gets must be the processor's own float output, and a batch that mixes
images with client pixel_values (already normalised) must treat each row as it would alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from encoder_service.engines import MediaInput, load_visual_engine
from encoder_service.engines.base import PixelNormalization
from encoder_service.hf_processors import load_processor

FAMILIES = ["blip2", "llava", "vila"]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


IMAGES = [_image(40, 48, 1), _image(64, 30, 2), _image(100, 100, 3), _image(45, 70, 4)]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engines: dict[tuple[str, torch.dtype], object] = {}

    def get(family: str, dtype: torch.dtype = torch.float32):
        if (family, dtype) not in engines:
            engines[family, dtype] = load_visual_engine(tiny_checkpoint(family), dtype=dtype)
        return engines[family, dtype]

    return get


def _hf_pixel_values(family: str, checkpoint: Path, images: list[Image.Image]) -> torch.Tensor:
    """HF's full image processor (resize, crop, rescale, normalize): float32 [n, 3, S, S]."""
    if family == "vila":  # VILA squashes to the tower's square first ("resize" mode), then SigLIP's processor
        processor = AutoImageProcessor.from_pretrained(checkpoint / "vision_tower")
        side = processor.size["height"]
        images = [image.resize((side, side), Image.Resampling.BICUBIC) for image in images]
    else:
        processor = load_processor(checkpoint).image_processor
    return processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("family", FAMILIES)
def test_device_normalized_pixels_equal_the_processor_output(engine, tiny_checkpoint, family):
    eng = engine(family)
    prepared = eng.preprocess(MediaInput(images=IMAGES))
    assert prepared.pixel_values.dtype == torch.uint8  # the CPU did no float math
    ours = eng._tower_batch([prepared])  # what the tower gets: [n, 3, S, S]
    reference = _hf_pixel_values(family, tiny_checkpoint(family), IMAGES)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_engine_gets_the_float32_result_rounded(engine, family):
    prepared = engine(family).preprocess(MediaInput(images=IMAGES))
    full = engine(family)._tower_batch([prepared])
    low = engine(family, torch.bfloat16)._tower_batch([prepared])
    assert low.dtype == torch.bfloat16 and torch.equal(low, full.to(torch.bfloat16))


@pytest.mark.parametrize(("do_rescale", "do_normalize"), [(False, True), (True, False), (False, False)])
def test_processor_flags_are_respected(tiny_checkpoint, tmp_path, do_rescale, do_normalize):
    checkpoint = shutil.copytree(tiny_checkpoint("llava"), tmp_path / "llava")
    config_path = checkpoint / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config.update(do_rescale=do_rescale, do_normalize=do_normalize)
    config_path.write_text(json.dumps(config))
    eng = load_visual_engine(checkpoint)
    prepared = eng.preprocess(MediaInput(images=IMAGES[:2]))
    reference = _hf_pixel_values("llava", checkpoint, IMAGES[:2]).float()
    torch.testing.assert_close(eng._tower_batch([prepared]), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_mixing_images_and_pixel_values(engine, tiny_checkpoint, family):
    eng = engine(family)
    checkpoint = tiny_checkpoint(family)
    # images, client pixel_values (HF's float output), two images, pixel_values again
    groups = [IMAGES[:1], IMAGES[1:2], IMAGES[2:4], IMAGES[3:4]]
    from_pixel_values = {1, 3}
    batch = [
        eng.preprocess(
            MediaInput(pixel_values=_hf_pixel_values(family, checkpoint, group))
            if index in from_pixel_values
            else MediaInput(images=group)
        )
        for index, group in enumerate(groups)
    ]
    assert [p.pixel_values.dtype for p in batch] == [torch.uint8, torch.float32, torch.uint8, torch.float32]
    # the tower batch: every row as HF's processor makes it, in batch order (pixel_values not normalised twice)
    reference = torch.cat([_hf_pixel_values(family, checkpoint, group) for group in groups])
    torch.testing.assert_close(eng._tower_batch(batch), reference, atol=1e-6, rtol=0)
    # the embeddings: as the old path (processor output as pixel_values) gives for each item alone
    mixed = eng.encode(batch)
    alone = [
        out
        for group in groups
        for out in eng.encode(
            [eng.preprocess(MediaInput(pixel_values=_hf_pixel_values(family, checkpoint, group)))]
        )
    ]
    assert [(o.input_index, o.item_index) for o in mixed] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert len(mixed) == len(alone)
    for together, single in zip(mixed, alone, strict=True):
        assert together.features.shape == single.features.shape
        # bit-identical on some CPUs; other BLAS builds pick other kernels per batch size
        assert (together.features - single.features).abs().max().item() <= 1e-5


def test_normalization_table_follows_hf_math():
    normalization = PixelNormalization(rescale_factor=1 / 255, image_mean=[0.5, 0.4, 0.3], image_std=0.25)
    pixels = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1, 1)  # [2, 3, 1, 256]
    got = normalization(pixels)  # [2, 3, 1, 256]
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # HF rescales in float64
    mean = np.array([0.5, 0.4, 0.3], np.float32)[:, None, None]
    expected = (rescaled[None, None, :] - mean) / np.float32(0.25)  # [3, 1, 256], float32 as HF
    assert torch.equal(got, torch.from_numpy(expected)[None].expand(2, -1, -1, -1))
    identity = PixelNormalization(rescale_factor=None, image_mean=None, image_std=None)
    assert torch.equal(identity(pixels), pixels.float())
    with pytest.raises(ValueError, match="uint8"):
        normalization(pixels.float())


@pytest.mark.parametrize("family", FAMILIES)
def test_native_size_images_skip_the_processor_with_the_same_pixels(tiny_checkpoint, family):
    """An RGB image already at the crop size: the processor's resize and crop are the identity, so its
    pixels are taken directly (after one check against the processor) and the tower batch is what
    HF's processor gives. Other sizes go through the processor (VILA squares every image to the crop
    size itself first, so all of its images take the direct path)."""
    eng = load_visual_engine(tiny_checkpoint(family))
    side = eng.image_size
    native = [_image(side, side, 7), _image(side, side, 8)]
    calls = []
    resize_and_crop = eng._resize_and_crop
    eng._resize_and_crop = lambda images: calls.append(len(images)) or resize_and_crop(images)
    first = eng.preprocess(MediaInput(images=native[:1]))
    both = eng.preprocess(MediaInput(images=native))
    assert eng._native_size_exact is True and calls == [1]  # only the one-time check ran the processor
    reference = _hf_pixel_values(family, tiny_checkpoint(family), native)
    torch.testing.assert_close(eng._tower_batch([both]), reference, atol=1e-6, rtol=0)
    assert torch.equal(first.pixel_values, both.pixel_values[:1]) and both.pixel_values.dtype == torch.uint8
    eng.preprocess(MediaInput(images=[_image(side + 1, side, 9)]))  # not native: the processor...
    assert calls == ([1] if family == "vila" else [1, 1])  # ...except VILA's, squared to the side first


def test_native_size_fast_path_stays_off_when_the_processor_changes_pixels(tiny_checkpoint):
    eng = load_visual_engine(tiny_checkpoint("llava"))
    side = eng.image_size
    resize_and_crop = eng._resize_and_crop
    eng._resize_and_crop = lambda images: resize_and_crop(images) // 2  # a processor that is no identity
    image = _image(side, side, 10)
    for _ in range(2):
        prepared = eng.preprocess(MediaInput(images=[image]))
        assert eng._native_size_exact is False
        assert torch.equal(prepared.pixel_values, resize_and_crop([image]) // 2)
