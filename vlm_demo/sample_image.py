"""The demo's bundled sample picture, drawn deterministically with Pillow (no randomness, no fonts).

    python -m vlm_demo.sample_image            # (re)writes vlm_demo/assets/sample.png

The demo reads the PNG from ``assets/``; when it is missing (e.g. package data not installed) it draws
the same picture in memory.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ASSET_PATH = Path(__file__).resolve().parent / "assets" / "sample.png"
WIDTH, HEIGHT = 160, 120


def draw_sample_image() -> Image.Image:
    """A small landscape: sky gradient, sun, hills, a house with a red roof and a tree."""
    image = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(image)
    for y in range(HEIGHT):  # sky: light blue fading to white towards the horizon
        t = y / (HEIGHT - 1)
        draw.line([(0, y), (WIDTH, y)], fill=(int(110 + 120 * t), int(170 + 70 * t), 250))
    draw.ellipse((118, 10, 146, 38), fill=(255, 214, 40))  # sun
    draw.ellipse((-40, 70, 90, 170), fill=(70, 150, 60))  # hills
    draw.ellipse((50, 78, 210, 190), fill=(90, 170, 70))
    draw.rectangle((28, 62, 70, 96), fill=(235, 225, 200), outline=(90, 70, 50))  # house
    draw.polygon([(22, 64), (49, 40), (76, 64)], fill=(190, 40, 40))  # roof
    draw.rectangle((44, 78, 54, 96), fill=(110, 70, 40))  # door
    draw.rectangle((32, 68, 40, 76), fill=(120, 180, 230))  # window
    draw.rectangle((104, 70, 110, 98), fill=(100, 65, 35))  # tree trunk
    draw.ellipse((90, 46, 124, 80), fill=(40, 120, 45))  # tree crown
    return image


def sample_png_bytes() -> bytes:
    """The bundled PNG's bytes, or the same picture encoded now when the asset is absent."""
    if ASSET_PATH.is_file():
        return ASSET_PATH.read_bytes()
    buffer = io.BytesIO()
    draw_sample_image().save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> int:
    ASSET_PATH.parent.mkdir(parents=True, exist_ok=True)
    draw_sample_image().save(ASSET_PATH, format="PNG", optimize=True)
    print(f"wrote {ASSET_PATH} ({ASSET_PATH.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
