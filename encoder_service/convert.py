"""Protobuf <-> domain conversion for the encoder service; the only module that touches vlm.v1 messages
besides the servicer.

Wire-level checks happen here (which oneof is set, tensor dtype and shape form, enum values) and raise
``InvalidArgumentError`` naming the field; model-level checks live in the pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence

import numpy as np
import torch
from vlm.v1 import common_pb2, encoder_service_pb2

from encoder_service.config import EncoderConfig
from encoder_service.engines.base import CROSS_ATTENTION
from encoder_service.pipeline import EmbeddingRecord, EncodeOutcome, EncoderPipeline, MediaRequestItem
from vlm_protocol.content_id import validate_content_id
from vlm_protocol.errors import InvalidArgumentError, SharedMemoryUnavailableError
from vlm_protocol.shared_memory import SharedMemoryRing, SharedMemoryRingFullError
from vlm_protocol.tensor_codec import data_type_for_name, decode_numpy, encode_numpy, encode_torch

logger = logging.getLogger(__name__)

MAX_LOOKUP_IDS = 4096

FAMILY_TO_PROTO = {
    "blip2": common_pb2.MODEL_FAMILY_BLIP2,
    "llava": common_pb2.MODEL_FAMILY_LLAVA,
    "vila": common_pb2.MODEL_FAMILY_VILA,
    "llava_onevision": common_pb2.MODEL_FAMILY_LLAVA_ONEVISION,
    "mllama": common_pb2.MODEL_FAMILY_MLLAMA,
}
_OUTPUT_DTYPES = {
    common_pb2.DATA_TYPE_FLOAT32: "float32",
    common_pb2.DATA_TYPE_FLOAT16: "float16",
    common_pb2.DATA_TYPE_BFLOAT16: "bfloat16",
}
_DATA_TYPE_FOR_NAME = {name: value for value, name in _OUTPUT_DTYPES.items()}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ROWS_RULES = {
    "llava_onevision": (
        "images: anyres_max tiling of the base view plus crops, unpadded to the image's aspect ratio, "
        "one image_newline row per feature row (depends on the image size); videos: num_frames x the "
        "2x2-pooled patch grid + 1 newline row. Read Embedding.num_rows."
    ),
    "mllama": "cross-attention: features are [1, max_num_tiles, num_patches, hidden] per image; 1 prompt token.",
}


# -- requests -> domain -------------------------------------------------------------------------------


def items_from_request(request: encoder_service_pb2.EncodeRequest) -> list[MediaRequestItem]:
    items = [_item_from_proto(index, item) for index, item in enumerate(request.items)]
    if request.num_prompt_images < 0:
        raise InvalidArgumentError(f"num_prompt_images must be >= 0, got {request.num_prompt_images}")
    num_images = request.num_prompt_images or sum(item.media_type == "image" for item in items)
    return [dataclasses.replace(item, num_prompt_images=max(num_images, 1)) for item in items]


def _item_from_proto(index: int, item: common_pb2.MediaItem) -> MediaRequestItem:
    field = f"items[{index}]"
    content_id = item.content_id
    which = item.WhichOneof("media")
    if which == "image":
        image = item.image
        source = image.WhichOneof("source")
        if source == "data":
            return MediaRequestItem("image", "data", data=image.data, client_content_id=content_id)
        if source == "url":
            return MediaRequestItem("image", "url", url=image.url, client_content_id=content_id)
        if source == "pixels_hwc_uint8":
            array = decode_numpy(
                image.pixels_hwc_uint8,
                expected_dtype="uint8",
                expected_shape=(-1, -1, 3),
                field=f"{field}.image.pixels_hwc_uint8",
            )
            return MediaRequestItem("image", "pixels", array=array, client_content_id=content_id)
        if source == "pixel_values":
            array = decode_numpy(image.pixel_values, field=f"{field}.image.pixel_values")
            return MediaRequestItem("image", "pixel_values", array=array, client_content_id=content_id)
        raise InvalidArgumentError(f"{field}.image: set one of data, url, pixels_hwc_uint8 or pixel_values")
    if which == "video":
        video = item.video
        source = video.WhichOneof("source")
        num_frames = video.num_frames
        if source == "data":
            return MediaRequestItem(
                "video", "data", data=video.data, num_frames=num_frames, client_content_id=content_id
            )
        if source == "url":
            return MediaRequestItem(
                "video", "url", url=video.url, num_frames=num_frames, client_content_id=content_id
            )
        if source == "frames":
            array = decode_numpy(
                video.frames,
                expected_dtype="uint8",
                expected_shape=(-1, -1, -1, 3),
                field=f"{field}.video.frames",
            )
            return MediaRequestItem(
                "video", "frames", array=array, num_frames=num_frames, client_content_id=content_id
            )
        raise InvalidArgumentError(f"{field}.video: set one of data, url or frames")
    raise InvalidArgumentError(f"{field}: set image or video")


def output_dtype_from_proto(value: int, default: str, *, field: str = "output_dtype") -> str:
    if value == common_pb2.DATA_TYPE_UNSPECIFIED:
        return default
    name = _OUTPUT_DTYPES.get(value)
    if name is None:
        shown = common_pb2.DataType.Name(value) if value in common_pb2.DataType.values() else str(value)
        raise InvalidArgumentError(
            f"{field} {shown} is not a float output type; use DATA_TYPE_FLOAT16, DATA_TYPE_BFLOAT16 or "
            "DATA_TYPE_FLOAT32 (or leave it unset for the server default)"
        )
    return name


def shared_memory_for_request(
    request: encoder_service_pb2.EncodeRequest, ring: SharedMemoryRing | None
) -> SharedMemoryRing | None:
    """The ring to write this request's features into: None for bytes transport."""
    transport = request.output_transport
    if transport in (common_pb2.EMBEDDING_TRANSPORT_UNSPECIFIED, common_pb2.EMBEDDING_TRANSPORT_BYTES):
        return None
    if transport != common_pb2.EMBEDDING_TRANSPORT_SHARED_MEMORY:
        raise InvalidArgumentError(
            f"output_transport {transport} is not an EmbeddingTransport value; use "
            "EMBEDDING_TRANSPORT_BYTES or EMBEDDING_TRANSPORT_SHARED_MEMORY"
        )
    if ring is None:
        raise SharedMemoryUnavailableError(  # FAILED_PRECONDITION, with the trailer clients recognise
            "output_transport EMBEDDING_TRANSPORT_SHARED_MEMORY needs an encoder started with "
            "--shared-memory-mb N (and an LLM service on the same host); this one has no shared-memory "
            "region: request EMBEDDING_TRANSPORT_BYTES"
        )
    return ring


