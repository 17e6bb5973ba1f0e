"""Shared pytest fixtures. Keep this file small; per-area fixtures live next to their tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory `tiny_checkpoint(family, seed=0) -> Path` of a tiny random-weight checkpoint.

    Built once per session (or reused across sessions from $VLM_TINY_CACHE when set).
    """
    cache_env = os.environ.get("VLM_TINY_CACHE")
    cache_dir = Path(cache_env) if cache_env else tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[tuple[str, int], Path] = {}

    def make(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in built:
            from vlm_tiny import make_tiny_checkpoint

            built[key] = make_tiny_checkpoint(family, cache_dir / f"{family}-seed{seed}", seed=seed)
        return built[key]

    return make


@pytest.fixture
def sample_image():
    """A fresh deterministic 48x40 RGB PIL image: a colour gradient with a few solid shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = 48, 40
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], axis=-1
    )
    image = Image.fromarray(pixels.astype(np.uint8))  # HxWx3 uint8 -> RGB
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 6, 18, 20), fill=(220, 30, 30))
    draw.ellipse((26, 8, 42, 24), fill=(30, 200, 60))
    draw.polygon([(10, 36), (24, 24), (38, 36)], fill=(20, 40, 220))
    return image
