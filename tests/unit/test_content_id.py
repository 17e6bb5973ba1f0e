"""Content ids (DESIGN §4): framing, determinism across processes and libraries, sensitivity, format."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import blake3
import ml_dtypes
import numpy as np
import pytest
import torch

from vlm_protocol.content_id import (
    CONTENT_ID_LENGTH,
    canonical_preprocessing,
    content_id_for_array,
    content_id_for_bytes,
    is_valid_content_id,
    parse_content_id,
    validate_content_id,
)
from vlm_protocol.errors import InvalidArgumentError

REPO_ROOT = Path(__file__).resolve().parents[2]
PREPROCESSING = {"family": "llava", "processor_sha": "abc123", "num_frames": 8, "resize": 336.0, "pad": True}
IMAGE_BYTES = bytes(range(256)) * 40
ID_RE = re.compile(r"b3:[0-9a-f]{64}")


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def _pixels() -> np.ndarray:
    return np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


def test_bytes_id_matches_the_specified_framing():
    identity = b'{"family":"llava","num_frames":8,"pad":true,"processor_sha":"abc123","resize":336.0}'
    assert canonical_preprocessing(PREPROCESSING) == identity
    record = _frame(b"image") + _frame(IMAGE_BYTES) + _frame(identity)
    expected = "b3:" + blake3.blake3(record).hexdigest()
    assert content_id_for_bytes("image", IMAGE_BYTES, PREPROCESSING) == expected


def test_array_id_matches_the_specified_framing():
    array = np.array([[1.0, -2.0, 3.5]], dtype=np.float32)
    record = (
        _frame(b"image")
        + _frame(b"float32")
        + _frame((1).to_bytes(8, "little") + (3).to_bytes(8, "little"))
        + _frame(b"\x00\x00\x80\x3f\x00\x00\x00\xc0\x00\x00\x60\x40")
        + _frame(b"{}")
    )
    assert content_id_for_array("image", array, {}) == "b3:" + blake3.blake3(record).hexdigest()


def test_format_is_full_length_blake3_hex():
    for content_id in (
        content_id_for_bytes("image", IMAGE_BYTES, PREPROCESSING),
        content_id_for_array("video", _pixels(), PREPROCESSING),
        content_id_for_bytes("image", b"", {}),
    ):
        assert ID_RE.fullmatch(content_id)
        assert len(content_id) == CONTENT_ID_LENGTH == 67
        assert is_valid_content_id(content_id)
        assert len(parse_content_id(content_id)) == 32


_CHILD = """
import json, sys
import numpy as np
from vlm_protocol.content_id import content_id_for_array, content_id_for_bytes
prep = json.loads(sys.argv[1])
data = bytes(range(256)) * 40
pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
print(content_id_for_bytes("image", data, prep))
print(content_id_for_array("video", pixels, prep))
"""


def test_equal_input_gives_equal_id_across_processes():
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(PREPROCESSING)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "random", "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.split() == [
        content_id_for_bytes("image", IMAGE_BYTES, PREPROCESSING),
        content_id_for_array("video", _pixels(), PREPROCESSING),
    ]


@pytest.mark.parametrize("position", [0, 1, 5000, len(IMAGE_BYTES) - 1])
def test_any_changed_byte_changes_the_id(position):
    changed = bytearray(IMAGE_BYTES)
    changed[position] ^= 0x01
    base = content_id_for_bytes("image", IMAGE_BYTES, PREPROCESSING)
    assert content_id_for_bytes("image", bytes(changed), PREPROCESSING) != base
    assert content_id_for_bytes("image", IMAGE_BYTES[:-1], PREPROCESSING) != base
    assert content_id_for_bytes("image", IMAGE_BYTES + b"\x00", PREPROCESSING) != base


def test_array_element_dtype_and_shape_each_change_the_id():
    pixels = _pixels()
    base = content_id_for_array("image", pixels, {})
    changed = pixels.copy()
    changed[1, 2, 3] += 1
    assert content_id_for_array("image", changed, {}) != base
    # Same bytes, different dtype / shape.
    assert content_id_for_array("image", pixels.view(np.int8), {}) != base
    assert content_id_for_array("image", pixels.reshape(6, 4), {}) != base
    assert content_id_for_array("image", pixels.reshape(-1), {}) != base
    float_bits = np.zeros(4, dtype=np.float32)
    assert content_id_for_array("image", float_bits, {}) != content_id_for_array(
        "image", float_bits.view(np.int32), {}
    )
    # Same elements as encoded bytes vs a raw array never collide.
    assert content_id_for_bytes("image", pixels.tobytes(), {}) != base


def test_kind_changes_the_id():
    assert content_id_for_bytes("image", IMAGE_BYTES, {}) != content_id_for_bytes("video", IMAGE_BYTES, {})
    assert content_id_for_array("image", _pixels(), {}) != content_id_for_array("video", _pixels(), {})


@pytest.mark.parametrize(
    "changed",
    [
        {**PREPROCESSING, "family": "llava_onevision"},
        {**PREPROCESSING, "num_frames": 16},
        {**PREPROCESSING, "num_frames": 8.0},  # type is part of the identity
        {**PREPROCESSING, "pad": False},
        {**PREPROCESSING, "pad": None},
        {**PREPROCESSING, "extra": "x"},
        {key: value for key, value in PREPROCESSING.items() if key != "resize"},
    ],
)
def test_any_preprocessing_field_changes_the_id(changed):
    base = content_id_for_bytes("image", IMAGE_BYTES, PREPROCESSING)
    assert content_id_for_bytes("image", IMAGE_BYTES, changed) != base
    assert content_id_for_array("image", _pixels(), changed) != content_id_for_array(
        "image", _pixels(), PREPROCESSING
    )


def test_preprocessing_key_order_does_not_matter():
    reordered = dict(reversed(list(PREPROCESSING.items())))
    assert content_id_for_bytes("image", IMAGE_BYTES, reordered) == content_id_for_bytes(
        "image", IMAGE_BYTES, PREPROCESSING
    )


def test_representation_of_equal_arrays_does_not_matter():
    rng = np.random.default_rng(0)
    array = rng.standard_normal((4, 6)).astype(np.float32)
    base = content_id_for_array("image", array, {})
    assert content_id_for_array("image", np.asfortranarray(array), {}) == base
    assert content_id_for_array("image", array.astype(">f4"), {}) == base
    assert content_id_for_array("image", array.T.copy().T, {}) == base  # non-contiguous view
    assert content_id_for_array("image", torch.from_numpy(array), {}) == base
    assert content_id_for_array("image", torch.from_numpy(array.T.copy()).t(), {}) == base
    assert content_id_for_bytes("image", memoryview(array.tobytes()), {}) == content_id_for_bytes(
        "image", array.tobytes(), {}
    )


def test_bfloat16_numpy_and_torch_agree():
    tensor = torch.tensor([[1.5, -0.25], [3.0, 1e-3]], dtype=torch.bfloat16)
    array = np.array([[1.5, -0.25], [3.0, 1e-3]], dtype=ml_dtypes.bfloat16)
    assert content_id_for_array("image", tensor, {}) == content_id_for_array("image", array, {})
    assert content_id_for_array("image", tensor, {}) != content_id_for_array("image", tensor.float(), {})


@pytest.mark.parametrize(
    ("preprocessing", "needle"),
    [
        ({"size": {"h": 336}}, "preprocessing['size'] has unsupported type dict"),
        ({"mean": [0.5, 0.5]}, "preprocessing['mean'] has unsupported type list"),
        ({"n": np.int64(3)}, "unsupported type int64"),
        ({"x": b"raw"}, "unsupported type bytes"),
        ({"scale": float("nan")}, "only finite floats"),
        ({"scale": float("inf")}, "only finite floats"),
        ({1: "a"}, "keys must be str"),
    ],
)
def test_unsupported_preprocessing_is_rejected(preprocessing, needle):
    with pytest.raises(InvalidArgumentError) as info:
        content_id_for_bytes("image", IMAGE_BYTES, preprocessing)
    assert needle in str(info.value)


def test_bad_kind_and_payload_are_rejected():
    with pytest.raises(InvalidArgumentError, match="kind"):
        content_id_for_bytes("", IMAGE_BYTES, {})
    with pytest.raises(InvalidArgumentError, match="numpy array or torch tensor"):
        content_id_for_array("image", [1, 2, 3], {})
    with pytest.raises(InvalidArgumentError, match="unsupported element type"):
        content_id_for_array("image", np.zeros(2, dtype=np.complex64), {})


@pytest.mark.parametrize(
    "value",
    [
        "",
        "b3:",
        "b3:" + "a" * 63,
        "b3:" + "a" * 65,
        "b3:" + "A" * 64,
        "b3:" + "g" * 64,
        "sha256:" + "a" * 64,
        "B3:" + "a" * 64,
        "b3:" + "a" * 64 + "\n",
        " b3:" + "a" * 64,
        None,
        b"b3:" + b"a" * 64,
    ],
)
def test_malformed_ids_are_rejected(value):
    assert not is_valid_content_id(value)
    with pytest.raises(InvalidArgumentError) as info:
        validate_content_id(value, field="multimodal[0].content_id")
    assert "multimodal[0].content_id" in str(info.value) and "64 lowercase hex" in str(info.value)
    with pytest.raises(InvalidArgumentError):
        parse_content_id(value)


def test_valid_id_round_trips_through_validation():
    content_id = content_id_for_bytes("image", IMAGE_BYTES, PREPROCESSING)
    assert validate_content_id(content_id) == content_id
    assert parse_content_id(content_id).hex() == content_id[3:]
