"""numpy/torch <-> vlm.v1.Tensor: bit-exact round trips, wire bytes, and validation errors."""

from __future__ import annotations

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
import torch
from vlm.v1 import common_pb2

from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.tensor_codec import (
    DATA_TYPE_BY_NAME,
    TensorFormatError,
    data_type_for_name,
    data_type_for_numpy,
    decode_numpy,
    decode_torch,
    dtype_name,
    encode_numpy,
    encode_tensor,
    encode_torch,
    numpy_dtype,
)

NUMPY_TYPES = {
    "bool": np.bool_,
    "uint8": np.uint8,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}
TORCH_TYPES = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SIGNED_BITS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
ALL_NAMES = list(NUMPY_TYPES)


def _sample(name: str, shape: tuple[int, ...] = (3, 5)) -> np.ndarray:
    """Random elements covering every bit pattern class (NaNs, infs, subnormals, -0.0 for floats)."""
    rng = np.random.default_rng(ALL_NAMES.index(name))
    dtype = np.dtype(NUMPY_TYPES[name])
    if name == "bool":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 2 ** (8 * dtype.itemsize), size=shape, dtype=BITS[dtype.itemsize])
    return raw.view(dtype)


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(BITS[array.dtype.itemsize])


def _to_torch(array: np.ndarray, name: str) -> torch.Tensor:
    """Build the torch tensor independently of the codec: same bits through a signed-int view."""
    if name == "bool":
        return torch.from_numpy(array.copy())
    return torch.from_numpy(array.view(SIGNED_BITS[array.dtype.itemsize]).copy()).view(TORCH_TYPES[name])


