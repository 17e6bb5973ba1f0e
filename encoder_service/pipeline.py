"""The encoder's request flow, free of gRPC and protobuf.

Per item: fetch (URL) -> content id -> cache -> decode -> preprocess -> micro-batch -> engine -> cache.
CPU work (fetching, hashing, decoding, the HF processor) runs in thread pools; the model runs in the
batcher's single thread; the event loop only coordinates. Identical items of one request are encoded
once. Errors name the item (``items[i]: ...``) and fail the whole request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image

from encoder_service import media
from encoder_service.batcher import BatchResult, MicroBatcher
from encoder_service.cache import CacheStats, EmbeddingCache
from encoder_service.config import EncoderConfig
from encoder_service.engines.base import EncodedOutput, MediaInput, PreparedInput, VisualEngine
from encoder_service.fetch import MediaFetcher
from vlm_protocol import media_ids
from vlm_protocol.content_id import validate_content_id
from vlm_protocol.dtypes import numpy_to_torch
from vlm_protocol.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError, VlmError

logger = logging.getLogger(__name__)

MediaType = Literal["image", "video"]
SourceKind = Literal["data", "url", "pixels", "pixel_values", "frames"]

# Families whose processor output is pixels alone, so clients may send it preprocessed.
PIXEL_VALUES_FAMILIES = frozenset({"blip2", "llava", "vila"})
STAGES = ("queue", "fetch", "decode", "preprocess", "encode")
_RECORD_OVERHEAD_BYTES = 512  # dataclass, dict slot and tensor object bookkeeping per cache entry

R = TypeVar("R")


@dataclass(frozen=True)
class MediaRequestItem:
    """One item of an Encode request, already checked for form (convert.py) but not content.

    Exactly the field matching ``source`` is set: ``data`` (encoded file), ``url`` (http(s), data:,
    file: or a path), or ``array`` (uint8 [H, W, 3] pixels, float [3, S, S] pixel values, or uint8
    [T, H, W, 3] frames). ``num_frames`` is the video's requested frame count (0 = default).
    """

    media_type: MediaType
    source: SourceKind
    data: bytes = b""
    url: str = ""
    array: np.ndarray | None = None
    num_frames: int = 0
    client_content_id: str = ""
    num_prompt_images: int = 1  # images in the prompt this item is for (LLaVA-OneVision tiles only alone)


@dataclass(frozen=True)
class EmbeddingRecord:
    """An encoded item as cached: the engine output plus what the Embedding message needs."""

    content_id: str
    media_type: MediaType
    output: EncodedOutput
    source_size: tuple[int, int] | None  # (height, width) of the decoded image / frames
    num_frames: int

    @property
    def num_bytes(self) -> int:
        features = self.output.features
        return features.numel() * features.element_size() + _RECORD_OVERHEAD_BYTES


@dataclass(frozen=True)
class ItemResult:
    record: EmbeddingRecord
    is_cached: bool


@dataclass
class StageClock:
    """Wall-clock intervals per stage; a stage's time is the union of its intervals (items overlap)."""

    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: {s: [] for s in STAGES})

    def add(self, stage: str, start: float, end: float) -> None:
        self.intervals[stage].append((start, end))

    def milliseconds(self) -> dict[str, float]:
        result = {}
        for stage, spans in self.intervals.items():
            total, reach = 0.0, float("-inf")
            for start, end in sorted(spans):
                if end > reach:
                    total += end - max(start, reach)
                    reach = end
            result[stage] = total * 1000.0
        return result


@dataclass(frozen=True)
class EncodeOutcome:
    results: list[ItemResult]
    stage_ms: dict[str, float]


@dataclass(frozen=True)
class _Loaded:
    """An item's media with its content id, before decoding."""

    content_id: str
    payload: bytes | np.ndarray
    num_frames: int  # videos: frames to sample/encode; 0 for images


