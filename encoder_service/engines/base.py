"""The visual-engine interface shared by every model family.

Flow: `preprocess(MediaInput) -> PreparedInput` (CPU, thread-safe, the checkpoint's HF image
processor) then `encode(list[PreparedInput]) -> list[EncodedOutput]` (one model run for the batch).
The single-crop families (BLIP-2, LLaVA-1.5, VILA) stop the processor before its rescale and
normalize and apply those on the engine's device in `encode` (`PixelNormalization`), with a result
identical to the processor's.
The model-side compute (tower, projector, ...: preprocessed tensors in, features out) is one module,
`engine.compute`; `encode` wraps it with host-side batching, splitting and packing. `compute` is the
eager modules by default, or a loaded export (`engine_dir`, see `engines.exported`): the same adapter,
so preprocessing and outputs do not depend on which one runs.

Two kinds of output:
  - "prompt_table" (BLIP-2, LLaVA, VILA, OneVision): rows that replace the image placeholders in
    the LLM's input embeddings, `[num_rows, llm_hidden]` per image or video;
  - "cross_attention" (mllama): per image `[1, max_tiles, num_patches, llm_hidden]`, the KV source of
    the decoder's cross-attention layers, plus the tile metadata the LLM side needs for its mask.
"""

from __future__ import annotations

import abc
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers.image_transforms import normalize, rescale
from transformers.image_utils import ChannelDimension

from encoder_service.engines import inputs
from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.host_buffers import private_buffer

if TYPE_CHECKING:
    from encoder_service.engines.compiled import CompileSettings

logger = logging.getLogger(__name__)

PROMPT_TABLE = "prompt_table"
CROSS_ATTENTION = "cross_attention"

EngineKind = Literal["prompt_table", "cross_attention"]
MediaKind = Literal["image", "video"]


@dataclass(frozen=True)
class MediaInput:
    """One request's media: exactly one of `images`, `video_frames` or `pixel_values`.

    images: decoded pictures, in prompt order; PIL images (any mode) or uint8 arrays [H, W, C]
        (C in 1, 3, 4) or [H, W].
    video_frames: uint8 [T, H, W, 3] (families with `supports_video` only).
    pixel_values: the output of this checkpoint's HF image processor, already preprocessed:
        BLIP-2/LLaVA/VILA [n, 3, S, S] (or [3, S, S]); OneVision [n_crops, 3, S, S] for one image or
        [n, max_crops, 3, S, S] (processor padding trimmed) plus `image_sizes`; mllama
        [n, max_tiles, 3, S, S] (or the processor's [1, n, ...]) plus `aspect_ratio_ids`/`_mask`.
    num_prompt_images: how many images the prompt that uses these has, when the caller encodes a
        prompt's images separately (one per content id). OneVision tiles an image (anyres) only in
        a single-image prompt and otherwise encodes one padded square crop; default len(images).
    """

    images: Sequence[PIL.Image.Image | np.ndarray] | None = None
    video_frames: np.ndarray | None = None
    pixel_values: torch.Tensor | None = None
    image_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None  # OneVision: original (H, W) per image
    aspect_ratio_ids: torch.Tensor | None = None  # mllama: [n] (or [1, n]), 1-based
    aspect_ratio_mask: torch.Tensor | None = None  # mllama: [n, max_tiles] (or [1, n, max_tiles])
    num_prompt_images: int | None = None


@dataclass(frozen=True)
class PreparedInput:
    """Preprocessed media of one `MediaInput`, ready for `encode`; CPU tensors.

    `pixel_values` is the tower batch of this input: [sum(num_crops), 3, S, S] for CLIP/SigLIP/ViT
    families (one row per image, OneVision crop, or video frame) and [num_items, max_tiles, 3, S, S]
    for mllama. `num_crops[i]` is how many leading rows item i owns. float32: the processor's
    output (or a client's pixel_values), final; uint8: resized/cropped pixels that `encode` still
    rescales and normalizes on the device (engines with a `pixel_normalization`).
    """

    family: str
    media: MediaKind
    pixel_values: torch.Tensor
    num_crops: tuple[int, ...]
    image_sizes: tuple[tuple[int, int] | None, ...]  # original (H, W) per item; None when unknown
    anyres: bool = False  # OneVision: tiled (single-image prompt) vs one padded square crop
    aspect_ratio_ids: tuple[int, ...] = ()  # mllama, per image
    aspect_ratio_masks: tuple[tuple[int, ...], ...] = ()  # mllama, per image

    @property
    def num_items(self) -> int:
        return len(self.num_crops)


