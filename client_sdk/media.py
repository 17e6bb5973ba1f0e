"""Client-side media intake: what users pass as images and videos -> wire form + local content id.

Images: file paths, encoded bytes, PIL images, numpy uint8 arrays ([H, W, 3]; [H, W], [H, W, 1] and
[H, W, 4] are converted to RGB), http(s) URLs and ``data:`` URIs. Videos: file paths, encoded bytes,
URLs, uint8 frames [T, H, W, 3] or a list of frames. Nothing is fetched or decoded here: URLs go to
the encoder service, which fetches them under its URL policy, so their content id is only known
from the encoder's answer.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from vlm.v1 import common_pb2

from client_sdk.errors import InvalidArgumentError
from vlm_protocol.media_ids import (
    IMAGE_BYTES,
    IMAGE_PIXELS,
    VIDEO_BYTES,
    VIDEO_FRAMES,
    PreprocessingIdentity,
    array_media_id,
    encoded_media_id,
    prompt_images_key,
)
from vlm_protocol.tensor_codec import encode_numpy

ImageInput = str | Path | bytes | Image.Image | np.ndarray
VideoInput = str | Path | bytes | np.ndarray | Sequence[Image.Image | np.ndarray]

IMAGE = "image"
VIDEO = "video"
_URL_PREFIXES = ("http://", "https://")
_DATA_URI_PREFIX = "data:"


@dataclass(frozen=True)
class PreparedMedia:
    """One image or video in wire form, with what its content id is computed from.

    ``payload`` is the encoded bytes or the canonical array the id covers; ``None`` for URLs, whose
    id the encoder computes after fetching. ``num_frames`` is what the client asked for (0 = default).
    """

    media_type: str
    item: common_pb2.MediaItem
    id_kind: str | None
    payload: bytes | np.ndarray | None
    num_frames: int = 0

    @property
    def is_url(self) -> bool:
        return self.payload is None

    def content_id(
        self, identity: PreprocessingIdentity, *, default_num_frames: int = 0, num_prompt_images: int = 1
    ) -> str | None:
        """The id the encoder will give this item, or None for URLs (known only after fetching).

        `num_prompt_images` is the number of images in the prompt (LLaVA-OneVision encodes an image
        differently when it is not alone)."""
        if self.payload is None or self.id_kind is None:
            return None
        prompt_images = None
        if self.media_type != VIDEO:
            prompt_images = prompt_images_key(identity.model_family, num_prompt_images)
        frames: int | None = None
        if self.media_type == VIDEO:
            if self.num_frames > 0:
                frames = self.num_frames
            elif isinstance(self.payload, np.ndarray):
                frames = int(self.payload.shape[0])
            else:
                frames = default_num_frames
        if isinstance(self.payload, np.ndarray):
            return array_media_id(
                self.id_kind, self.payload, identity, num_frames=frames, num_prompt_images=prompt_images
            )
        return encoded_media_id(
            self.id_kind, self.payload, identity, num_frames=frames, num_prompt_images=prompt_images
        )


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise InvalidArgumentError("data URI must look like 'data:<mime>;base64,<payload>'")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgumentError(f"data URI payload is not valid base64: {exc}") from None
    if not data:
        raise InvalidArgumentError("data URI payload is empty")
    return data


def _read_file(value: str | Path, what: str) -> bytes:
    path = Path(value).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"{what} path does not exist or is not a file: {path}")
    data = path.read_bytes()
    if not data:
        raise InvalidArgumentError(f"{what} file is empty: {path}")
    return data


def _rgb_pixels(array: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] C-contiguous, from [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] uint8."""
    if array.dtype != np.uint8:
        raise InvalidArgumentError(f"numpy images must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.shape[0] < 1 or array.shape[1] < 1:
        raise InvalidArgumentError(
            f"numpy images must be [H, W] or [H, W, C] with C in (1, 3, 4); got {array.shape}"
        )
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]  # drop alpha, as PIL's convert("RGB") does
    return np.ascontiguousarray(array)


