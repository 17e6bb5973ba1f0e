"""Client-side media intake: paths, bytes, PIL images, numpy arrays and data URIs -> wire form + content id."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.media_ids import (
    IMAGE_BYTES,
    IMAGE_PIXELS,
    PreprocessingIdentity,
    array_media_id,
    encoded_media_id,
)

ImageInput = Union[str, Path, bytes, "Image.Image", np.ndarray]

_DATA_URI_PREFIX = "data:"


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise InvalidArgumentError("data URI must look like 'data:<mime>;base64,<payload>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgumentError(f"data URI payload is not valid base64: {exc}") from None


def load_image_bytes(image: ImageInput) -> bytes | np.ndarray:
    """Return encoded file bytes (path, bytes, data URI, PIL image) or a uint8 HWC array (numpy input).

    PIL images are encoded losslessly as PNG so the server sees exactly these pixels.
    http(s) URLs are not fetched here: they are passed to the encoder, which fetches them safely.
    """
    if isinstance(image, bytes):
        if not image:
            raise InvalidArgumentError("image bytes are empty")
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise InvalidArgumentError(
                f"numpy images must be uint8 [H, W, C] with C in (1, 3, 4); got {image.dtype} {image.shape}"
            )
        return np.ascontiguousarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, str) and image.startswith(_DATA_URI_PREFIX):
        return _decode_data_uri(image)
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise InvalidArgumentError("URLs are fetched by the encoder service; send them as Image.url")
    path = Path(image)
    if not path.is_file():
        raise InvalidArgumentError(f"image path does not exist or is not a file: {path}")
    return path.read_bytes()


def image_content_id(image: ImageInput, identity: PreprocessingIdentity) -> str:
    """Content id of an image as the services compute it (protos/README.md, "Content ids")."""
    data = load_image_bytes(image)
    if isinstance(data, np.ndarray):
        return array_media_id(IMAGE_PIXELS, data, identity)
    return encoded_media_id(IMAGE_BYTES, data, identity)