def _torch_bits(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return _bits(tensor.numpy())


def _wire(message: common_pb2.Tensor) -> common_pb2.Tensor:
    return common_pb2.Tensor.FromString(message.SerializeToString())


def test_data_type_values_match_generated_enum():
    generated = {
        name: value for name, value in common_pb2.DataType.items() if name != "DATA_TYPE_UNSPECIFIED"
    }
    assert generated == {f"DATA_TYPE_{name.upper()}": value for name, value in DATA_TYPE_BY_NAME.items()}
    assert common_pb2.DataType.Value("DATA_TYPE_UNSPECIFIED") == 0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_name_helpers(name):
    value = data_type_for_name(name)
    assert dtype_name(value) == name
    assert data_type_for_numpy(NUMPY_TYPES[name]) == value
    assert numpy_dtype(value) == np.dtype(NUMPY_TYPES[name])
    assert numpy_dtype(name) == np.dtype(NUMPY_TYPES[name])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_numpy_round_trip_is_bit_exact(name):
    array = _sample(name)
    message = _wire(encode_numpy(array))
    assert message.dtype == common_pb2.DataType.Value(f"DATA_TYPE_{name.upper()}")
    assert list(message.shape) == [3, 5]
    assert message.data == array.astype(array.dtype.newbyteorder("<")).tobytes()
    decoded = decode_numpy(message)
    assert decoded.dtype == array.dtype and decoded.shape == (3, 5)
    np.testing.assert_array_equal(_bits(decoded), _bits(array))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_torch_round_trip_is_bit_exact(name):
    array = _sample(name)
    tensor = _to_torch(array, name)
    assert tensor.dtype == TORCH_TYPES[name]
    message = _wire(encode_torch(tensor))
    assert message.data == array.tobytes()
    decoded = decode_torch(message)
    assert decoded.dtype == TORCH_TYPES[name] and tuple(decoded.shape) == (3, 5)
    np.testing.assert_array_equal(_torch_bits(decoded), _bits(array))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_cross_library_round_trips_are_bit_exact(name):
    array = _sample(name)
    from_numpy = decode_torch(_wire(encode_numpy(array)))
    np.testing.assert_array_equal(_torch_bits(from_numpy), _bits(array))
    back = decode_numpy(_wire(encode_torch(from_numpy)))
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(_bits(back), _bits(array))
    assert encode_tensor(from_numpy) == encode_tensor(array)


def test_known_wire_bytes():
    assert encode_numpy(np.array([1.5], dtype=ml_dtypes.bfloat16)).data == b"\xc0\x3f"
    assert encode_torch(torch.tensor([1.5], dtype=torch.bfloat16)).data == b"\xc0\x3f"
    assert encode_numpy(np.array([1.0], dtype=np.float32)).data == b"\x00\x00\x80\x3f"
    assert encode_numpy(np.array([1, -2], dtype=np.int16)).data == b"\x01\x00\xfe\xff"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zero_dim_tensor(name):
    array = _sample(name, shape=())
    message = _wire(encode_numpy(array))
    assert list(message.shape) == []
    assert len(message.data) == array.dtype.itemsize
    decoded = decode_numpy(message)
    assert decoded.shape == ()
    assert _bits(decoded) == _bits(array)
    as_torch = decode_torch(message)
    assert as_torch.dim() == 0
    assert encode_torch(as_torch) == message


@pytest.mark.parametrize("name", ["bfloat16", "float32", "bool"])
def test_empty_tensor(name):
    array = np.zeros((0, 3), dtype=NUMPY_TYPES[name])
    message = _wire(encode_numpy(array))
    assert list(message.shape) == [0, 3] and message.data == b""
    assert decode_numpy(message).shape == (0, 3)
    as_torch = decode_torch(message)
    assert tuple(as_torch.shape) == (0, 3) and as_torch.dtype == TORCH_TYPES[name]
    assert encode_torch(as_torch) == message


@pytest.mark.parametrize("name", ["bfloat16", "float32", "int64"])
def test_non_contiguous_inputs(name):
    array = _sample(name, shape=(4, 6))
    for view in (array[:, ::2], array.T, array[::-1, 1:4]):
        assert not view.flags.c_contiguous
        expected = np.ascontiguousarray(view)
        decoded = decode_numpy(encode_numpy(view))
        assert decoded.shape == view.shape
        np.testing.assert_array_equal(_bits(decoded), _bits(expected))
        assert encode_numpy(view).data == expected.tobytes()

    tensor = decode_torch(encode_numpy(array))
    for view in (tensor[:, ::2], tensor.t(), tensor[1:3, 1:5]):
        assert not view.is_contiguous()
        assert encode_torch(view).data == encode_torch(view.contiguous()).data
        assert list(encode_torch(view).shape) == list(view.shape)


def test_big_endian_numpy_input_is_normalised():
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    message = encode_numpy(big)
    assert message.data == np.arange(6, dtype="<i4").tobytes()
    np.testing.assert_array_equal(decode_numpy(message), big)
    big_float = np.array([1.0, -2.5], dtype=">f8")
    assert encode_numpy(big_float).data == np.array([1.0, -2.5], dtype="<f8").tobytes()


def test_decode_numpy_is_read_only_view_unless_writable():
    message = encode_numpy(np.arange(4, dtype=np.float32))
    view = decode_numpy(message)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 7
    copy = decode_numpy(message, writable=True)
    assert copy.flags.writeable
    copy[0] = 7
    assert decode_numpy(message)[0] == 0


def test_decode_torch_owns_writable_memory():
    payload = np.arange(4, dtype=np.float32).tobytes()
    original = bytes(bytearray(payload))
    # A stand-in message whose ``data`` is always the same bytes object, so aliasing would show.
    message = SimpleNamespace(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[4], data=payload)
    tensor = decode_torch(message)
    tensor[0] = 7
    assert payload == original
    # The numpy path is the zero-copy one: it points into the message's bytes.
    address = decode_numpy(message).__array_interface__["data"][0]
    assert address == np.frombuffer(payload, np.uint8).__array_interface__["data"][0]


def test_decode_torch_of_a_wire_message_is_private_and_bit_exact():
    # A LLaVA-sized bf16 prompt table (576 x 4096 = 4.5 MiB) through real protobuf parsing: the tensor
    # takes over the bytes object that reading the field built, so it must be exact, writable and
    # shared with nothing (neither the message nor another decode of it).
    array = _sample("bfloat16", shape=(576, 4096))
    message = _wire(encode_numpy(array))
    first, second = decode_torch(message), decode_torch(message)
    assert first.dtype == torch.bfloat16 and tuple(first.shape) == (576, 4096)
    np.testing.assert_array_equal(_torch_bits(first), _bits(array))
    assert first.data_ptr() != second.data_ptr()
    first[0, 0] = 7.0
    first.add_(1)
    np.testing.assert_array_equal(_torch_bits(second), _bits(array))
    np.testing.assert_array_equal(_bits(decode_numpy(message)), _bits(array))
    assert encode_torch(second).data == array.tobytes()


def test_encode_into_existing_message():
    outer = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_INT8, shape=[9, 9], data=b"stale")
    result = encode_numpy(np.ones((2, 2), dtype=np.float16), out=outer)
    assert result is outer
    assert outer.dtype == common_pb2.DATA_TYPE_FLOAT16 and list(outer.shape) == [2, 2]
    assert len(outer.data) == 8


