"""numpy / torch arrays <-> ``vlm.v1.Tensor`` messages.

Wire format (fixed by ``common.proto``): ``dtype`` is a ``DataType`` enum value, ``shape`` the
dimensions, ``data`` the elements as raw little-endian bytes in C order. All ten element types are
supported, bfloat16 included (``ml_dtypes.bfloat16`` in numpy; in torch through an int16 view, so no
float round trip ever touches the bits). 0-d tensors have ``shape == []`` and one element.

Decoding validates everything a peer controls and raises ``TensorFormatError`` (an
``InvalidArgumentError``, so servers answer INVALID_ARGUMENT) naming the offending field.

Copies: ``decode_numpy`` returns a read-only array viewing the message's bytes (no copy) unless
``writable=True``. ``decode_torch`` returns a tensor owning its memory: the one copy is the ``bytes``
object that reading ``data`` from a upb message builds, which the tensor then takes over (a fresh
object that nothing else references; otherwise, e.g. with the pure-Python protobuf, one more copy),
and for a device target the host -> device copy. Encoding makes one copy (the ``bytes`` the message
needs), plus one for byte-swapping big-endian input.

Shared memory: a ``Tensor`` may carry a ``shared_memory`` slice instead of ``data`` (same layout). The
decoders read it only through a ``shared_memory`` reader the caller passes (the LLM service's
``vlm_protocol.shared_memory.SharedMemoryReader``), which returns a private copy; without one they
raise ``SharedMemoryUnavailableError`` (FAILED_PRECONDITION). ``data`` and ``shared_memory`` both set is
INVALID_ARGUMENT.

Neither torch nor the generated stubs are imported at module import: torch only inside the torch
functions (the SDK runs without torch), ``common_pb2`` only when a new message is built.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_protocol.dtypes import (
    DTYPE_NAMES,
    NUMPY_DTYPES,
    is_torch_tensor,
    numpy_dtype_name,
    numpy_to_torch,
    to_little_endian,
    torch_dtype_for_name,
    torch_to_numpy,
)
from vlm_protocol.errors import InvalidArgumentError, SharedMemoryUnavailableError

if TYPE_CHECKING:
    import torch
    from vlm.v1 import common_pb2

    from vlm_protocol.shared_memory import SharedMemoryReader

# DataType enum values, mirrored from common.proto (a unit test checks they match the generated
# stubs) so that decoding and the name helpers work without importing the stubs.
DATA_TYPE_UNSPECIFIED = 0
DATA_TYPE_BY_NAME: dict[str, int] = {
    "bool": 1,
    "uint8": 2,
    "int8": 3,
    "int16": 4,
    "int32": 5,
    "int64": 6,
    "float16": 7,
    "bfloat16": 8,
    "float32": 9,
    "float64": 10,
}
_NAME_BY_DATA_TYPE: dict[int, str] = {value: name for name, value in DATA_TYPE_BY_NAME.items()}
assert tuple(DATA_TYPE_BY_NAME) == DTYPE_NAMES

DataTypeLike = int | str


class TensorFormatError(InvalidArgumentError):
    """A ``Tensor`` message (or an array to encode) does not match the wire contract.

    ``field`` is the path of the offending field, e.g. ``"embedding.features.shape"``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def dtype_name(data_type: int) -> str:
    """Canonical name (``"bfloat16"``) of a ``DataType`` value; raises ``TensorFormatError`` if unknown."""
    return _resolve_data_type(data_type, "dtype")[1]


def data_type_for_name(name: str) -> int:
    """``DataType`` value of a canonical element type name such as ``"float32"``."""
    return _resolve_data_type(name, "dtype")[0]


def data_type_for_numpy(dtype: np.dtype | type) -> int:
    """``DataType`` value of a numpy dtype (byte order ignored); raises ``TensorFormatError``."""
    try:
        return DATA_TYPE_BY_NAME[numpy_dtype_name(np.dtype(dtype))]
    except InvalidArgumentError as exc:
        raise TensorFormatError("dtype", str(exc)) from None


def numpy_dtype(data_type: DataTypeLike) -> np.dtype:
    """Little-endian numpy dtype for a ``DataType`` value or canonical name."""
    return NUMPY_DTYPES[_resolve_data_type(data_type, "dtype")[1]]


def _resolve_data_type(data_type: DataTypeLike, field: str) -> tuple[int, str]:
    supported = ", ".join(DTYPE_NAMES)
    if isinstance(data_type, str):
        if data_type not in DATA_TYPE_BY_NAME:
            raise TensorFormatError(field, f"unknown element type {data_type!r}; supported: {supported}")
        return DATA_TYPE_BY_NAME[data_type], data_type
    value = int(data_type)
    if value == DATA_TYPE_UNSPECIFIED:
        raise TensorFormatError(field, f"is DATA_TYPE_UNSPECIFIED; set the element type (one of {supported})")
    if value not in _NAME_BY_DATA_TYPE:
        raise TensorFormatError(field, f"unknown DataType value {value}; supported: {supported}")
    return value, _NAME_BY_DATA_TYPE[value]


