"""Validation and normalisation of user media before any image processor sees it.

Every problem a client can cause raises `InvalidArgumentError` with a message that says what was
expected; nothing here logs or echoes pixel data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from vlm_protocol.errors import InvalidArgumentError


def to_rgb_images(images: Sequence[PIL.Image.Image | np.ndarray]) -> list[PIL.Image.Image]:
    """PIL images (any mode) or uint8 [H, W(, C)] arrays -> RGB PIL images.

    Transparency is composited onto white, as HF processors' `do_convert_rgb` does, so an RGBA
    picture gives the same features whichever form it arrives in.
    """
    if isinstance(images, PIL.Image.Image | np.ndarray) or not isinstance(images, Sequence):
        raise InvalidArgumentError("images must be a list of images")
    if not images:
        raise InvalidArgumentError("images is empty; send at least one image")
    return [_to_rgb(image, index) for index, image in enumerate(images)]


def _to_rgb(image: PIL.Image.Image | np.ndarray, index: int) -> PIL.Image.Image:
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, index)
    elif not isinstance(image, PIL.Image.Image):
        raise InvalidArgumentError(f"image {index} is a {type(image).__name__}, not an image or uint8 array")
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidArgumentError(f"image {index} is empty ({width}x{height} pixels)")
    try:
        if image.mode == "RGB":
            image.load()
            return image
        rgba = image.convert("RGBA")
    except (OSError, ValueError) as exc:  # truncated or corrupt data surfaces on the first pixel access
        raise InvalidArgumentError(f"image {index} could not be decoded ({exc})") from exc
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def _array_to_pil(array: np.ndarray, index: int) -> PIL.Image.Image:
    if array.dtype != np.uint8:
        raise InvalidArgumentError(f"image {index}: raw pixels must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise InvalidArgumentError(
            f"image {index}: raw pixels must have shape [H, W, 3] (or [H, W], [H, W, 4]), got {list(array.shape)}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InvalidArgumentError(f"image {index} is empty ({array.shape[1]}x{array.shape[0]} pixels)")
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def check_video_frames(frames: np.ndarray) -> np.ndarray:
    """Check uint8 frames [T, H, W, 3] with T, H, W >= 1."""
    if not isinstance(frames, np.ndarray):
        raise InvalidArgumentError(
            f"video_frames must be a uint8 array [T, H, W, 3], got {type(frames).__name__}"
        )
    if frames.dtype != np.uint8:
        raise InvalidArgumentError(f"video_frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InvalidArgumentError(f"video_frames must have shape [T, H, W, 3], got {list(frames.shape)}")
    if min(frames.shape[:3]) < 1:
        raise InvalidArgumentError(f"video_frames is empty (shape {list(frames.shape)})")
    return frames


def check_float_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A finite floating-point tensor -> a float32 contiguous CPU copy."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise InvalidArgumentError(
            f"{name} must be floating point (preprocessed, normalised pixels), got {tensor.dtype}; "
            "send raw uint8 pixels as an image instead"
        )
    if tensor.numel() == 0:
        raise InvalidArgumentError(f"{name} is empty (shape {list(tensor.shape)})")
    tensor = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(tensor).all():
        raise InvalidArgumentError(f"{name} contains NaN or infinite values")
    return tensor


def check_shape(tensor: torch.Tensor, name: str, expected: Sequence[int | None], layout: str) -> None:
    """Raise unless `tensor.shape` matches `expected` (None = any size >= 1); `layout` names the dims."""
    shape = list(tensor.shape)
    if len(shape) != len(expected) or any(
        e is not None and s != e for s, e in zip(shape, expected, strict=True)
    ):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise InvalidArgumentError(f"{name} must have shape {layout} = [{want}], got {shape}")


def image_size_pairs(value, count: int, name: str = "image_sizes") -> list[tuple[int, int]]:
    """Parse `count` (height, width) pairs of positive ints from a tensor or nested sequence."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise InvalidArgumentError(f"{name} must hold integers, got {value.dtype}")
        value = value.reshape(-1, 2).tolist() if value.numel() % 2 == 0 else value.tolist()
    try:
        pairs = [(int(h), int(w)) for h, w in value]
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{name} must be a list of (height, width) pairs") from exc
    if len(pairs) != count:
        raise InvalidArgumentError(f"{name} has {len(pairs)} entries but pixel_values holds {count} images")
    if any(h < 1 or w < 1 for h, w in pairs):
        raise InvalidArgumentError(f"{name} must be positive, got {pairs}")
    return pairs