@dataclass(frozen=True)
class ComputeInput:
    """One tensor argument of an engine's `compute`, in call order; dim 0 (not in `shape`) is the batch."""

    name: str
    shape: tuple[int, ...]  # per batch row
    dtype: torch.dtype


@dataclass(frozen=True)
class EncodedOutput:
    """The features of one image (or one video) of an `encode` batch, on the CPU, in the engine dtype.

    features: prompt_table `[num_rows, llm_hidden]`; cross_attention `[1, max_tiles, num_patches, llm_hidden]`.
    input_index / item_index: which `PreparedInput` of the batch, and which of its images.
    num_rows: prompt-table rows (what the LLM's placeholder expansion must match); for
        cross_attention the KV rows per image, max_tiles * num_patches.
    num_crops: tower inputs that produced it: OneVision crops incl. the base one (HF's
        `image_num_patches`), video frames, else 1.
    """

    features: torch.Tensor
    media: MediaKind
    input_index: int
    item_index: int
    num_rows: int
    num_crops: int = 1
    image_size: tuple[int, int] | None = None  # original (H, W), when known
    num_frames: int = 0  # video
    num_tiles: int = 0  # mllama: real (non-padding) tiles
    aspect_ratio_id: int = 0  # mllama: 1-based index into supported_aspect_ratios
    aspect_ratio_mask: tuple[int, ...] = ()  # mllama: 1 per real tile, length max_tiles


