"""Content ids of images and videos, as the SDK, the encoder and the LLM service all compute them.

The kind tags and the preprocessing identity are part of the wire contract (protos/README.md):
changing either changes every id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlm_protocol.content_id import content_id_for_array, content_id_for_bytes

IMAGE_BYTES = "image"  # encoded file bytes (also a decoded data: URI or a fetched URL body)
IMAGE_PIXELS = "image/pixels_hwc_uint8"
IMAGE_PIXEL_VALUES = "image/pixel_values"
VIDEO_BYTES = "video"
VIDEO_FRAMES = "video/frames"


@dataclass(frozen=True)
class PreprocessingIdentity:
    """Everything besides the media that decides the embedding. Served by EncoderService.GetModelInfo."""

    model_family: str
    model_fingerprint: str
    processor_config_hash: str

    def as_mapping(self, *, num_frames: int | None = None, num_prompt_images: int | None = None) -> dict[str, str | int]:
        mapping: dict[str, str | int] = {
            "family": self.model_family,
            "model": self.model_fingerprint,
            "processor": self.processor_config_hash,
        }
        if num_frames is not None:
            mapping["num_frames"] = num_frames
        if num_prompt_images is not None:
            mapping["num_prompt_images"] = num_prompt_images
        return mapping


def prompt_images_key(family: str, num_prompt_images: int) -> int | None:
    """The `num_prompt_images` that enters a content id: only LLaVA-OneVision encodes an image
    differently in a multi-image prompt, so only there, and only above 1, is it part of the id."""
    return num_prompt_images if family == "llava_onevision" and num_prompt_images > 1 else None


def encoded_media_id(
    kind: str,
    data: bytes,
    identity: PreprocessingIdentity,
    *,
    num_frames: int | None = None,
    num_prompt_images: int | None = None,
) -> str:
    """Id of encoded media bytes; `kind` is IMAGE_BYTES or VIDEO_BYTES (then give num_frames)."""
    if kind not in (IMAGE_BYTES, VIDEO_BYTES):
        raise ValueError(f"kind must be {IMAGE_BYTES!r} or {VIDEO_BYTES!r}, got {kind!r}")
    mapping = identity.as_mapping(num_frames=num_frames, num_prompt_images=num_prompt_images)
    return content_id_for_bytes(kind, data, mapping)


def array_media_id(
    kind: str,
    array,
    identity: PreprocessingIdentity,
    *,
    num_frames: int | None = None,
    num_prompt_images: int | None = None,
) -> str:
    """Id of an array input; `kind` is IMAGE_PIXELS, IMAGE_PIXEL_VALUES or VIDEO_FRAMES."""
    if kind not in (IMAGE_PIXELS, IMAGE_PIXEL_VALUES, VIDEO_FRAMES):
        raise ValueError(f"kind must be an array kind, got {kind!r}")
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)
    mapping = identity.as_mapping(num_frames=num_frames, num_prompt_images=num_prompt_images)
    return content_id_for_array(kind, array, mapping)
