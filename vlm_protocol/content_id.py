"""Content ids: the cache key of an image or video, derived from its content (DESIGN §4).

    content_id = "b3:" + hex(BLAKE3-256(frame(kind) + frame(payload)... + frame(preprocessing)))
    frame(x)   = len(x) as 8-byte little-endian unsigned + x

Payload frames:
  * encoded media (``content_id_for_bytes``): one frame, the file bytes as received.
  * decoded arrays (``content_id_for_array``): three frames, the canonical dtype name (ASCII), the
    shape as int64 little-endian, and the elements in C order, little-endian.
Because every record is a sequence of frames, it parses back uniquely; a bytes record (3 frames) can
never equal an array record (5 frames), whatever the bytes.

``preprocessing`` is the identity of everything that changes the embedding besides the pixels (model
family, processor config hash, num_frames, ...): a flat mapping of str keys to str/int/float/bool/None,
serialised as compact JSON with sorted keys. Note ``1`` and ``1.0`` serialise differently, so keep each
field's type stable.

The SDK, the encoder and the LLM service all call these functions; never re-implement them. The id is
never truncated.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import blake3
import numpy as np

from vlm_protocol.dtypes import is_torch_tensor, numpy_dtype_name, to_little_endian, torch_to_numpy
from vlm_protocol.errors import InvalidArgumentError

CONTENT_ID_PREFIX = "b3:"
CONTENT_ID_LENGTH = len(CONTENT_ID_PREFIX) + 64  # BLAKE3-256 -> 32 bytes -> 64 hex chars
_CONTENT_ID_RE = re.compile(r"b3:[0-9a-f]{64}")

PreprocessingValue = str | int | float | bool | None


class _FramedHasher:
    """BLAKE3 over a sequence of length-prefixed frames, fed without concatenating buffers."""

    def __init__(self) -> None:
        self._hasher = blake3.blake3()

    def frame(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")  # byte length regardless of the buffer's item format
        self._hasher.update(len(view).to_bytes(8, "little"))
        self._hasher.update(view)

    def content_id(self) -> str:
        return CONTENT_ID_PREFIX + self._hasher.hexdigest()


def canonical_preprocessing(preprocessing: Mapping[str, PreprocessingValue]) -> bytes:
    """Canonical UTF-8 JSON of a preprocessing identity: sorted keys, no whitespace, flat values only.

    Raises ``InvalidArgumentError`` for non-str keys, nested or unsupported values, and NaN/inf.
    """
    if not isinstance(preprocessing, Mapping):
        raise InvalidArgumentError(
            f"preprocessing must be a mapping of str to scalar, got {type(preprocessing).__name__}"
        )
    for key, value in preprocessing.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"preprocessing keys must be str, got {type(key).__name__} {key!r}")
        # type() rather than isinstance: numpy scalars and other subclasses would serialise ambiguously.
        if value is not None and type(value) not in (str, int, float, bool):
            raise InvalidArgumentError(
                f"preprocessing[{key!r}] has unsupported type {type(value).__name__}; use a flat "
                "str, int, float, bool or None (hash nested configs into a str first)"
            )
        if type(value) is float and not math.isfinite(value):
            raise InvalidArgumentError(f"preprocessing[{key!r}] is {value}; only finite floats are allowed")
    text = json.dumps(dict(preprocessing), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _utf8(text, "preprocessing")


def _check_kind(kind: str) -> bytes:
    if not isinstance(kind, str) or not kind:
        raise InvalidArgumentError(f"content kind must be a non-empty str such as 'image', got {kind!r}")
    return _utf8(kind, "content kind")


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{what} is not valid Unicode (lone surrogate?)") from None


def content_id_for_bytes(
    kind: str, data: bytes | bytearray | memoryview, preprocessing: Mapping[str, PreprocessingValue]
) -> str:
    """Content id of encoded media (the image/video file bytes exactly as received)."""
    kind_bytes = _check_kind(kind)
    identity = canonical_preprocessing(preprocessing)
    hasher = _FramedHasher()
    hasher.frame(kind_bytes)
    hasher.frame(data)
    hasher.frame(identity)
    return hasher.content_id()


def content_id_for_array(kind: str, array: Any, preprocessing: Mapping[str, PreprocessingValue]) -> str:
    """Content id of a decoded array: a numpy array or a torch tensor (torch is never imported here).

    Equal elements, dtype and shape give the same id whatever the strides, byte order or library.
    """
    kind_bytes = _check_kind(kind)
    identity = canonical_preprocessing(preprocessing)
    if is_torch_tensor(array):
        array = torch_to_numpy(array)
    elif not isinstance(array, np.ndarray):
        raise InvalidArgumentError(f"expected a numpy array or torch tensor, got {type(array).__name__}")
    name = numpy_dtype_name(array.dtype)
    # Copies only when the input is big-endian or not C-contiguous.
    array = np.ascontiguousarray(to_little_endian(array))
    hasher = _FramedHasher()
    hasher.frame(kind_bytes)
    hasher.frame(name.encode("ascii"))
    hasher.frame(np.asarray(array.shape, dtype="<i8").tobytes())
    hasher.frame(array.reshape(-1).view(np.uint8))
    hasher.frame(identity)
    return hasher.content_id()


def is_valid_content_id(value: object) -> bool:
    """True for a well-formed id: ``"b3:"`` + 64 lowercase hex characters."""
    return isinstance(value, str) and _CONTENT_ID_RE.fullmatch(value) is not None


def validate_content_id(value: object, *, field: str = "content_id") -> str:
    """Return ``value`` if it is a well-formed content id, else raise ``InvalidArgumentError``."""
    if is_valid_content_id(value):
        return value  # type: ignore[return-value]
    shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80]) + "..."
    raise InvalidArgumentError(
        f"{field} {shown} is malformed; expected 'b3:' followed by 64 lowercase hex characters"
    )


def parse_content_id(value: object, *, field: str = "content_id") -> bytes:
    """The 32-byte BLAKE3 digest inside a content id; raises ``InvalidArgumentError`` if malformed."""
    return bytes.fromhex(validate_content_id(value, field=field)[len(CONTENT_ID_PREFIX) :])