def _tensor(dtype: int, shape: list[int], data: bytes) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def test_byte_length_mismatch_says_expected_and_got():
    message = _tensor(common_pb2.DATA_TYPE_FLOAT32, [2, 3], b"\x00" * 20)
    with pytest.raises(TensorFormatError) as info:
        decode_numpy(message, field="embedding.features")
    text = str(info.value)
    assert "embedding.features.data" in text
    assert "expected 24 bytes" in text and "got 20" in text and "float32" in text
    assert info.value.field == "embedding.features.data"
    with pytest.raises(TensorFormatError, match="expected 24 bytes"):
        decode_torch(message)


@pytest.mark.parametrize(
    ("dtype", "needle"),
    [(99, "unknown DataType value 99"), (common_pb2.DATA_TYPE_UNSPECIFIED, "DATA_TYPE_UNSPECIFIED")],
)
def test_unknown_or_unspecified_dtype(dtype, needle):
    message = common_pb2.Tensor.FromString(_tensor(dtype, [1], b"\x00").SerializeToString())
    with pytest.raises(TensorFormatError) as info:
        decode_numpy(message)
    assert "tensor.dtype" in str(info.value) and needle in str(info.value)
    assert "bfloat16" in str(info.value)  # lists what is supported
    with pytest.raises(TensorFormatError):
        dtype_name(dtype)


def test_negative_dimension():
    with pytest.raises(TensorFormatError) as info:
        decode_numpy(_tensor(common_pb2.DATA_TYPE_UINT8, [2, -2], b""))
    assert "tensor.shape" in str(info.value) and "dimension 1 is -2" in str(info.value)


def test_unrepresentable_empty_shape():
    with pytest.raises(TensorFormatError, match="tensor.shape"):
        decode_numpy(_tensor(common_pb2.DATA_TYPE_FLOAT32, [0, 2**62], b""))


def test_invalid_bool_bytes():
    with pytest.raises(TensorFormatError, match="bool elements must be bytes 0 or 1"):
        decode_numpy(_tensor(common_pb2.DATA_TYPE_BOOL, [2], b"\x01\x02"))


def test_expected_dtype():
    message = encode_numpy(np.zeros((2, 3), dtype=np.float32))
    assert decode_numpy(message, expected_dtype="float32").dtype == np.float32
    assert decode_numpy(message, expected_dtype=common_pb2.DATA_TYPE_FLOAT32).shape == (2, 3)
    with pytest.raises(TensorFormatError) as info:
        decode_numpy(message, expected_dtype="bfloat16", field="features")
    assert "features.dtype" in str(info.value) and "expected bfloat16, got float32" in str(info.value)
    with pytest.raises(TensorFormatError, match="expected bfloat16, got float32"):
        decode_torch(message, expected_dtype=common_pb2.DATA_TYPE_BFLOAT16)


def test_expected_shape_with_wildcards():
    message = encode_numpy(np.zeros((2, 3), dtype=np.float32))
    assert decode_numpy(message, expected_shape=[-1, 3]).shape == (2, 3)
    assert decode_numpy(message, expected_shape=[2, 3]).shape == (2, 3)
    with pytest.raises(TensorFormatError) as info:
        decode_numpy(message, expected_shape=[-1, 4096])
    assert "tensor.shape" in str(info.value) and "expected [*, 4096]" in str(info.value)
    assert "got [2, 3]" in str(info.value)
    with pytest.raises(TensorFormatError, match=r"expected \[\*, \*, 3\]"):
        decode_numpy(message, expected_shape=[-1, -1, 3])  # rank mismatch


def test_unsupported_encode_types():
    for array in (np.zeros(2, dtype=np.complex64), np.zeros(2, dtype=np.uint16), np.array(["a"])):
        with pytest.raises(TensorFormatError, match="unsupported element type"):
            encode_numpy(array)
    with pytest.raises(TensorFormatError, match="unsupported element type"):
        encode_torch(torch.zeros(2, dtype=torch.complex64))


def test_tensor_format_error_is_an_invalid_argument():
    assert issubclass(TensorFormatError, InvalidArgumentError)
    assert issubclass(TensorFormatError, ValueError)
    assert TensorFormatError.status == "INVALID_ARGUMENT"
