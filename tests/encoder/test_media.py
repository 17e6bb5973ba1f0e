"""Media decoding: formats, RGB conversion, pixel caps before decoding, damaged input, data URIs, video."""

from __future__ import annotations

import base64
import io
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from encoder_service import media
from tests.encoder.media_samples import compressed_bomb_png, encode_image, make_video, png_with_header_size
from vlm_protocol.errors import InvalidArgumentError

LIMIT = 1_000_000


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_lossless_formats_decode_to_the_same_rgb_pixels(sample_image, fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = media.decode_image(encode_image(sample_image, fmt, **options), max_image_pixels=LIMIT)
    assert decoded.mode == "RGB" and decoded.size == sample_image.size
    np.testing.assert_array_equal(np.asarray(decoded), _pixels(sample_image))


def test_jpeg_decodes_like_pillow(sample_image):
    data = encode_image(sample_image, "JPEG", quality=95)
    decoded = media.decode_image(data, max_image_pixels=LIMIT)
    assert decoded.mode == "RGB" and decoded.size == sample_image.size
    np.testing.assert_array_equal(np.asarray(decoded), _pixels(Image.open(io.BytesIO(data))))


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (10, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = media.decode_image(buffer.getvalue(), max_image_pixels=LIMIT)
    assert decoded.mode == "RGB"
    assert tuple(np.asarray(decoded)[0, 0]) == (255, 0, 0)


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (10, 20, 30, 255))
    decoded = media.decode_image(encode_image(image), max_image_pixels=LIMIT)
    pixels = np.asarray(decoded)
    assert tuple(pixels[0, 0]) == (10, 20, 30)
    assert tuple(pixels[1, 1]) == (255, 255, 255)


def test_grayscale_and_palette_become_rgb():
    for mode in ("L", "P"):
        decoded = media.decode_image(encode_image(Image.new(mode, (3, 2), 7)), max_image_pixels=LIMIT)
        assert decoded.mode == "RGB" and decoded.size == (3, 2)


def test_forged_header_bomb_is_refused_before_decoding():
    with pytest.raises(
        InvalidArgumentError, match=r"20000x20000 = 400000000 pixels, over the limit|more pixels than"
    ):
        media.decode_image(png_with_header_size(20000, 20000), max_image_pixels=LIMIT)
    # Below Pillow's own bomb threshold our limit still speaks first, with the exact size.
    with pytest.raises(InvalidArgumentError, match=r"6000x6000 = 36000000 pixels, over the limit of 1000000"):
        media.decode_image(png_with_header_size(6000, 6000), max_image_pixels=LIMIT)


def test_compressible_bomb_is_refused_before_decoding():
    data = compressed_bomb_png(20000, 20000)  # 400 MP of real, valid PNG in ~400 KB
    assert len(data) < 1_000_000
    with pytest.raises(InvalidArgumentError, match="max_image_pixels"):
        media.decode_image(data, max_image_pixels=LIMIT)


def test_zero_size_and_empty_images_are_refused():
    with pytest.raises(InvalidArgumentError, match="empty"):
        media.decode_image(b"", max_image_pixels=LIMIT)
    with pytest.raises(InvalidArgumentError, match="zero width or height"):
        media.decode_image(png_with_header_size(0, 0), max_image_pixels=LIMIT)
    with pytest.raises(InvalidArgumentError, match="zero width or height"):
        media.image_from_pixels(np.zeros((0, 5, 3), np.uint8), max_image_pixels=LIMIT)


def test_truncated_and_non_image_bytes_are_refused_with_clear_messages(sample_image):
    png = encode_image(sample_image)
    with pytest.raises(InvalidArgumentError, match="truncated or corrupt"):
        media.decode_image(png[: len(png) * 2 // 3], max_image_pixels=LIMIT)
    with pytest.raises(InvalidArgumentError, match="not a supported image file"):
        media.decode_image(png[:30], max_image_pixels=LIMIT)
    with pytest.raises(InvalidArgumentError, match="not a supported image file"):
        media.decode_image(b"definitely not an image" * 10, max_image_pixels=LIMIT)
    # TIFF is a real image format, but not one we decode.
    with pytest.raises(InvalidArgumentError, match="not a supported image file"):
        media.decode_image(encode_image(sample_image, "TIFF"), max_image_pixels=LIMIT)


def test_raw_pixels_roundtrip_and_are_capped(sample_image):
    pixels = _pixels(sample_image)
    np.testing.assert_array_equal(np.asarray(media.image_from_pixels(pixels, max_image_pixels=LIMIT)), pixels)
    with pytest.raises(InvalidArgumentError, match="over the limit"):
        media.image_from_pixels(np.zeros((20, 20, 3), np.uint8), max_image_pixels=100)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        media.image_from_pixels(pixels.astype(np.float32), max_image_pixels=LIMIT)


def test_data_uris_base64_and_percent_encoded(sample_image):
    png = encode_image(sample_image)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert media.parse_data_uri(uri, max_bytes=10**6) == ("image/png", png)
    wrapped = "data:image/png;base64," + base64.encodebytes(png).decode()  # line-wrapped base64
    assert media.parse_data_uri(wrapped, max_bytes=10**6)[1] == png
    plain = "data:," + urllib.parse.quote_from_bytes(b"\x00\x01hi")
    assert media.parse_data_uri(plain, max_bytes=100) == ("text/plain", b"\x00\x01hi")


def test_bad_data_uris():
    with pytest.raises(InvalidArgumentError, match="base64"):
        media.parse_data_uri("data:image/png;base64,@@@not base64@@@", max_bytes=100)
    with pytest.raises(InvalidArgumentError, match="no ','"):
        media.parse_data_uri("data:image/png;base64", max_bytes=100)
    big = "data:image/png;base64," + base64.b64encode(b"x" * 1000).decode()
    with pytest.raises(InvalidArgumentError, match="max_media_bytes"):
        media.parse_data_uri(big, max_bytes=100)


def test_frame_sampling_matches_transformers_uniform_sampling():
    np.testing.assert_array_equal(media.sample_frame_indices(12, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(media.sample_frame_indices(10, 3), [0, 3, 6])
    np.testing.assert_array_equal(media.sample_frame_indices(3, 8), [0, 1, 2])


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "mpeg4"), ("webm", "libvpx-vp9")])
def test_video_files_are_sampled_evenly(fmt, codec):
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not available")
    data = make_video(num_frames=12, fmt=fmt, codec=codec)
    video = media.decode_video(data, num_frames=4, max_image_pixels=LIMIT, max_scan_frames=1000)
    assert video.frames.shape == (4, 24, 32, 3) and video.frames.dtype == np.uint8
    assert video.num_source_frames == 12
    # Frame i is grey 20 * i: the sampled frames are 0, 3, 6, 9 (lossy codec: approximately).
    np.testing.assert_allclose(video.frames.mean(axis=(1, 2, 3)), [0, 60, 120, 180], atol=6)


def test_bad_videos_are_refused():
    data = make_video(num_frames=6)
    with pytest.raises(InvalidArgumentError, match="could not be decoded"):
        media.decode_video(
            b"not a video at all" * 20, num_frames=2, max_image_pixels=LIMIT, max_scan_frames=100
        )
    with pytest.raises(InvalidArgumentError, match="over the limit"):
        media.decode_video(data, num_frames=2, max_image_pixels=100, max_scan_frames=100)
    with pytest.raises(InvalidArgumentError, match="more than 3 frames"):
        media.decode_video(data, num_frames=2, max_image_pixels=LIMIT, max_scan_frames=3)
    with pytest.raises(InvalidArgumentError, match="empty"):
        media.decode_video(b"", num_frames=2, max_image_pixels=LIMIT, max_scan_frames=100)
    with pytest.raises(InvalidArgumentError, match="could not be decoded|has no"):
        media.decode_video(data[: len(data) // 3], num_frames=2, max_image_pixels=LIMIT, max_scan_frames=100)


def test_frames_arrays_are_checked():
    media.check_frames(np.zeros((2, 4, 4, 3), np.uint8), max_image_pixels=LIMIT)
    with pytest.raises(InvalidArgumentError, match="no frames"):
        media.check_frames(np.zeros((0, 4, 4, 3), np.uint8), max_image_pixels=LIMIT)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        media.check_frames(np.zeros((2, 4, 4), np.uint8), max_image_pixels=LIMIT)
