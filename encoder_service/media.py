"""Media decoding: encoded images and videos, data: URIs and raw pixel arrays -> RGB pixels.

Everything here is CPU work that runs in the worker pool, never on the event loop. Every input is
untrusted: sizes are checked from the file header before any pixel is decoded (decompression bombs cost
nothing), and each failure is an ``InvalidArgumentError`` whose message says what was wrong without
echoing the bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import urllib.parse
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_protocol.errors import InvalidArgumentError

# Formats Pillow may try. Fewer decoders means less attack surface (Pillow ships dozens of plugins).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Demuxers FFmpeg may use for video bytes; excludes playlist formats (HLS, concat) that open other files.
VIDEO_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,mpegts"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled RGB frames of a video: uint8 [num_frames, height, width, 3]."""

    frames: np.ndarray
    num_source_frames: int


def decode_image(data: bytes, *, max_image_pixels: int, what: str = "image") -> Image.Image:
    """Decode an encoded image (PNG, JPEG, WebP, BMP, GIF first frame) into an RGB PIL image.

    The width and height are read from the header and checked against ``max_image_pixels`` before
    the pixels are decoded. Transparency is composited onto white, as Hugging Face processors do.
    """
    if not data:
        raise InvalidArgumentError(f"{what} data is empty (0 bytes)")
    zero_size = _png_header_has_zero_size(data)
    if zero_size:
        raise InvalidArgumentError(f"{what} has zero width or height")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own guard (2x Image.MAX_IMAGE_PIXELS) fired before we could read the size.
        raise _too_many_pixels(
            what, None, min(max_image_pixels, _pillow_bomb_limit(max_image_pixels))
        ) from None
    except UnidentifiedImageError:
        raise InvalidArgumentError(
            f"{what} is not a supported image file ({', '.join(IMAGE_FORMATS)}) or is damaged"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise InvalidArgumentError(f"{what} could not be read: {_short(exc)}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidArgumentError(f"{what} has zero width or height")
    if width * height > max_image_pixels:
        raise _too_many_pixels(what, (width, height), max_image_pixels)
    try:
        image.load()  # first frame only for animated formats
        return to_rgb(image)
    except Image.DecompressionBombError:
        raise _too_many_pixels(what, (width, height), max_image_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # Pillow says "image file is truncated" / "broken data stream" here.
        raise InvalidArgumentError(f"{what} is truncated or corrupt: {_short(exc)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels are composited onto white (HF ``convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_from_pixels(pixels: np.ndarray, *, max_image_pixels: int, what: str = "image") -> Image.Image:
    """RGB image from uint8 pixels [height, width, 3] (already shape- and dtype-checked by convert)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidArgumentError(
            f"{what} pixels must be uint8 [height, width, 3], got {pixels.dtype} {list(pixels.shape)}"
        )
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    if width == 0 or height == 0:
        raise InvalidArgumentError(f"{what} has zero width or height")
    if width * height > max_image_pixels:
        raise _too_many_pixels(what, (width, height), max_image_pixels)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def check_frames(frames: np.ndarray, *, max_image_pixels: int, what: str = "video") -> None:
    """Validate uint8 RGB frames [num_frames, height, width, 3]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InvalidArgumentError(
            f"{what} frames must be uint8 [num_frames, height, width, 3], got {frames.dtype} {list(frames.shape)}"
        )
    num_frames, height, width = (int(dim) for dim in frames.shape[:3])
    if num_frames == 0:
        raise InvalidArgumentError(f"{what} has no frames")
    if width == 0 or height == 0:
        raise InvalidArgumentError(f"{what} frames have zero width or height")
    if width * height > max_image_pixels:
        raise _too_many_pixels(f"{what} frame", (width, height), max_image_pixels)


def sample_frame_indices(num_source_frames: int, num_frames: int) -> np.ndarray:
    """Indices of ``num_frames`` frames spread evenly over the video (transformers' uniform sampling);
    every frame when the video is shorter."""
    if num_frames >= num_source_frames:
        return np.arange(num_source_frames, dtype=np.int64)
    return np.arange(num_frames, dtype=np.int64) * num_source_frames // num_frames


def decode_video(
    data: bytes,
    *,
    num_frames: int,
    max_image_pixels: int,
    max_scan_frames: int,
    what: str = "video",
) -> DecodedVideo:
    """Decode ``num_frames`` evenly spaced RGB frames from a video file (MP4, WebM, MKV, AVI, ...)."""
    import av  # deferred: PyAV loads FFmpeg, which only video requests need

    if not data:
        raise InvalidArgumentError(f"{what} data is empty (0 bytes)")
    try:
        total = _count_video_frames(av, data, max_image_pixels, max_scan_frames, what)
        wanted = sample_frame_indices(total, num_frames)
        keep = set(wanted.tolist())
        frames: list[np.ndarray] = []
        with _open_video(av, data) as container:
            stream = container.streams.video[0]
            for index, frame in enumerate(container.decode(stream)):
                if index > wanted[-1]:
                    break
                if index in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3] uint8
    except InvalidArgumentError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise InvalidArgumentError(f"{what} could not be decoded: {_short(exc)}") from None
    if not frames:
        raise InvalidArgumentError(f"{what} has no decodable frames")
    if len({frame.shape for frame in frames}) != 1:
        raise InvalidArgumentError(f"{what} changes resolution between frames; re-encode it at one size")
    return DecodedVideo(np.stack(frames), total)


def _open_video(av, data: bytes):
    return av.open(io.BytesIO(data), mode="r", container_options={"format_whitelist": VIDEO_FORMATS})


def _count_video_frames(av, data: bytes, max_image_pixels: int, max_scan_frames: int, what: str) -> int:
    """Frames in the first video stream, from the header or by demuxing (no decoding); checks size."""
    with _open_video(av, data) as container:
        if not container.streams.video:
            raise InvalidArgumentError(f"{what} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise InvalidArgumentError(f"{what} has zero width or height")
        if width * height > max_image_pixels:
            raise _too_many_pixels(f"{what} frame", (width, height), max_image_pixels)
        total = int(stream.frames or 0)
        if total <= 0:  # WebM/MKV headers often omit the count: count packets instead
            for packet in container.demux(stream):
                if packet.size:
                    total += 1
                    if total > max_scan_frames:
                        break
    if total <= 0:
        raise InvalidArgumentError(f"{what} has no frames")
    if total > max_scan_frames:
        raise InvalidArgumentError(
            f"{what} has more than {max_scan_frames} frames (limit max_video_scan_frames); trim it or "
            "send sampled frames"
        )
    return total


def parse_data_uri(uri: str, *, max_bytes: int) -> tuple[str, bytes]:
    """Decode a ``data:[<media type>][;base64],<data>`` URI into (media type, bytes).

    The size is checked from the encoded length before decoding.
    """
    if not uri[:5].lower() == "data:":
        raise InvalidArgumentError("not a data: URI")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise InvalidArgumentError("data: URI has no ',' before its payload")
    params = [part.strip() for part in header.split(";")]
    is_base64 = bool(params) and params[-1].lower() == "base64"
    media_type = (params[0] if params and params[0] and "=" not in params[0] else "text/plain").lower()
    if is_base64:
        # Whitespace is tolerated (line-wrapped base64); anything else outside the alphabet is an error.
        compact = "".join(payload.split())
        if len(compact) // 4 * 3 > max_bytes + 3:
            raise _too_many_bytes("data: URI payload", None, max_bytes)
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgumentError("data: URI payload is not valid base64") from None
    else:
        if len(payload) > 3 * max_bytes:
            raise _too_many_bytes("data: URI payload", None, max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _too_many_bytes("data: URI payload", len(data), max_bytes)
    return media_type, data


def check_media_bytes(data: bytes, *, max_bytes: int, what: str) -> None:
    if len(data) > max_bytes:
        raise _too_many_bytes(what, len(data), max_bytes)


def _png_header_has_zero_size(data: bytes) -> bool:
    # Pillow reports a 0x0 PNG only as "cannot identify image file"; read IHDR to say what is wrong.
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width == 0 or height == 0


def _pillow_bomb_limit(default: int) -> int:
    limit = Image.MAX_IMAGE_PIXELS
    return 2 * int(limit) if limit else default


def _too_many_pixels(what: str, size: tuple[int, int] | None, limit: int) -> InvalidArgumentError:
    if size is None:
        return InvalidArgumentError(
            f"{what} has more pixels than the limit of {limit} (max_image_pixels); refused before decoding"
        )
    width, height = size
    return InvalidArgumentError(
        f"{what} is {width}x{height} = {width * height} pixels, over the limit of {limit} "
        "(max_image_pixels); refused before decoding"
    )


def _too_many_bytes(what: str, size: int | None, limit: int) -> InvalidArgumentError:
    shown = f"{size} bytes" if size is not None else "too large"
    return InvalidArgumentError(f"{what} is {shown}, over the limit of {limit} bytes (max_media_bytes)")


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
