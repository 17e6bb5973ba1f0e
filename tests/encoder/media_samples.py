"""Small media files built in memory for encoder tests: images, forged bombs, videos."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode_image(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 4x4 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression bomb's
    header at no memory cost."""
    data = bytearray(encode_image(Image.new("RGB", (4, 4), (1, 2, 3))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def compressed_bomb_png(width: int, height: int) -> bytes:
    """A genuine all-black grayscale PNG of ``width`` x ``height`` that is only a few hundred KB.

    One block of rows is deflated once, ending in a full flush (byte-aligned, no references to
    earlier data), so the same compressed bytes can be repeated; the Adler-32 of the whole image is
    computed without materialising it.
    """
    rows_per_block = 40
    assert height % rows_per_block == 0, "height must be a multiple of 40"
    block = (b"\x00" + b"\x00" * width) * rows_per_block  # per row: filter byte + pixels
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    num_blocks = height // rows_per_block
    adler = 1
    for _ in range(num_blocks):
        adler = zlib.adler32(block, adler)
    final_block = b"\x03\x00"  # an empty, final, fixed-Huffman block
    idat = first + repeat * (num_blocks - 1) + final_block + struct.pack(">I", adler)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_video(
    num_frames: int = 12, width: int = 32, height: int = 24, fmt: str = "mp4", codec: str = "mpeg4"
) -> bytes:
    """A tiny video whose frame i is a flat grey of value 20 * i (so frames are identifiable)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(num_frames):
            pixels = np.full((height, width, 3), 20 * index, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
