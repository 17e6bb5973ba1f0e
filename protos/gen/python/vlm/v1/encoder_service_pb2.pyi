from vlm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "items", "output_dtype", "bypass_cache", "num_prompt_images", "output_transport")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BYPASS_CACHE_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.MediaItem]
    output_dtype: _common_pb2.DataType
    bypass_cache: bool
    num_prompt_images: int
    output_transport: _common_pb2.EmbeddingTransport
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_common_pb2.MediaItem, _Mapping]]] = ..., output_dtype: _Optional[_Union[_common_pb2.DataType, str]] = ..., bypass_cache: _Optional[bool] = ..., num_prompt_images: _Optional[int] = ..., output_transport: _Optional[_Union[_common_pb2.EmbeddingTransport, str]] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("embedding", "cached")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.Embedding
    cached: bool
    def __init__(self, embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class EncodeTimings(_message.Message):
    __slots__ = ("queue_ms", "fetch_ms", "decode_ms", "preprocess_ms", "encode_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    fetch_ms: float
    decode_ms: float
    preprocess_ms: float
    encode_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., fetch_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("request_id", "results", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[EncodeResult]
    timings: EncodeTimings
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[EncodeResult, _Mapping]]] = ..., timings: _Optional[_Union[EncodeTimings, _Mapping]] = ...) -> None: ...

class LookupEmbeddingsRequest(_message.Message):
    __slots__ = ("content_ids", "return_embeddings", "output_dtype")
    CONTENT_IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    content_ids: _containers.RepeatedScalarFieldContainer[str]
    return_embeddings: bool
    output_dtype: _common_pb2.DataType
    def __init__(self, content_ids: _Optional[_Iterable[str]] = ..., return_embeddings: _Optional[bool] = ..., output_dtype: _Optional[_Union[_common_pb2.DataType, str]] = ...) -> None: ...

class LookupEmbeddingsResponse(_message.Message):
    __slots__ = ("found_content_ids", "missing_content_ids", "embeddings")
    FOUND_CONTENT_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_CONTENT_IDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    found_content_ids: _containers.RepeatedScalarFieldContainer[str]
    missing_content_ids: _containers.RepeatedScalarFieldContainer[str]
    embeddings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Embedding]
    def __init__(self, found_content_ids: _Optional[_Iterable[str]] = ..., missing_content_ids: _Optional[_Iterable[str]] = ..., embeddings: _Optional[_Iterable[_Union[_common_pb2.Embedding, _Mapping]]] = ...) -> None: ...

class EncoderServiceGetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EncoderLimits(_message.Message):
    __slots__ = ("max_items_per_request", "max_media_bytes", "max_image_pixels", "max_video_frames", "max_receive_message_bytes", "max_send_message_bytes", "url_fetch_timeout_ms")
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MEDIA_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_VIDEO_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEND_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    URL_FETCH_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    max_items_per_request: int
    max_media_bytes: int
    max_image_pixels: int
    max_video_frames: int
    max_receive_message_bytes: int
    max_send_message_bytes: int
    url_fetch_timeout_ms: float
    def __init__(self, max_items_per_request: _Optional[int] = ..., max_media_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_video_frames: _Optional[int] = ..., max_receive_message_bytes: _Optional[int] = ..., max_send_message_bytes: _Optional[int] = ..., url_fetch_timeout_ms: _Optional[float] = ...) -> None: ...

class EncoderServiceGetModelInfoResponse(_message.Message):
    __slots__ = ("model_family", "model_id", "model_fingerprint", "processor_config_hash", "embedding_kind", "llm_hidden_size", "output_dtype", "num_rows_per_image", "num_rows_rule", "image_size", "supports_video", "default_num_frames", "supports_url", "supports_pixel_values", "limits", "shared_memory_available")
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROCESSOR_CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KIND_FIELD_NUMBER: _ClassVar[int]
    LLM_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_RULE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_VIDEO_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_URL_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_PIXEL_VALUES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    model_family: _common_pb2.ModelFamily
    model_id: str
    model_fingerprint: str
    processor_config_hash: str
    embedding_kind: _common_pb2.EmbeddingKind
    llm_hidden_size: int
    output_dtype: _common_pb2.DataType
    num_rows_per_image: int
    num_rows_rule: str
    image_size: int
    supports_video: bool
    default_num_frames: int
    supports_url: bool
    supports_pixel_values: bool
    limits: EncoderLimits
    shared_memory_available: bool
    def __init__(self, model_family: _Optional[_Union[_common_pb2.ModelFamily, str]] = ..., model_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., processor_config_hash: _Optional[str] = ..., embedding_kind: _Optional[_Union[_common_pb2.EmbeddingKind, str]] = ..., llm_hidden_size: _Optional[int] = ..., output_dtype: _Optional[_Union[_common_pb2.DataType, str]] = ..., num_rows_per_image: _Optional[int] = ..., num_rows_rule: _Optional[str] = ..., image_size: _Optional[int] = ..., supports_video: _Optional[bool] = ..., default_num_frames: _Optional[int] = ..., supports_url: _Optional[bool] = ..., supports_pixel_values: _Optional[bool] = ..., limits: _Optional[_Union[EncoderLimits, _Mapping]] = ..., shared_memory_available: _Optional[bool] = ...) -> None: ...