def encode_numpy(array: np.ndarray, *, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    """Encode a numpy array (any strides or byte order) as a ``Tensor``.

    ``out``: fill this message in place (e.g. ``response.embedding.features``) instead of building a
    new one, which avoids a second copy of the data through ``CopyFrom``.
    """
    array = np.asarray(array)
    try:
        name = numpy_dtype_name(array.dtype)
    except InvalidArgumentError as exc:
        raise TensorFormatError("dtype", str(exc)) from None
    array = to_little_endian(array)
    if out is None:
        from vlm.v1 import common_pb2

        out = common_pb2.Tensor()
    else:
        out.Clear()
    out.dtype = DATA_TYPE_BY_NAME[name]
    out.shape.extend(array.shape)
    out.data = array.tobytes(order="C")  # the one copy; handles non-contiguous input
    return out


def encode_torch(tensor: torch.Tensor, *, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    """Encode a torch tensor (any device, strides or dtype of the ten) as a ``Tensor``, bit-exact."""
    try:
        array = torch_to_numpy(tensor)
    except InvalidArgumentError as exc:
        raise TensorFormatError("dtype", str(exc)) from None
    return encode_numpy(array, out=out)


def encode_tensor(value: Any, *, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    """Encode a numpy array or a torch tensor, whichever ``value`` is."""
    if is_torch_tensor(value):
        return encode_torch(value, out=out)
    return encode_numpy(value, out=out)


def decode_numpy(
    tensor: common_pb2.Tensor,
    *,
    expected_dtype: DataTypeLike | None = None,
    expected_shape: Sequence[int] | None = None,
    writable: bool = False,
    field: str = "tensor",
    shared_memory: SharedMemoryReader | None = None,
) -> np.ndarray:
    """Validate a ``Tensor`` and return its elements as a numpy array.

    Args:
      expected_dtype: ``DataType`` value or canonical name the tensor must have.
      expected_shape: dimensions the tensor must have; ``-1`` matches any size in that position.
      writable: copy into a fresh writable array. Otherwise the result is a read-only view of the
        message's ``data`` (no copy) and keeps those bytes alive.
      field: path of the message in the request, used in error messages.
      shared_memory: reader for a tensor whose elements are in shared memory; None refuses them.

    Raises:
      TensorFormatError: unknown dtype, negative dimension, byte length not ``prod(shape) * itemsize``,
        bool bytes other than 0/1, or a mismatch with ``expected_dtype``/``expected_shape``.
      SharedMemoryUnavailableError, StaleSharedMemoryError: see the module docstring.
    """
    _, array = _decode(tensor, expected_dtype, expected_shape, field, shared_memory)
    return array.copy() if writable and not array.flags.writeable else array


def decode_torch(
    tensor: common_pb2.Tensor,
    *,
    expected_dtype: DataTypeLike | None = None,
    expected_shape: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    field: str = "tensor",
    shared_memory: SharedMemoryReader | None = None,
) -> torch.Tensor:
    """Validate a ``Tensor`` and return it as a torch tensor that owns its memory (bit-exact).

    ``device``: place the result there. For a non-CPU device the only copy is host -> device.
    ``shared_memory``: reader for elements in shared memory (one copy out of the region, which the
    tensor then owns). Raises like ``decode_numpy``.
    """
    import torch

    target = torch.device(device) if device is not None else torch.device("cpu")
    data, array = _decode(tensor, expected_dtype, expected_shape, field, shared_memory)
    if target.type != "cpu":
        with warnings.catch_warnings():
            # The read-only alias lives only until .to() has copied it to the device; nothing writes it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return numpy_to_torch(array).to(target)
    shape, name = array.shape, numpy_dtype_name(array.dtype)
    del array  # drop the view's reference, so that `data` is ours alone when the message made it for us
    # References: `data` here and getrefcount's argument. More means someone else (the message itself,
    # with protobuf implementations that store bytes objects) can see these bytes: copy them.
    if sys.byteorder != "little" or not data or sys.getrefcount(data) > 2:
        return numpy_to_torch(np.frombuffer(data, NUMPY_DTYPES[name]).reshape(shape).copy())
    with warnings.catch_warnings():
        # Writable in fact: a private bytes object, kept alive by the tensor and never seen elsewhere.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=torch_dtype_for_name(name)).view(shape)


def shared_memory_reference(tensor: common_pb2.Tensor, *, field: str = "tensor") -> tuple[str, tuple[int, ...]] | None:
    """For a ``Tensor`` whose elements are in shared memory: (dtype name, shape) after the checks a
    read makes before it opens the region (dtype, dimensions, the slice's region name, offset and
    length against them: ``SharedMemoryReader.check``), without reading the elements; whoever reads
    them later (``SharedMemoryReader.read`` of ``tensor.shared_memory``) checks the slot itself.
    None for a tensor sent as bytes."""
    if not _has_shared_memory(tensor):
        return None
    _, name = _resolve_data_type(tensor.dtype, f"{field}.dtype")
    shape = tuple(int(dim) for dim in tensor.shape)
    for index, dim in enumerate(shape):
        if dim < 0:
            raise TensorFormatError(f"{field}.shape", f"dimension {index} is {dim}; dimensions must be >= 0")
    if tensor.data:
        raise TensorFormatError(field, "has both data and shared_memory set; send the elements in one of them")
    from vlm_protocol.shared_memory import SharedMemoryReader  # noqa: PLC0415 - the codec loads without it

    expected_bytes = math.prod(shape) * NUMPY_DTYPES[name].itemsize
    SharedMemoryReader.check(tensor.shared_memory, expected_length=expected_bytes, field=f"{field}.shared_memory")
    return name, shape


def _decode(
    tensor: common_pb2.Tensor,
    expected_dtype: DataTypeLike | None,
    expected_shape: Sequence[int] | None,
    field: str,
    shared_memory: SharedMemoryReader | None = None,
) -> tuple[bytes | bytearray, np.ndarray]:
    """Validate a ``Tensor``; its element bytes and an array viewing them (read-only for ``data``;
    writable for a private copy out of shared memory)."""
    _, name = _resolve_data_type(tensor.dtype, f"{field}.dtype")
    shape = tuple(int(dim) for dim in tensor.shape)
    for index, dim in enumerate(shape):
        if dim < 0:
            raise TensorFormatError(f"{field}.shape", f"dimension {index} is {dim}; dimensions must be >= 0")
    if expected_dtype is not None:
        _, expected_name = _resolve_data_type(expected_dtype, "expected_dtype")
        if name != expected_name:
            raise TensorFormatError(f"{field}.dtype", f"expected {expected_name}, got {name}")
    if expected_shape is not None:
        _check_shape(shape, expected_shape, f"{field}.shape")

    dtype = NUMPY_DTYPES[name]
    expected_bytes = math.prod(shape) * dtype.itemsize
    data: bytes | bytearray
    if _has_shared_memory(tensor):
        data = _read_shared_memory(tensor, expected_bytes, field, shared_memory)
    else:
        data = tensor.data  # read once: upb builds a new bytes object (a copy) per access
    if len(data) != expected_bytes:
        raise TensorFormatError(
            f"{field}.data",
            f"expected {expected_bytes} bytes for shape {list(shape)} of {name} "
            f"({dtype.itemsize} bytes each), got {len(data)}",
        )
    if name == "bool" and expected_bytes and np.frombuffer(data, np.uint8).max() > 1:
        raise TensorFormatError(f"{field}.data", "bool elements must be bytes 0 or 1")
    try:
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # e.g. an empty tensor whose other dimensions overflow the address space
        raise TensorFormatError(
            f"{field}.shape", f"shape {list(shape)} is not representable: {exc}"
        ) from None
    return data, array


def _has_shared_memory(tensor: common_pb2.Tensor) -> bool:
    has_field = getattr(tensor, "HasField", None)  # stand-ins of the message (tests) may lack it
    return has_field is not None and has_field("shared_memory")


def _read_shared_memory(
    tensor: common_pb2.Tensor, expected_bytes: int, field: str, reader: SharedMemoryReader | None
) -> bytearray:
    slice_ = tensor.shared_memory
    if tensor.data:
        raise TensorFormatError(
            field, "has both data and shared_memory set; send the elements in one of them"
        )
    if reader is None:
        raise SharedMemoryUnavailableError(
            f"{field} is in shared memory (region {slice_.region[:80]!r}) but this service does not accept "
            "shared-memory tensors; send the elements as bytes",
            slice_.region,
        )
    return reader.read(slice_, expected_length=expected_bytes, field=f"{field}.shared_memory")


def _check_shape(shape: tuple[int, ...], expected: Sequence[int], field: str) -> None:
    expected = tuple(int(dim) for dim in expected)
    matches = len(shape) == len(expected) and all(
        want == -1 or want == got for want, got in zip(expected, shape, strict=True)
    )
    if not matches:
        shown = ", ".join("*" if dim == -1 else str(dim) for dim in expected)
        raise TensorFormatError(field, f"expected [{shown}] (* = any size), got {list(shape)}")
