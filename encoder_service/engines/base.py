"""The visual-engine interface shared by every model family.

Flow: `preprocess(MediaInput) -> PreparedInput` (CPU, thread-safe, the checkpoint's HF image
processor) then `encode(list[PreparedInput]) -> list[EncodedOutput]` (one model run for the batch).
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import PIL.Image
import torch
from torch import nn

from encoder_service.engines import inputs
from vlm_protocol.errors import InvalidArgumentError

if TYPE_CHECKING:
    from encoder_service.engines.compiled import CompileSettings

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
    """Preprocessed media of one `MediaInput`, ready for `encode`; CPU float32 tensors.

    `pixel_values` is the tower batch of this input: [sum(num_crops), 3, S, S] for CLIP/SigLIP/ViT
    families (one row per image, OneVision crop, or video frame) and [num_items, max_tiles, 3, S, S]
    for mllama. `num_crops[i]` is how many leading rows item i owns.
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
        """Concatenate the batch's pixel values on the engine device and dtype.

        CUDA: the rows are written, converted to the engine dtype on the host, into one pinned buffer
        that is uploaded asynchronously: half the bytes of float32 for bf16/fp16 engines, no pageable
        staging, and no float32 concatenation first. (The conversion rounds as the GPU would.)
        """
        tensors = [p.pixel_values for p in batch]
        if self.device.type != "cuda":
            pixel_values = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
            return pixel_values.to(device=self.device, dtype=self.dtype)
        # the pinned-memory cache keeps the staging buffer from reuse until the copy has run
        return pinned_batch(tensors, self.dtype).to(self.device, non_blocking=True)

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
    """A pageable, contiguous copy (`clone` of a pinned tensor is not guaranteed to be pageable)."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    out.copy_(tensor)
    return out


def _owns_storage(tensor: torch.Tensor) -> bool:
    return (
        tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


class SquareImageEngine(VisualEngine):
    """Families whose processor turns each image into one square crop (BLIP2, LLaVA-1.5, VILA)."""

    def _single_crop_batch(self, pixel_values: torch.Tensor, images: list[PIL.Image.Image]) -> PreparedInput:
        return PreparedInput(
            family=self.family,
            media="image",
            pixel_values=pixel_values.float(),  # [n, 3, S, S]
            num_crops=(1,) * len(images),
            image_sizes=tuple((im.height, im.width) for im in images),
        )

    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self._single_crop_batch(pixel_values, images)

    def _prepare_pixel_values(self, pixel_values: torch.Tensor, media: MediaInput) -> PreparedInput:
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        size = self.image_size
        inputs.check_shape(pixel_values, "pixel_values", [None, 3, size, size], "[n, 3, H, W]")
        count = pixel_values.shape[0]
        return PreparedInput(self.family, "image", pixel_values, (1,) * count, (None,) * count)


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