def load_image_bytes(image: ImageInput) -> bytes | np.ndarray:
    """Encoded file bytes (path, bytes, data URI, PIL image) or uint8 [H, W, 3] pixels (numpy input).

    PIL images are encoded losslessly as PNG so the server sees exactly these pixels. http(s) URLs
    raise ``InvalidArgumentError``: they are sent to the encoder, which fetches them.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise InvalidArgumentError("image bytes are empty")
        return bytes(image)
    if isinstance(image, np.ndarray):
        return _rgb_pixels(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, str) and image.startswith(_DATA_URI_PREFIX):
        return _decode_data_uri(image)
    if isinstance(image, str) and image.startswith(_URL_PREFIXES):
        raise InvalidArgumentError("URLs are fetched by the encoder service; send them as Image.url")
    if isinstance(image, (str, Path)):
        return _read_file(image, "image")
    raise InvalidArgumentError(
        f"unsupported image type {type(image).__name__}: use a path, bytes, a PIL image, a uint8 numpy "
        "array, an http(s) URL or a data: URI"
    )


def prepare_image(image: ImageInput) -> PreparedMedia:
    """Wire form and id source of one image."""
    if isinstance(image, str) and image.startswith(_URL_PREFIXES):
        return PreparedMedia(IMAGE, common_pb2.MediaItem(image=common_pb2.Image(url=image)), None, None)
    data = load_image_bytes(image)
    if isinstance(data, np.ndarray):
        item = common_pb2.MediaItem(image=common_pb2.Image(pixels_hwc_uint8=encode_numpy(data)))
        return PreparedMedia(IMAGE, item, IMAGE_PIXELS, data)
    return PreparedMedia(IMAGE, common_pb2.MediaItem(image=common_pb2.Image(data=data)), IMAGE_BYTES, data)


def _stack_frames(frames: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    arrays = [
        _rgb_pixels(np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f))
        for f in frames
    ]
    if not arrays:
        raise InvalidArgumentError("a video given as frames needs at least one frame")
    if len({a.shape for a in arrays}) != 1:
        raise InvalidArgumentError("all video frames must have the same size")
    return np.ascontiguousarray(np.stack(arrays))


def prepare_video(video: VideoInput, num_frames: int | None = None) -> PreparedMedia:
    """Wire form and id source of one video; ``num_frames`` frames are sampled (None/0: server default)."""
    num_frames = int(num_frames or 0)
    if num_frames < 0:
        raise InvalidArgumentError(f"num_frames must be >= 0 (0 = server default), got {num_frames}")

    def item(**source) -> common_pb2.MediaItem:
        return common_pb2.MediaItem(video=common_pb2.Video(num_frames=num_frames, **source))

    if isinstance(video, str) and video.startswith(_URL_PREFIXES):
        return PreparedMedia(VIDEO, item(url=video), None, None, num_frames)
    if isinstance(video, (bytes, bytearray, memoryview)):
        if not len(video):
            raise InvalidArgumentError("video bytes are empty")
        data = bytes(video)
    elif isinstance(video, str) and video.startswith(_DATA_URI_PREFIX):
        data = _decode_data_uri(video)
    elif isinstance(video, (str, Path)):
        data = _read_file(video, "video")
    elif isinstance(video, (np.ndarray, Sequence)):
        if isinstance(video, np.ndarray):
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
                raise InvalidArgumentError(
                    f"video frames must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}"
                )
            frames = np.ascontiguousarray(video)
        else:
            frames = _stack_frames(video)
        if num_frames > frames.shape[0]:
            raise InvalidArgumentError(f"num_frames={num_frames} exceeds the {frames.shape[0]} frames given")
        return PreparedMedia(VIDEO, item(frames=encode_numpy(frames)), VIDEO_FRAMES, frames, num_frames)
    else:
        raise InvalidArgumentError(
            f"unsupported video type {type(video).__name__}: use a path, bytes, an http(s) URL, a data: URI "
            "or uint8 frames [T, H, W, 3]"
        )
    return PreparedMedia(VIDEO, item(data=data), VIDEO_BYTES, data, num_frames)


def image_content_id(image: ImageInput, identity: PreprocessingIdentity) -> str:
    """Content id of an image as the services compute it (protos/README.md, "Content ids")."""
    data = load_image_bytes(image)
    if isinstance(data, np.ndarray):
        return array_media_id(IMAGE_PIXELS, data, identity)
    return encoded_media_id(IMAGE_BYTES, data, identity)
