"""Canonical element types shared by the tensor codec and content ids.

Ten element types cross the wire. Each has one canonical lowercase name (``"bfloat16"``,
``"float32"``, ...) used in content ids, error messages and ``DataType`` look-ups, and one
little-endian numpy dtype. bfloat16 is ``ml_dtypes.bfloat16`` on the numpy side.

Torch is imported lazily: ``torch_to_numpy``/``numpy_to_torch`` are only reached with torch objects,
so importing this module never loads torch (the client SDK runs without it).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from vlm_protocol.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

# Canonical name -> little-endian numpy dtype. Order follows the proto DataType enum.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype(np.bool_),
    "uint8": np.dtype("<u1"),
    "int8": np.dtype("<i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

DTYPE_NAMES: tuple[str, ...] = tuple(NUMPY_DTYPES)

_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _is_big_endian(dtype: np.dtype) -> bool:
    return dtype.byteorder == ">" or (dtype.byteorder == "=" and _BIG_ENDIAN_HOST)


def numpy_dtype_name(dtype: np.dtype) -> str:
    """Canonical name of a numpy dtype, ignoring byte order; raises for unsupported types."""
    dtype = np.dtype(dtype)
    if dtype == NUMPY_DTYPES["bfloat16"]:
        return "bfloat16"
    if dtype.kind in "biuf":
        name = dtype.newbyteorder("=").name
        if name in NUMPY_DTYPES:
            return name
    raise InvalidArgumentError(
        f"unsupported element type {dtype.str!r} ({dtype.name}); supported: {', '.join(DTYPE_NAMES)}"
    )


def to_little_endian(array: np.ndarray) -> np.ndarray:
    """``array`` with little-endian elements: itself when already so, else a byte-swapped C-order copy."""
    if _is_big_endian(array.dtype):
        return array.astype(array.dtype.newbyteorder("<"), order="C")
    return array


def is_torch_tensor(value: object) -> bool:
    """True for a ``torch.Tensor`` without importing torch (if torch is not loaded, it cannot be one)."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def _torch_dtype_names() -> dict[Any, str]:
    import torch

    return {
        torch.bool: "bool",
        torch.uint8: "uint8",
        torch.int8: "int8",
        torch.int16: "int16",
        torch.int32: "int32",
        torch.int64: "int64",
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
        torch.float32: "float32",
        torch.float64: "float64",
    }


def torch_dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of a torch dtype; raises ``InvalidArgumentError`` for unsupported types."""
    names = _torch_dtype_names()
    if dtype not in names:
        raise InvalidArgumentError(f"unsupported element type {dtype}; supported: {', '.join(DTYPE_NAMES)}")
    return names[dtype]


def torch_dtype_for_name(name: str) -> torch.dtype:
    """The torch dtype for a canonical name."""
    for dtype, dtype_name in _torch_dtype_names().items():
        if dtype_name == name:
            return dtype
    raise InvalidArgumentError(f"unknown element type {name!r}; supported: {', '.join(DTYPE_NAMES)}")


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy array with the same elements, bit for bit (bfloat16 via an int16 view, no float cast).

    Shares memory with ``tensor`` when it is already on the CPU; a device tensor is copied to the host.
    Non-contiguous tensors stay non-contiguous (the caller decides whether to copy).
    """
    import torch

    if tensor.layout != torch.strided:
        raise InvalidArgumentError(f"unsupported tensor layout {tensor.layout}; pass a dense tensor")
    name = torch_dtype_name(tensor.dtype)
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if name == "bfloat16":
        # numpy has no native bfloat16: reinterpret the 16-bit patterns (same-size views keep strides).
        return tensor.view(torch.int16).numpy().view(NUMPY_DTYPES["bfloat16"])
    return tensor.resolve_conj().resolve_neg().numpy()


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A CPU torch tensor with the same elements, bit for bit; shares memory with ``array``.

    ``array`` must be writable, native byte order and aligned (copy it first otherwise): torch has no
    read-only tensors, so wrapping immutable memory would let later writes corrupt it.
    """
    import torch

    name = numpy_dtype_name(array.dtype)
    if name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