class EncoderPipeline:
    """Owns the engine, the batcher, the cache and the worker pools of one server."""

    def __init__(
        self,
        config: EncoderConfig,
        engine: VisualEngine,
        identity: media_ids.PreprocessingIdentity,
        *,
        fetcher: MediaFetcher | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.identity = identity
        self.limits = config.limits
        self.cache: EmbeddingCache[EmbeddingRecord] = EmbeddingCache(config.cache_bytes)
        self.fetcher = fetcher or MediaFetcher(config.url_policy, max_bytes=config.limits.max_media_bytes)
        self.batcher: MicroBatcher[PreparedInput, EncodedOutput] = MicroBatcher(
            self._run_engine,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
            max_queue_size=config.max_queue_size,
        )
        self._workers = concurrent.futures.ThreadPoolExecutor(
            config.num_workers, thread_name_prefix="encoder-cpu"
        )
        self._fetchers = concurrent.futures.ThreadPoolExecutor(
            config.num_fetch_workers, thread_name_prefix="encoder-fetch"
        )
        self.is_ready = False

    @property
    def supports_pixel_values(self) -> bool:
        return self.engine.family in PIXEL_VALUES_FAMILIES

    @property
    def num_model_batches(self) -> int:
        return self.batcher.num_batches

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    async def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """Prepare the engine in the model thread (compile every batch bucket of a compiled engine),
        run one dummy image through preprocessing and the model (not cached), then mark ready."""
        started = time.perf_counter()
        await self.batcher.run_in_model_thread(self.engine.warm_up)
        side = max(int(self.engine.image_size), 1)
        image = Image.new("RGB", (side, side), (127, 127, 127))
        prepared = await self._in_pool(self._workers, self.engine.preprocess, MediaInput(images=[image]))
        await self.batcher.submit(prepared)
        self.is_ready = True
        logger.info("encoder warmed up in %.0f ms", (time.perf_counter() - started) * 1000.0)

    async def close(self) -> None:
        self.is_ready = False
        await self.batcher.close()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._fetchers.shutdown(wait=False, cancel_futures=True)

    # -- Encode ------------------------------------------------------------------------------------

    def check_request(self, num_items: int) -> None:
        """Readiness and item-count checks, cheap enough to run before any conversion."""
        if not self.is_ready:
            raise UnavailableError("the encoder is warming up; retry shortly")
        if num_items == 0:
            raise InvalidArgumentError("the request has no items; send at least one image or video")
        limit = self.limits.max_items_per_request
        if num_items > limit:
            raise InvalidArgumentError(
                f"the request has {num_items} items, over the limit of {limit} (max_items_per_request)"
            )

    async def run_cpu(self, fn: Callable[..., R], *args: Any) -> R:
        """Run CPU-bound ``fn`` in the worker pool (e.g. building large responses)."""
        return await self._in_pool(self._workers, fn, *args)

    async def encode(self, items: Sequence[MediaRequestItem], *, bypass_cache: bool = False) -> EncodeOutcome:
        self.check_request(len(items))
        for index, item in enumerate(items):
            self._check_supported(index, item)
        clock = StageClock()
        shared: dict[str, asyncio.Future[EmbeddingRecord]] = {}
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._encode_item(index, item, clock, shared, bypass_cache))
                    for index, item in enumerate(items)
                ]
        except ExceptionGroup as group:
            raise _first_error(group) from None
        finally:
            for future in shared.values():
                if not future.done():
                    future.cancel()
        return EncodeOutcome([task.result() for task in tasks], clock.milliseconds())

    def lookup(self, content_ids: Sequence[str]) -> list[EmbeddingRecord | None]:
        """Cached records for ``content_ids`` (None when absent); refreshes recency, counts nothing."""
        return [self.cache.peek(content_id, touch=True) for content_id in content_ids]

    def _check_supported(self, index: int, item: MediaRequestItem) -> None:
        if item.media_type == "video" and not self.engine.supports_video:
            raise FailedPreconditionError(
                f"items[{index}]: this model ({self.engine.family}) does not accept video; "
                "only llava_onevision does"
            )
        if item.source == "pixel_values" and not self.supports_pixel_values:
            raise FailedPreconditionError(
                f"items[{index}]: this model ({self.engine.family}) does not accept pixel_values; "
                "send the image itself"
            )
        if item.client_content_id:
            validate_content_id(item.client_content_id, field=f"items[{index}].content_id")
        if item.source == "pixel_values":
            self._check_pixel_values(index, item.array)
        if item.media_type == "video" and not 0 <= item.num_frames <= self.limits.max_video_frames:
            raise InvalidArgumentError(
                f"items[{index}].video.num_frames is {item.num_frames}; it must be in "
                f"[0, {self.limits.max_video_frames}] (max_video_frames; 0 = server default)"
            )

    def _check_pixel_values(self, index: int, array: np.ndarray | None) -> None:
        assert array is not None
        side = int(self.engine.image_size)
        if array.dtype.name not in ("float32", "float16", "bfloat16"):
            raise InvalidArgumentError(
                f"items[{index}].image.pixel_values must be float32, float16 or bfloat16, got {array.dtype.name}"
            )
        if tuple(array.shape) != (3, side, side):
            raise InvalidArgumentError(
                f"items[{index}].image.pixel_values must have shape [3, {side}, {side}] (this model's "
                f"processor output for one image), got {list(array.shape)}"
            )

    async def _encode_item(
        self,
        index: int,
        item: MediaRequestItem,
        clock: StageClock,
        shared: dict[str, asyncio.Future[EmbeddingRecord]],
        bypass_cache: bool,
    ) -> ItemResult:
        try:
            loaded = await self._load(item, clock)
            if item.client_content_id and item.client_content_id != loaded.content_id:
                raise InvalidArgumentError(
                    f"content_id {item.client_content_id} does not match the media, whose id is "
                    f"{loaded.content_id}; compute it with vlm_protocol.media_ids (or leave it empty)"
                )
            if not bypass_cache:
                record = self.cache.get(loaded.content_id)
                if record is not None:
                    return ItemResult(record, is_cached=True)
            earlier = shared.get(loaded.content_id)
            if earlier is not None:  # the same media appears earlier in this request
                return ItemResult(await earlier, is_cached=False)
            future: asyncio.Future[EmbeddingRecord] = asyncio.get_running_loop().create_future()
            shared[loaded.content_id] = future
            try:
                record = await self._encode_loaded(item, loaded, clock)
            except asyncio.CancelledError:
                future.cancel()
                raise
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved here: this task raises it itself
                raise
            future.set_result(record)
            self.cache.put(record.content_id, record, record.num_bytes)
            return ItemResult(record, is_cached=False)
        except VlmError as exc:
            if not exc.message.startswith("items["):
                exc.message = f"items[{index}]: {exc.message}"
                exc.args = (exc.message,)
            raise

    async def _load(self, item: MediaRequestItem, clock: StageClock) -> _Loaded:
        """Bytes or array of the item and its content id (fetching URLs under the URL policy)."""
        max_bytes = self.limits.max_media_bytes
        payload: bytes | np.ndarray
        if item.source == "url":
            started = time.perf_counter()
            fetched = await self._in_pool(self._fetchers, self.fetcher.fetch, item.url)
            clock.add("fetch", started, time.perf_counter())
            payload = fetched.data
        elif item.source == "data":
            media.check_media_bytes(item.data, max_bytes=max_bytes, what=f"{item.media_type} data")
            payload = item.data
        else:
            assert item.array is not None
            payload = item.array
        num_frames = self._num_frames(item, payload) if item.media_type == "video" else 0
        content_id = await self._in_pool(self._workers, self._content_id, item, payload, num_frames)
        return _Loaded(content_id, payload, num_frames)

    def _num_frames(self, item: MediaRequestItem, payload: bytes | np.ndarray) -> int:
        """Frames the video will be encoded with (part of the content id)."""
        if isinstance(payload, np.ndarray):
            available = int(payload.shape[0])
            if item.num_frames > available:
                raise InvalidArgumentError(
                    f"video.num_frames is {item.num_frames} but the frames tensor has only {available}"
                )
            wanted = item.num_frames or available
            if wanted > self.limits.max_video_frames:
                raise InvalidArgumentError(
                    f"video has {wanted} frames, over the limit of {self.limits.max_video_frames} "
                    "(max_video_frames); send fewer or set num_frames"
                )
            return wanted
        return item.num_frames or self.limits.default_num_frames

    def _content_id(self, item: MediaRequestItem, payload: bytes | np.ndarray, num_frames: int) -> str:
        identity = self.identity
        prompt_images = None
        if item.media_type == "image":
            prompt_images = media_ids.prompt_images_key(self.engine.family, item.num_prompt_images)
        if isinstance(payload, bytes):
            if item.media_type == "video":
                return media_ids.encoded_media_id(
                    media_ids.VIDEO_BYTES, payload, identity, num_frames=num_frames
                )
            return media_ids.encoded_media_id(
                media_ids.IMAGE_BYTES, payload, identity, num_prompt_images=prompt_images
            )
        kind = {
            "pixels": media_ids.IMAGE_PIXELS,
            "pixel_values": media_ids.IMAGE_PIXEL_VALUES,
            "frames": media_ids.VIDEO_FRAMES,
        }[item.source]
        return media_ids.array_media_id(
            kind,
            payload,
            identity,
            num_frames=num_frames if item.media_type == "video" else None,
            num_prompt_images=prompt_images,
        )

    async def _encode_loaded(
        self, item: MediaRequestItem, loaded: _Loaded, clock: StageClock
    ) -> EmbeddingRecord:
        prepared, source_size, num_frames = await self._in_pool(
            self._workers, self._prepare, item, loaded, clock
        )
        result: BatchResult[EncodedOutput] = await self.batcher.submit(prepared)
        clock.add("queue", result.enqueued_at, result.started_at)
        clock.add("encode", result.started_at, result.finished_at)
        return EmbeddingRecord(loaded.content_id, item.media_type, result.output, source_size, num_frames)

    def _prepare(
        self, item: MediaRequestItem, loaded: _Loaded, clock: StageClock
    ) -> tuple[PreparedInput, tuple[int, int] | None, int]:
        """Decode + preprocess (worker thread). Returns (prepared, (height, width), num_frames)."""
        limits = self.limits
        started = time.perf_counter()
        source_size: tuple[int, int] | None = None
        num_frames = 0
        payload = loaded.payload
        if item.media_type == "image":
            if item.source == "pixel_values":
                assert isinstance(payload, np.ndarray)
                media_input = MediaInput(pixel_values=numpy_to_torch(np.array(payload)))
            else:
                if isinstance(payload, bytes):
                    image = media.decode_image(payload, max_image_pixels=limits.max_image_pixels)
                else:
                    image = media.image_from_pixels(payload, max_image_pixels=limits.max_image_pixels)
                source_size = (image.height, image.width)
                media_input = MediaInput(images=[image], num_prompt_images=item.num_prompt_images)
        else:
            if isinstance(payload, bytes):
                frames = media.decode_video(
                    payload,
                    num_frames=loaded.num_frames,
                    max_image_pixels=limits.max_image_pixels,
                    max_scan_frames=limits.max_video_scan_frames,
                ).frames
            else:
                media.check_frames(payload, max_image_pixels=limits.max_image_pixels)
                frames = payload[media.sample_frame_indices(payload.shape[0], loaded.num_frames)]
            frames = np.ascontiguousarray(frames)  # [T, H, W, 3] uint8
            source_size = (int(frames.shape[1]), int(frames.shape[2]))
            num_frames = int(frames.shape[0])
            media_input = MediaInput(video_frames=frames)
        decoded = time.perf_counter()
        clock.add("decode", started, decoded)
        prepared = self.engine.preprocess(media_input)
        clock.add("preprocess", decoded, time.perf_counter())
        return prepared, source_size, num_frames

    def _run_engine(self, batch: list[PreparedInput]) -> list[EncodedOutput]:
        """Model thread: one engine run; one output per prepared input (each holds one item)."""
        outputs = self.engine.encode(batch)
        by_input: list[list[EncodedOutput]] = [[] for _ in batch]
        for output in outputs:
            by_input[output.input_index].append(output)
        if any(len(group) != 1 for group in by_input):
            raise RuntimeError(
                f"engine returned {[len(g) for g in by_input]} outputs per input; expected 1 each"
            )
        return [_own_memory(group[0]) for group in by_input]

    async def _in_pool(self, pool: concurrent.futures.Executor, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report for a failed request: the first domain error, else the first bug."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    return next((error for error in leaves if isinstance(error, VlmError)), leaves[0])


def _own_memory(output: EncodedOutput) -> EncodedOutput:
    """Features on the CPU in their own storage, so a cached entry never pins a whole batch tensor."""
    features = output.features.detach()
    if features.device.type != "cpu":
        features = features.cpu()
    if (
        not features.is_contiguous()
        or features.untyped_storage().nbytes() > features.numel() * features.element_size()
    ):
        features = features.contiguous().clone()
    if features is output.features:
        return output
    return dataclasses.replace(output, features=features)