def lookup_ids_from_request(request: encoder_service_pb2.LookupEmbeddingsRequest) -> list[str]:
    if len(request.content_ids) > MAX_LOOKUP_IDS:
        raise InvalidArgumentError(
            f"content_ids has {len(request.content_ids)} entries, over the limit of {MAX_LOOKUP_IDS}"
        )
    return [validate_content_id(cid, field=f"content_ids[{i}]") for i, cid in enumerate(request.content_ids)]


# -- domain -> responses ------------------------------------------------------------------------------


def encode_response(
    request_id: str,
    outcome: EncodeOutcome,
    pipeline: EncoderPipeline,
    output_dtype: str,
    total_ms: float,
    *,
    shared_memory: SharedMemoryRing | None = None,
) -> encoder_service_pb2.EncodeResponse:
    """The Encode response; with ``shared_memory`` the features go into that ring (see fill_embedding)."""
    response = encoder_service_pb2.EncodeResponse(request_id=request_id)
    written: list[int] = []  # this response's slots: a later item must not overwrite them
    for result in outcome.results:
        entry = response.results.add(cached=result.is_cached)
        generation = fill_embedding(
            entry.embedding, result.record, pipeline, output_dtype, shared_memory=shared_memory, keep=written
        )
        if generation is not None:
            written.append(generation)
    stages = outcome.stage_ms
    timings = response.timings
    timings.queue_ms = stages["queue"]
    timings.fetch_ms = stages["fetch"]
    timings.decode_ms = stages["decode"]
    timings.preprocess_ms = stages["preprocess"]
    timings.encode_ms = stages["encode"]
    timings.total_ms = total_ms
    return response


def lookup_response(
    content_ids: Sequence[str],
    records: Sequence[EmbeddingRecord | None],
    pipeline: EncoderPipeline,
    *,
    return_embeddings: bool,
    output_dtype: str,
) -> encoder_service_pb2.LookupEmbeddingsResponse:
    response = encoder_service_pb2.LookupEmbeddingsResponse()
    for content_id, record in zip(content_ids, records, strict=True):
        if record is None:
            response.missing_content_ids.append(content_id)
            continue
        response.found_content_ids.append(content_id)
        if return_embeddings:
            fill_embedding(response.embeddings.add(), record, pipeline, output_dtype)
    return response


