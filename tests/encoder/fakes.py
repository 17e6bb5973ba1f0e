"""A small, fast, deterministic VisualEngine for service tests (no checkpoint weights needed)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from encoder_service.engines.base import EncodedOutput, MediaInput, PreparedInput, VisualEngine

SIDE = 8  # preprocessed image side
HIDDEN = 6
ROWS = 4


class FakeEngine(VisualEngine):
    """Resizes to 8x8 and projects each 4x8 pixel band to a row: features [4, 6] per image.

    Each item's features depend only on that item, so batched and one-by-one results are identical.
    ``gate`` (when set) blocks ``encode`` until released; ``num_encode_calls`` counts model runs.
    """

    family = "llava"
    kind = "prompt_table"
    llm_hidden_size = HIDDEN
    image_size = SIDE
    num_rows_per_image = ROWS
    supports_video = False
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, *, family: str = "llava", supports_video: bool = False) -> None:
        self.family = family
        self.supports_video = supports_video
        generator = torch.Generator().manual_seed(0)
        self._projection = torch.randn(3 * 2 * SIDE, HIDDEN, generator=generator)  # [48, 6]
        self.num_encode_calls = 0
        self.batch_sizes: list[int] = []
        self.gate: threading.Event | None = None
        self.fail_next: Exception | None = None

    def _to_pixels(self, image: PIL.Image.Image) -> torch.Tensor:
        resized = np.asarray(image.resize((SIDE, SIDE), PIL.Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(resized).permute(2, 0, 1).contiguous()  # [3, 8, 8]

    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        pixels = torch.stack([self._to_pixels(image) for image in images])  # [n, 3, 8, 8]
        sizes = tuple((image.height, image.width) for image in images)
        return PreparedInput(self.family, "image", pixels, (1,) * len(images), sizes)

    def _preprocess_video(self, frames: np.ndarray) -> PreparedInput:
        pixels = torch.stack(
            [self._to_pixels(PIL.Image.fromarray(frame)) for frame in frames]
        )  # [T, 3, 8, 8]
        return PreparedInput(
            self.family, "video", pixels, (len(frames),), ((frames.shape[1], frames.shape[2]),)
        )

    def _prepare_pixel_values(self, pixel_values: torch.Tensor, media: MediaInput) -> PreparedInput:
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        return PreparedInput(self.family, "image", pixel_values.float(), (1,) * len(pixel_values), (None,))

    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.num_encode_calls += 1
        self.batch_sizes.append(len(batch))
        outputs = []
        for input_index, prepared in enumerate(batch):
            start = 0
            for item_index, num_crops in enumerate(prepared.num_crops):
                pixels = prepared.pixel_values[start : start + num_crops].mean(0)  # [3, 8, 8]
                start += num_crops
                bands = pixels.reshape(3, ROWS, 2 * SIDE).permute(1, 0, 2).reshape(ROWS, -1)  # [4, 48]
                features = bands @ self._projection  # [4, 6]
                outputs.append(
                    EncodedOutput(
                        features=features,
                        media=prepared.media,
                        input_index=input_index,
                        item_index=item_index,
                        num_rows=ROWS,
                        num_crops=num_crops,
                        image_size=prepared.image_sizes[item_index],
                        num_frames=num_crops if prepared.media == "video" else 0,
                    )
                )
        return outputs


def fake_checkpoint(directory: Path) -> Path:
    """A directory with the files checkpoint_identity reads (no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llava", "fake": True}))
    (directory / "preprocessor_config.json").write_text(json.dumps({"crop_size": SIDE}))
    return directory
