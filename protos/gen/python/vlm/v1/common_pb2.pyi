from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_INT8: _ClassVar[DataType]
    DATA_TYPE_INT16: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]

class EmbeddingTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_TRANSPORT_UNSPECIFIED: _ClassVar[EmbeddingTransport]
    EMBEDDING_TRANSPORT_BYTES: _ClassVar[EmbeddingTransport]
    EMBEDDING_TRANSPORT_SHARED_MEMORY: _ClassVar[EmbeddingTransport]

class ModelFamily(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FAMILY_UNSPECIFIED: _ClassVar[ModelFamily]
    MODEL_FAMILY_BLIP2: _ClassVar[ModelFamily]
    MODEL_FAMILY_LLAVA: _ClassVar[ModelFamily]
    MODEL_FAMILY_VILA: _ClassVar[ModelFamily]
    MODEL_FAMILY_LLAVA_ONEVISION: _ClassVar[ModelFamily]
    MODEL_FAMILY_MLLAMA: _ClassVar[ModelFamily]

class MediaType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_TYPE_UNSPECIFIED: _ClassVar[MediaType]
    MEDIA_TYPE_IMAGE: _ClassVar[MediaType]
    MEDIA_TYPE_VIDEO: _ClassVar[MediaType]

class EmbeddingKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_KIND_UNSPECIFIED: _ClassVar[EmbeddingKind]
    EMBEDDING_KIND_PROMPT_TABLE: _ClassVar[EmbeddingKind]
    EMBEDDING_KIND_CROSS_ATTENTION: _ClassVar[EmbeddingKind]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_BOOL: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_INT8: DataType
DATA_TYPE_INT16: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
EMBEDDING_TRANSPORT_UNSPECIFIED: EmbeddingTransport
EMBEDDING_TRANSPORT_BYTES: EmbeddingTransport
EMBEDDING_TRANSPORT_SHARED_MEMORY: EmbeddingTransport
MODEL_FAMILY_UNSPECIFIED: ModelFamily
MODEL_FAMILY_BLIP2: ModelFamily
MODEL_FAMILY_LLAVA: ModelFamily
MODEL_FAMILY_VILA: ModelFamily
MODEL_FAMILY_LLAVA_ONEVISION: ModelFamily
MODEL_FAMILY_MLLAMA: ModelFamily
MEDIA_TYPE_UNSPECIFIED: MediaType
MEDIA_TYPE_IMAGE: MediaType
MEDIA_TYPE_VIDEO: MediaType
EMBEDDING_KIND_UNSPECIFIED: EmbeddingKind
EMBEDDING_KIND_PROMPT_TABLE: EmbeddingKind
EMBEDDING_KIND_CROSS_ATTENTION: EmbeddingKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemorySlice
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemorySlice, _Mapping]] = ...) -> None: ...

class SharedMemorySlice(_message.Message):
    __slots__ = ("region", "offset", "length", "generation")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    length: int
    generation: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "url", "pixels_hwc_uint8", "pixel_values")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    PIXELS_HWC_UINT8_FIELD_NUMBER: _ClassVar[int]
    PIXEL_VALUES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    url: str
    pixels_hwc_uint8: Tensor
    pixel_values: Tensor
    def __init__(self, data: _Optional[bytes] = ..., url: _Optional[str] = ..., pixels_hwc_uint8: _Optional[_Union[Tensor, _Mapping]] = ..., pixel_values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("data", "url", "frames", "num_frames")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    url: str
    frames: Tensor
    num_frames: int
    def __init__(self, data: _Optional[bytes] = ..., url: _Optional[str] = ..., frames: _Optional[_Union[Tensor, _Mapping]] = ..., num_frames: _Optional[int] = ...) -> None: ...

class MediaItem(_message.Message):
    __slots__ = ("image", "video", "content_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    image: Image
    video: Video
    content_id: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., video: _Optional[_Union[Video, _Mapping]] = ..., content_id: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("content_id", "kind", "features", "media_type", "model_family", "model_fingerprint", "processor_config_hash", "num_rows", "num_prompt_tokens", "source_height", "source_width", "num_frames", "num_patches", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles")
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROCESSOR_CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_PATCHES_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_IDS_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_MASK_FIELD_NUMBER: _ClassVar[int]
    NUM_TILES_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    kind: EmbeddingKind
    features: Tensor
    media_type: MediaType
    model_family: ModelFamily
    model_fingerprint: str
    processor_config_hash: str
    num_rows: int
    num_prompt_tokens: int
    source_height: int
    source_width: int
    num_frames: int
    num_patches: int
    aspect_ratio_ids: Tensor
    aspect_ratio_mask: Tensor
    num_tiles: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, content_id: _Optional[str] = ..., kind: _Optional[_Union[EmbeddingKind, str]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., media_type: _Optional[_Union[MediaType, str]] = ..., model_family: _Optional[_Union[ModelFamily, str]] = ..., model_fingerprint: _Optional[str] = ..., processor_config_hash: _Optional[str] = ..., num_rows: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., source_height: _Optional[int] = ..., source_width: _Optional[int] = ..., num_frames: _Optional[int] = ..., num_patches: _Optional[int] = ..., aspect_ratio_ids: _Optional[_Union[Tensor, _Mapping]] = ..., aspect_ratio_mask: _Optional[_Union[Tensor, _Mapping]] = ..., num_tiles: _Optional[_Iterable[int]] = ...) -> None: ...