def fill_embedding(
    embedding: common_pb2.Embedding,
    record: EmbeddingRecord,
    pipeline: EncoderPipeline,
    output_dtype: str,
    *,
    shared_memory: SharedMemoryRing | None = None,
    keep: Collection[int] = (),
) -> int | None:
    """Write ``record`` into ``embedding`` (features cast to ``output_dtype``).

    With ``shared_memory`` the features are written into a slot of that ring and ``features`` carries
    only the slice; the slot's generation is returned. An item that gets no slot (larger than the ring,
    or it would overwrite a slot in ``keep`` or one being written) goes as bytes, and None is returned.
    """
    engine = pipeline.engine
    output = record.output
    features = output.features
    target = _TORCH_DTYPES[output_dtype]
    generation = None
    if shared_memory is not None:
        generation = _write_shared_memory(shared_memory, features, output_dtype, embedding.features, keep)
    if generation is None:
        encode_torch(features if features.dtype == target else features.to(target), out=embedding.features)
    embedding.content_id = record.content_id
    embedding.media_type = (
        common_pb2.MEDIA_TYPE_VIDEO if record.media_type == "video" else common_pb2.MEDIA_TYPE_IMAGE
    )
    embedding.model_family = FAMILY_TO_PROTO.get(engine.family, common_pb2.MODEL_FAMILY_UNSPECIFIED)
    embedding.model_fingerprint = pipeline.identity.model_fingerprint
    embedding.processor_config_hash = pipeline.identity.processor_config_hash
    embedding.num_rows = output.num_rows
    if engine.kind == CROSS_ATTENTION:
        embedding.kind = common_pb2.EMBEDDING_KIND_CROSS_ATTENTION
        embedding.num_prompt_tokens = 1
        encode_numpy(_int64([output.aspect_ratio_id]), out=embedding.aspect_ratio_ids)  # [num_images]
        encode_numpy(_int64([list(output.aspect_ratio_mask)]), out=embedding.aspect_ratio_mask)  # [1, tiles]
        embedding.num_tiles.append(output.num_tiles)
    else:
        embedding.kind = common_pb2.EMBEDDING_KIND_PROMPT_TABLE
        embedding.num_prompt_tokens = output.num_rows
    size = record.source_size or output.image_size
    if size is not None:
        embedding.source_height, embedding.source_width = int(size[0]), int(size[1])
    embedding.num_frames = record.num_frames
    if engine.family == "llava_onevision" and record.media_type == "image":
        embedding.num_patches = output.num_crops
    return generation


def _write_shared_memory(
    ring: SharedMemoryRing,
    features: torch.Tensor,
    output_dtype: str,
    out: common_pb2.Tensor,
    keep: Collection[int],
) -> int | None:
    """Cast and copy ``features`` straight into a ring slot (one pass; a device tensor goes device ->
    host into the slot) and point ``out`` at it. None when the item gets no slot."""
    target = _TORCH_DTYPES[output_dtype]
    numel = features.numel()
    nbytes = numel * target.itemsize
    if nbytes == 0:
        return None
    try:
        slice_, view = ring.reserve(nbytes, keep=keep)
    except (SharedMemoryRingFullError, SharedMemoryUnavailableError) as exc:
        logger.debug("embedding of %d bytes goes as bytes: %s", nbytes, exc)
        return None
    try:
        slot = torch.frombuffer(view, dtype=target, count=numel).view(features.shape)
        slot.copy_(features)
        del slot  # nothing may point into the slot once it is published
    except BaseException:
        view.release()
        ring.abandon(slice_)
        raise
    view.release()
    try:
        ring.publish(slice_)
    except SharedMemoryUnavailableError:  # the ring was closed meanwhile (shutdown)
        return None
    out.Clear()
    out.dtype = data_type_for_name(output_dtype)
    out.shape.extend(features.shape)
    shm = out.shared_memory
    shm.region, shm.offset, shm.length, shm.generation = (
        slice_.region,
        slice_.offset,
        slice_.length,
        slice_.generation,
    )
    return slice_.generation


def model_info_response(
    pipeline: EncoderPipeline, config: EncoderConfig, *, shared_memory_available: bool = False
) -> encoder_service_pb2.EncoderServiceGetModelInfoResponse:
    engine = pipeline.engine
    limits = config.limits
    policy = config.url_policy
    is_cross = engine.kind == CROSS_ATTENTION
    return encoder_service_pb2.EncoderServiceGetModelInfoResponse(
        model_family=FAMILY_TO_PROTO.get(engine.family, common_pb2.MODEL_FAMILY_UNSPECIFIED),
        model_id=config.display_model_id,
        model_fingerprint=pipeline.identity.model_fingerprint,
        processor_config_hash=pipeline.identity.processor_config_hash,
        embedding_kind=(
            common_pb2.EMBEDDING_KIND_CROSS_ATTENTION if is_cross else common_pb2.EMBEDDING_KIND_PROMPT_TABLE
        ),
        llm_hidden_size=engine.llm_hidden_size,
        output_dtype=_DATA_TYPE_FOR_NAME[config.default_output_dtype],
        num_rows_per_image=0 if is_cross else engine.num_rows_per_image,
        num_rows_rule=""
        if engine.num_rows_per_image and not is_cross
        else _ROWS_RULES.get(engine.family, ""),
        image_size=engine.image_size,
        supports_video=engine.supports_video,
        default_num_frames=limits.default_num_frames,
        supports_url=policy.allow_fetch,
        supports_pixel_values=pipeline.supports_pixel_values,
        limits=encoder_service_pb2.EncoderLimits(
            max_items_per_request=limits.max_items_per_request,
            max_media_bytes=limits.max_media_bytes,
            max_image_pixels=limits.max_image_pixels,
            max_video_frames=limits.max_video_frames,
            max_receive_message_bytes=config.server.max_message_bytes,
            max_send_message_bytes=config.server.max_message_bytes,
            url_fetch_timeout_ms=policy.total_timeout_s * 1000.0,
        ),
        shared_memory_available=shared_memory_available,
    )


def _int64(values: list) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)
