"""Media content ids: kinds and preprocessing identity are part of the id."""

import numpy as np

from vlm_protocol.media_ids import (
    IMAGE_BYTES,
    IMAGE_PIXELS,
    VIDEO_BYTES,
    PreprocessingIdentity,
    array_media_id,
    encoded_media_id,
    prompt_images_key,
)

IDENTITY = PreprocessingIdentity("llava_onevision", "b3:model", "b3:processor")


def test_prompt_image_count_only_keys_onevision_multi_image_prompts():
    assert prompt_images_key("llava_onevision", 1) is None
    assert prompt_images_key("llava_onevision", 3) == 3
    assert prompt_images_key("llava", 3) is None  # other families encode an image the same way anywhere


def test_every_identity_part_changes_the_id():
    data = b"\x89PNG not really"
    base = encoded_media_id(IMAGE_BYTES, data, IDENTITY)
    assert base == encoded_media_id(IMAGE_BYTES, data, PreprocessingIdentity(*IDENTITY.__dict__.values()))
    variants = {
        encoded_media_id(IMAGE_BYTES, data, IDENTITY, num_prompt_images=2),
        encoded_media_id(IMAGE_BYTES, data, PreprocessingIdentity("llava", "b3:model", "b3:processor")),
        encoded_media_id(IMAGE_BYTES, data, PreprocessingIdentity("llava_onevision", "b3:other", "b3:processor")),
        encoded_media_id(IMAGE_BYTES, data, PreprocessingIdentity("llava_onevision", "b3:model", "b3:other")),
        encoded_media_id(VIDEO_BYTES, data, IDENTITY, num_frames=8),
        encoded_media_id(VIDEO_BYTES, data, IDENTITY, num_frames=4),
    }
    assert base not in variants and len(variants) == 6


def test_array_ids_ignore_memory_layout_but_not_values():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    fortran = np.asfortranarray(pixels)
    assert array_media_id(IMAGE_PIXELS, pixels, IDENTITY) == array_media_id(IMAGE_PIXELS, fortran, IDENTITY)
    changed = pixels.copy()
    changed[0, 0, 0] += 1
    assert array_media_id(IMAGE_PIXELS, pixels, IDENTITY) != array_media_id(IMAGE_PIXELS, changed, IDENTITY)