class VisualEngine(abc.ABC):
    """Vision tower + projector of one checkpoint, on one device and dtype.

    `preprocess` may run concurrently from worker threads. `encode` is meant for one batching
    thread; concurrent calls are safe (CLIP/SigLIP tower calls serialise on a lock).
    """

    family: str
    kind: EngineKind
    llm_hidden_size: int
    image_size: int  # side of one square crop / tile, pixels
    num_rows_per_image: int  # fixed rows per image; 0 when it varies (OneVision)
    supports_video: bool = False
    pixel_values_extras: tuple[str, ...] = ()  # MediaInput fields that go with this family's pixel_values
    # the processor's rescale + normalize, applied to uint8 pixel values in `encode`; None: the
    # processor runs whole in `preprocess` and pixel values are always float
    pixel_normalization: PixelNormalization | None = None
    device: torch.device
    dtype: torch.dtype
    # tensors of `compute_inputs()` -> features [batch, ...]; the eager modules or a loaded export
    compute: nn.Module

    def compute_inputs(self) -> tuple[ComputeInput, ...]:
        """The arguments of `compute`, each batched along dim 0 (what an export makes dynamic)."""
        raise NotImplementedError(f"the {self.family} engine has no exportable compute")

    def preprocess(self, media: MediaInput) -> PreparedInput:
        """Validate `media` and run the image processor; raises InvalidArgumentError on bad input."""
        given = [
            name
            for name, value in (
                ("images", media.images),
                ("video_frames", media.video_frames),
                ("pixel_values", media.pixel_values),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise InvalidArgumentError(
                f"give exactly one of images, video_frames or pixel_values (got {', '.join(given) or 'none'})"
            )
        extras = [
            name
            for name in ("image_sizes", "aspect_ratio_ids", "aspect_ratio_mask")
            if getattr(media, name) is not None
        ]
        if extras and media.pixel_values is None:
            raise InvalidArgumentError(f"{', '.join(extras)} only go with pixel_values")
        unused = [name for name in extras if name not in self.pixel_values_extras]
        if unused:
            raise InvalidArgumentError(f"{', '.join(unused)} does not apply to {self.family} pixel_values")
        if media.images is not None:
            images = inputs.to_rgb_images(media.images)
            num_prompt_images = len(images) if media.num_prompt_images is None else media.num_prompt_images
            if num_prompt_images < len(images):
                raise InvalidArgumentError(
                    f"num_prompt_images is {num_prompt_images} but {len(images)} images were given"
                )
            return self._preprocess_images(images, num_prompt_images)
        if media.video_frames is not None:
            if not self.supports_video:
                raise InvalidArgumentError(f"{self.family} does not accept video; send images instead")
            return self._preprocess_video(inputs.check_video_frames(media.video_frames))
        pixel_values = inputs.check_float_tensor(media.pixel_values, "pixel_values")
        return self._prepare_pixel_values(pixel_values, media)

    @abc.abstractmethod
    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        """RGB images (validated, non-empty) -> PreparedInput."""

    def _preprocess_video(self, frames: np.ndarray) -> PreparedInput:
        raise InvalidArgumentError(f"{self.family} does not accept video; send images instead")

    @abc.abstractmethod
    def _prepare_pixel_values(self, pixel_values: torch.Tensor, media: MediaInput) -> PreparedInput:
        """Floating, finite pixel values -> PreparedInput, after a family-specific shape check."""

    @abc.abstractmethod
    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        """Encode a batch in one model run; one output per image/video, in batch then item order."""

    def submodules(self) -> dict[str, nn.Module]:
        """The loaded modules by role (tower, projector, ...): every weight this engine holds.

        By default the children of `compute` (eager: one per role; an export: its program, if it
        exposes its weights); nothing for weightless test fakes. Adapters add weights kept outside it.
        """
        compute = getattr(self, "compute", None)
        compute = getattr(compute, "wrapped_module", compute)  # a BucketedCompute reports its module's
        return dict(compute.named_children()) if compute is not None else {}

    def named_parameters(self):
        """(name, parameter) over every loaded module, names prefixed with the role."""
        for role, module in self.submodules().items():
            for name, param in module.named_parameters():
                yield f"{role}.{name}", param

    def num_parameters(self) -> int:
        return sum(param.numel() for _, param in self.named_parameters())

    def _check_batch(self, batch: Sequence[PreparedInput]) -> bool:
        """False for an empty batch; a PreparedInput of another family is a caller bug."""
        for prepared in batch:
            if prepared.family != self.family:
                raise ValueError(f"a {prepared.family} input was sent to the {self.family} engine")
        return bool(batch)

    def _tower_batch(self, batch: Sequence[PreparedInput]) -> torch.Tensor:
        """Concatenate the batch's pixel values on the engine device and dtype, normalised.

        Float rows are final and go up converted to the engine dtype; uint8 rows (raw pixels) go up as
        uint8, a quarter of float32's bytes, and `pixel_normalization` turns them into the
        processor's values on the device. A batch mixing both (images and client pixel_values) is
        assembled run by run in batch order, so each row gets exactly the treatment it would alone.

        CUDA: the rows are written, converted on the host, into one pinned buffer that is uploaded
        asynchronously: no pageable staging, and no float32 concatenation first. (A host conversion
        to bf16/fp16 rounds as the GPU would.)
        """
        tensors = [p.pixel_values for p in batch]
        runs = [(raw, list(run)) for raw, run in itertools.groupby(tensors, key=_is_raw_pixels)]
        parts = [self._upload_pixels(run, raw=raw) for raw, run in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # [rows, ...] in the engine dtype

    def _upload_pixels(self, tensors: list[torch.Tensor], *, raw: bool) -> torch.Tensor:
        """Rows of one kind (all raw uint8 or all float) -> [rows, ...] on the device in the engine dtype."""
        dtype = torch.uint8 if raw else self.dtype
        if self.device.type != "cuda":
            pixels = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
            pixels = pixels.to(device=self.device, dtype=dtype)
        else:
            # the pinned-memory cache keeps the staging buffer from reuse until the copy has run
            pixels = pinned_batch(tensors, dtype).to(self.device, non_blocking=True)
        if not raw:
            return pixels
        if self.pixel_normalization is None:
            raise ValueError(
                f"uint8 pixel values reached the {self.family} engine, which does not normalise them"
            )
        return self.pixel_normalization(pixels, self.dtype)

    # -- the CUDA fast path -----------------------------------------------------------------------

    def enable_fast_path(self, settings: CompileSettings) -> bool:
        """Run `compute` through `engines.compiled.BucketedCompute` with `settings` (a CompileSettings).

        Only for an eager compute that supports it (the LLaVA-style tower + projector: rows
        independent, no graph breaks); an export, BLIP-2 and mllama stay as they are. True if applied.
        """
        from encoder_service.engines.compiled import BucketedCompute

        compute = getattr(self, "compute", None)
        if compute is None or isinstance(compute, BucketedCompute):
            return False
        if not getattr(compute, "supports_compile", False):
            return False
        if settings.compile and settings.scope == "layer" and not hasattr(compute, "compiled_regions"):
            return False
        self.compute = BucketedCompute(compute, settings)
        return True

    def warm_up(self) -> None:
        """Compile / prepare whatever the compute needs before serving (every batch bucket of a
        BucketedCompute); nothing for eager modules. Call from the thread that will run `encode`."""
        warm_up = getattr(getattr(self, "compute", None), "warm_up", None)
        if warm_up is not None:
            with torch.no_grad():
                warm_up(self.compute_inputs(), self.device)


def _is_raw_pixels(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.uint8


class PixelNormalization:
    """An image processor's rescale + normalize, for uint8 pixels on any device (`encode`'s side).

    Why: without torchvision, HF's processors do this in numpy float math on the CPU, most of the
    preprocessing time of a single-crop image (a 336x336 picture through LLaVA-1.5's processor: 3.6 ms
    with it, 0.7 ms without, on a CPU VM); on the GPU it is microseconds, and the upload shrinks to
    uint8 (no host-side float conversion either).

    uint8 has 256 values, so the whole transform is a [C, 256] table (a row per channel), computed by
    HF's own numpy functions in HF's order (`image_transforms.rescale`: x * rescale_factor in
    float64, rounded to float32; then `normalize`: (x - mean) / std in float32) with the processor's
    `rescale_factor`, `image_mean` and `image_std`. Applying it is an index add and one gather, outside
    any compiled graph or CUDA-graph input (it runs before `compute`), and its result is
    bit-identical to the processor's output (its PIL backend; the torchvision backend fuses the two
    steps and may differ by an ulp), so embeddings, and the cache entries keyed by content id, do not
    change. Steps the processor has off (`do_rescale` / `do_normalize`) are left out; with both off
    the table is uint8 -> float. Casting the float32 table to a lower dtype before the gather rounds
    each value exactly as casting the float32 result would.
    """

    NUM_CHANNELS = 3  # RGB, as `inputs.to_rgb_images` makes every image

    def __init__(
        self,
        *,
        rescale_factor: float | None,
        image_mean: float | Sequence[float] | None,
        image_std: float | Sequence[float] | None,
    ) -> None:
        """`rescale_factor` None: no rescale; `image_mean`/`image_std` None: no normalize."""
        channels = self.NUM_CHANNELS
        # a channel-first [C, 1, 256] "image" holding every uint8 value once per channel
        values = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 1, 256)))
        first = ChannelDimension.FIRST
        if rescale_factor is not None:
            values = rescale(values, rescale_factor, input_data_format=first)  # float32
        if image_mean is not None and image_std is not None:
            values = normalize(values, image_mean, image_std, input_data_format=first)  # float32
        self.table = torch.from_numpy(values.astype(np.float32)).reshape(channels, 256)  # [C, 256] CPU
        # flat table row of channel c: c * 256 + value
        self._offsets = (torch.arange(channels, dtype=torch.int32) * 256).view(channels, 1, 1)  # [C, 1, 1]
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_processor(cls, image_processor) -> PixelNormalization:
        """The rescale + normalize that `image_processor` would apply, as its flags configure it."""
        do_rescale = bool(getattr(image_processor, "do_rescale", False))
        do_normalize = bool(getattr(image_processor, "do_normalize", False))
        return cls(
            rescale_factor=float(image_processor.rescale_factor) if do_rescale else None,
            image_mean=image_processor.image_mean if do_normalize else None,
            image_std=image_processor.image_std if do_normalize else None,
        )

    def __call__(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [..., C, H, W] on any device -> the processor's values, [..., C, H, W] in `dtype` there."""
        if pixels.dtype != torch.uint8 or pixels.ndim < 3 or pixels.shape[-3] != self.NUM_CHANNELS:
            raise ValueError(
                f"expected uint8 pixels [..., {self.NUM_CHANNELS}, H, W], got {pixels.dtype} {list(pixels.shape)}"
            )
        key = (pixels.device, dtype)
        cached = self._on_device.get(key)
        if cached is None:  # once per device and dtype (the first batch, during warm-up)
            cached = (self.table.reshape(-1).to(pixels.device, dtype), self._offsets.to(pixels.device))
            self._on_device[key] = cached
        table, offsets = cached  # [C * 256], [C, 1, 1] int32
        index = pixels + offsets  # int32 [..., C, H, W]
        # index_select on the flat index: ~2.5x faster than advanced indexing on the CPU
        return table.index_select(0, index.reshape(-1)).view(index.shape)  # [..., C, H, W]


HOST_COPY_CHUNKS = 4  # device-to-host copies in flight while earlier rows are copied out


def pinned_batch(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """CPU tensors concatenated along dim 0 into one new page-locked buffer, converted to `dtype` on
    the host (the upload half of `VisualEngine._tower_batch` on CUDA)."""
    rows = sum(t.shape[0] for t in tensors)
    staging = torch.empty((rows, *tensors[0].shape[1:]), dtype=dtype, pin_memory=True)
    start = 0
    for tensor in tensors:
        staging[start : start + tensor.shape[0]].copy_(tensor)
        start += tensor.shape[0]
    return staging


def rows_to_host(features: torch.Tensor) -> list[torch.Tensor]:
    """`features` [N, ...] -> N CPU tensors `[...]`, each in its own storage: a cache entry must not
    pin the whole batch, nor hold page-locked memory.

    CUDA: the batch goes to a pinned staging buffer in a few chunks (a pageable copy of a large batch,
    64 LLaVA images = 300 MB of bf16, ran several times slower and dominated `encode()` on H100); the
    rows of each chunk are copied out to their own pageable tensors while later chunks are still in
    flight. One transfer and one host copy per row in all; the staging buffer goes back to PyTorch's
    pinned-memory cache and serves the next batch. CPU: one copy per row (none for a lone row that
    already owns its storage).
    """
    count = features.shape[0]
    if count == 0:
        return []
    if features.device.type != "cuda":
        if count == 1 and _owns_storage(features):
            return [features[0]]
        return [_host_copy(row) for row in features]
    staging = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
    stream = torch.cuda.current_stream(features.device)
    step = -(-count // HOST_COPY_CHUNKS)
    in_flight = []
    for start in range(0, count, step):
        end = min(count, start + step)
        staging[start:end].copy_(features[start:end], non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
        in_flight.append((start, end, copied))
    rows: list[torch.Tensor] = []
    for start, end, copied in in_flight:
        copied.synchronize()
        rows.extend(_host_copy(staging[i]) for i in range(start, end))
    return rows


def tensors_to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Distinct tensors of one device, any shapes -> CPU tensors, each in its own pageable storage.

    CUDA: every tensor goes to its own pinned staging buffer asynchronously, then ONE wait for the
    device, then the copies out (a `rows_to_host` per tensor would wait once per tensor). CPU: a
    tensor that already owns its storage is returned as it is, any other is copied.
    """
    if not tensors:
        return []
    if tensors[0].device.type != "cuda":
        return [t if _owns_storage(t) else _host_copy(t) for t in tensors]
    staged = []
    for tensor in tensors:
        staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        staging.copy_(tensor, non_blocking=True)
        staged.append(staging)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensors[0].device))
    copied.synchronize()
    return [_host_copy(staging) for staging in staged]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A pageable, contiguous copy (`clone` of a pinned tensor is not guaranteed to be pageable). A
    large one goes into huge pages where the kernel offers them (`private_buffer`): zero-filling a
    fresh 4.7 MB embedding one 4 KiB page fault at a time costs more than the copy itself."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return torch.empty(tensor.shape, dtype=tensor.dtype)
    out = torch.frombuffer(private_buffer(nbytes), dtype=tensor.dtype, count=tensor.numel()).view(tensor.shape)
    out.copy_(tensor)
    return out


def _owns_storage(tensor: torch.Tensor) -> bool:
    return (
        tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


class SquareImageEngine(VisualEngine):
    """Families whose processor turns each image into one square crop (BLIP2, LLaVA-1.5, VILA).

    Their processor output is pixels alone, so its rescale + normalize move to `encode`
    (`pixel_normalization`, set by the family from its processor): `preprocess` only resizes / crops.
    """

    def _single_crop_batch(self, pixel_values: torch.Tensor, images: list[PIL.Image.Image]) -> PreparedInput:
        return PreparedInput(
            family=self.family,
            media="image",
            pixel_values=pixel_values,  # [n, 3, S, S] uint8 (normalised in `encode`) or float32
            num_crops=(1,) * len(images),
            image_sizes=tuple((im.height, im.width) for im in images),
        )

    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        return self._single_crop_batch(self._processor_pixels(images), images)

    def _processor_pixels(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """The image processor on `images` -> [n, 3, S, S]: uint8 before its rescale and normalize when
        the engine applies those (`pixel_normalization`), else the processor's float32 output."""
        if self.pixel_normalization is not None:
            if self._at_native_size(images):
                return _rgb_pixels(images)
            pixels = self._resize_and_crop(images)
            if pixels.dtype == torch.uint8:
                return pixels
            # not 8-bit after resize/crop (not seen for RGB input): the processor's own float path
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()

    def _resize_and_crop(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")[
            "pixel_values"
        ]

    def _at_native_size(self, images: list[PIL.Image.Image]) -> bool:
        """Whether the processor's resize and crop leave these images as they are, so their pixels can
        be taken directly (`_rgb_pixels`: ~0.15 ms for 336x336, against 1.4 ms through the processor's
        PIL and numpy round trips, on our CPU VM). Only RGB images of exactly the crop size qualify, and only once the
        processor has been seen to return such an image's bytes unchanged (checked on the first one,
        per engine): resize settings that would still resample, or a processor that alters pixels,
        keep every image on the processor path."""
        side = self.image_size
        if not all(im.mode == "RGB" and im.size == (side, side) for im in images):
            return False
        if self._native_size_exact is None:
            probe = images[:1]
            self._native_size_exact = bool(torch.equal(self._resize_and_crop(probe), _rgb_pixels(probe)))
            logger.info(
                "%s: %dx%d RGB images %s the image processor", self.family, side, side,
                "skip" if self._native_size_exact else "go through",
            )
        return self._native_size_exact

    _native_size_exact: bool | None = None  # see _at_native_size: None until the first such image

    def _prepare_pixel_values(self, pixel_values: torch.Tensor, media: MediaInput) -> PreparedInput:
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        size = self.image_size
        inputs.check_shape(pixel_values, "pixel_values", [None, 3, size, size], "[n, 3, H, W]")
        count = pixel_values.shape[0]
        return PreparedInput(self.family, "image", pixel_values, (1,) * count, (None,) * count)


def _rgb_pixels(images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """RGB images of one size -> [n, 3, H, W] uint8 (channels first, as the processors return them)."""
    stacked = np.stack([np.asarray(im) for im in images])  # [n, H, W, 3]
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def fixed_row_outputs(features: torch.Tensor, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
    """[num_images, rows, hidden] of a one-row-per-image tower batch (any device) -> per-image
    outputs on the CPU, each in its own storage (`rows_to_host`)."""
    rows = rows_to_host(features)
    outputs = []
    for input_index, prepared in enumerate(batch):
        for item_index in range(prepared.num_items):
            image = rows[len(outputs)]
            outputs.append(
                EncodedOutput(
                    features=image,
                    media="image",
                    input_index=input_index,
                    item_index=item_index,
                    num_rows=image.shape[0],
                    image_size=prepared.image_sizes[item_index],
                )
            )
    return outputs


def frozen_parameters(**tensors: torch.Tensor) -> nn.ParameterDict:
    """Loose tensors (query tokens, newline rows) as a module, so they count as loaded parameters."""
    return nn.ParameterDict({name: nn.Parameter(t, requires_grad=False) for name, t in tensors.items()})
