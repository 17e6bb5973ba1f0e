"""Wire-level helpers shared by the client SDK, encoder_service and llm_service.

``errors`` is imported eagerly (pure Python). Everything else loads on first attribute access, so
``import vlm_protocol`` pulls in neither torch, nor grpc, nor the generated stubs; the gRPC server
bootstrap (health, reflection) loads only when one of its names is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlm_protocol.errors import (
    MISSING_CONTENT_IDS_METADATA_KEY,
    SHARED_MEMORY_UNAVAILABLE_METADATA_KEY,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    SharedMemoryUnavailableError,
    StaleSharedMemoryError,
    UnavailableError,
    VlmError,
    error_for_status,
    format_missing_content_ids,
    parse_missing_content_ids,
)

if TYPE_CHECKING:
    from vlm_protocol.content_id import (
        CONTENT_ID_PREFIX,
        canonical_preprocessing,
        content_id_for_array,
        content_id_for_bytes,
        is_valid_content_id,
        parse_content_id,
        validate_content_id,
    )
    from vlm_protocol.grpc_server import (
        RunningServer,
        ServerConfig,
        ServiceRegistration,
        build_server,
        handle_rpc_errors,
        install_signal_handlers,
        start_server,
        status_for_exception,
    )
    from vlm_protocol.tensor_codec import (
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

__all__ = [
    "MISSING_CONTENT_IDS_METADATA_KEY",
    "SHARED_MEMORY_UNAVAILABLE_METADATA_KEY",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "SharedMemoryUnavailableError",
    "StaleSharedMemoryError",
    "UnavailableError",
    "VlmError",
    "error_for_status",
    "format_missing_content_ids",
    "parse_missing_content_ids",
    "CONTENT_ID_PREFIX",
    "canonical_preprocessing",
    "content_id_for_array",
    "content_id_for_bytes",
    "is_valid_content_id",
    "parse_content_id",
    "validate_content_id",
    "RunningServer",
    "ServerConfig",
    "ServiceRegistration",
    "build_server",
    "handle_rpc_errors",
    "install_signal_handlers",
    "start_server",
    "status_for_exception",
    "TensorFormatError",
    "data_type_for_name",
    "data_type_for_numpy",
    "decode_numpy",
    "decode_torch",
    "dtype_name",
    "encode_numpy",
    "encode_tensor",
    "encode_torch",
    "numpy_dtype",
]

# Name -> module it is loaded from on first access.
_LAZY: dict[str, str] = {
    "CONTENT_ID_PREFIX": "vlm_protocol.content_id",
    "canonical_preprocessing": "vlm_protocol.content_id",
    "content_id_for_array": "vlm_protocol.content_id",
    "content_id_for_bytes": "vlm_protocol.content_id",
    "is_valid_content_id": "vlm_protocol.content_id",
    "parse_content_id": "vlm_protocol.content_id",
    "validate_content_id": "vlm_protocol.content_id",
    "RunningServer": "vlm_protocol.grpc_server",
    "ServerConfig": "vlm_protocol.grpc_server",
    "ServiceRegistration": "vlm_protocol.grpc_server",
    "build_server": "vlm_protocol.grpc_server",
    "handle_rpc_errors": "vlm_protocol.grpc_server",
    "install_signal_handlers": "vlm_protocol.grpc_server",
    "start_server": "vlm_protocol.grpc_server",
    "status_for_exception": "vlm_protocol.grpc_server",
    "TensorFormatError": "vlm_protocol.tensor_codec",
    "data_type_for_name": "vlm_protocol.tensor_codec",
    "data_type_for_numpy": "vlm_protocol.tensor_codec",
    "decode_numpy": "vlm_protocol.tensor_codec",
    "decode_torch": "vlm_protocol.tensor_codec",
    "dtype_name": "vlm_protocol.tensor_codec",
    "encode_numpy": "vlm_protocol.tensor_codec",
    "encode_tensor": "vlm_protocol.tensor_codec",
    "encode_torch": "vlm_protocol.tensor_codec",
    "numpy_dtype": "vlm_protocol.tensor_codec",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'vlm_protocol' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
