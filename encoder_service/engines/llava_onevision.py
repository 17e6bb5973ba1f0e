"""LLaVA-OneVision: SigLIP + MLP projector, anyres-max tiling with unpadding and newline rows; video.

Rows handed to the LLM (what HF's `LlavaOnevisionModel` merges into the input embeddings):
  - image of a single-image prompt: the processor cuts 1 base crop (the whole image resized to one
    crop) + a gh x gw grid of crops of the best-fitting `image_grid_pinpoints` resolution. Rows =
    base crop's side*side rows, then the grid's features as one (gh*side) x (gw*side) map, unpadded
    back to the image's aspect, bilinearly shrunk when it exceeds `anyres_max_N` crops' worth
    (ratio > 1.1), with `image_newline` appended to every map row;
  - image of a multi-image prompt: one crop (padded to a square) -> side*side rows + 1 newline;
  - video: every frame is one crop (resized) -> side*side rows bilinearly pooled to
    ceil(side/2)^2, frames concatenated, then ONE newline at the end. (transformers 5.17 appends
    that newline in `forward`, 5.24 inside `get_video_features`; the LLM sees the same rows.)
The packing is ours (`pack_anyres`, `pool_video`), checked against HF in tests/encoder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, LlavaOnevisionConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

from encoder_service.engines import inputs
from encoder_service.engines.base import (
    PROMPT_TABLE,
    ComputeInput,
    EncodedOutput,
    MediaInput,
    PreparedInput,
    VisualEngine,
    frozen_parameters,
    tensors_to_host,
)
from encoder_service.engines.towers import LayerSelectingTower, TowerProjector
from encoder_service.engines.weights import CheckpointTensors, load_module_weights, load_tensor
from encoder_service.hf_processors import load_processor
from vlm_protocol.errors import InvalidArgumentError

TOWER_PREFIXES = ["vision_tower.", "model.vision_tower."]
PROJECTOR_PREFIXES = ["multi_modal_projector.", "model.multi_modal_projector."]
NEWLINE_NAMES = ["image_newline", "model.image_newline"]


class LlavaOnevisionEngine(VisualEngine):
    family = "llava_onevision"
    kind = PROMPT_TABLE
    pixel_values_extras = ("image_sizes",)
    supports_video = True
    num_rows_per_image = 0  # varies with the image size and the number of images in the prompt

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compute: nn.Module | None = None,
    ) -> None:
        """`compute`: a loaded export to run instead of the eager tower + projector (none are built)."""
        config = LlavaOnevisionConfig.from_pretrained(checkpoint_dir)
        match = re.fullmatch(r"anyres_max_(\d+)", str(config.vision_aspect_ratio))
        if match is None:
            raise ValueError(
                f"unsupported vision_aspect_ratio {config.vision_aspect_ratio!r} (want anyres_max_N)"
            )
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"unsupported vision_feature_select_strategy {config.vision_feature_select_strategy!r}"
            )
        self.max_num_crops = int(match.group(1))
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.grid_pinpoints = [list(p) for p in config.image_grid_pinpoints]
        self.device, self.dtype = device, dtype
        vision = config.vision_config
        self.image_size = vision.image_size
        self.side = vision.image_size // vision.patch_size  # feature grid side of one crop
        self.llm_hidden_size = config.text_config.hidden_size
        self.image_processor = load_processor(checkpoint_dir).image_processor
        processor_pinpoints = [list(p) for p in self.image_processor.image_grid_pinpoints]
        if processor_pinpoints != self.grid_pinpoints:
            raise ValueError("the image processor's image_grid_pinpoints differ from the model config's")
        if any(h % self.image_size or w % self.image_size for h, w in self.grid_pinpoints):
            raise ValueError(f"image_grid_pinpoints must be multiples of the crop size {self.image_size}")

        checkpoint = CheckpointTensors(checkpoint_dir)
        if compute is None:
            with torch.device(device):
                tower = AutoModel.from_config(vision).eval()
                projector = LlavaOnevisionMultiModalProjector(config).eval()
            load_module_weights(tower, checkpoint, TOWER_PREFIXES, what="vision tower")
            load_module_weights(projector, checkpoint, PROJECTOR_PREFIXES, what="projector")
            tower = LayerSelectingTower(tower, config.vision_feature_layer)
            compute = TowerProjector(
                tower, projector, drop_cls=self.drop_cls, projector_role="multi_modal_projector"
            ).to(dtype)
        self.compute = compute  # crops [N, 3, S, S] -> [N, side * side, llm_hidden]; packing stays here
        newline = load_tensor(checkpoint, NEWLINE_NAMES, what="image_newline")  # [llm_hidden]
        self.params = frozen_parameters(image_newline=newline.to(device=device, dtype=dtype))

    def submodules(self) -> dict[str, nn.Module]:
        return {**super().submodules(), "params": self.params}

    def compute_inputs(self) -> tuple[ComputeInput, ...]:
        return (ComputeInput("pixel_values", (3, self.image_size, self.image_size), self.dtype),)

    # ------------------------------------------------------------------------------ preprocess

    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        sizes = tuple((im.height, im.width) for im in images)
        if num_prompt_images == 1:
            out = self.image_processor(images=images, return_tensors="pt")
            pixel_values = out["pixel_values"][0]  # [1 + gh * gw, 3, S, S]
            return PreparedInput(
                self.family, "image", pixel_values.float(), (pixel_values.shape[0],), sizes, True
            )
        # A nested list is one multi-image prompt: the processor pads each image to a square and
        # cuts no grid. It decides that from the list length, so a lone image is sent twice.
        batch = images if len(images) > 1 else images * 2
        pixel_values = self.image_processor(images=[batch], return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values[: len(images), 0]  # [n, 3, S, S]
        return PreparedInput(self.family, "image", pixel_values.float(), (1,) * len(images), sizes, False)

    def _preprocess_video(self, frames: np.ndarray) -> PreparedInput:
        # The video transform is a plain resize to one crop with the image normalisation, i.e. the
        # image processor's base crop; a 1x1 pinpoint list keeps it from cutting a grid per frame.
        pil_frames = [PIL.Image.fromarray(frame) for frame in frames]
        size = self.image_size
        out = self.image_processor(
            images=pil_frames, image_grid_pinpoints=[[size, size]], return_tensors="pt"
        )
        pixel_values = out["pixel_values"][:, 0]  # [T, 3, S, S]
        num_frames = pixel_values.shape[0]
        return PreparedInput(
            self.family, "video", pixel_values.float(), (num_frames,), ((frames.shape[1], frames.shape[2]),)
        )

    def _prepare_pixel_values(self, pixel_values: torch.Tensor, media: MediaInput) -> PreparedInput:
        size = self.image_size
        if pixel_values.ndim == 4:
            inputs.check_shape(pixel_values, "pixel_values", [None, 3, size, size], "[crops, 3, H, W]")
            pixel_values = pixel_values[None]
        inputs.check_shape(
            pixel_values, "pixel_values", [None, None, 3, size, size], "[images, crops, 3, H, W]"
        )
        count = pixel_values.shape[0]
        if media.image_sizes is None:
            raise InvalidArgumentError(
                "OneVision pixel_values need image_sizes, the original (height, width) per image"
            )
        sizes = inputs.image_size_pairs(media.image_sizes, count)
        num_prompt_images = count if media.num_prompt_images is None else media.num_prompt_images
        if num_prompt_images < count:
            raise InvalidArgumentError(
                f"num_prompt_images is {num_prompt_images} but pixel_values holds {count} images"
            )
        anyres = num_prompt_images == 1
        num_crops = [self.num_anyres_crops(s) if anyres else 1 for s in sizes]
        for (height, width), needed in zip(sizes, num_crops, strict=True):
            if pixel_values.shape[1] < needed or (count == 1 and pixel_values.shape[1] != needed):
                raise InvalidArgumentError(
                    f"pixel_values has {pixel_values.shape[1]} crops per image but a {height}x{width} image "
                    f"needs {needed} here (base crop + anyres grid in a single-image prompt, else 1)"
                )
        crops = torch.cat(
            [pv[:n] for pv, n in zip(pixel_values, num_crops, strict=True)]
        )  # drop batch padding
        return PreparedInput(self.family, "image", crops.contiguous(), tuple(num_crops), tuple(sizes), anyres)

    def num_anyres_crops(self, image_size: tuple[int, int]) -> int:
        """Crops the processor cuts from one (height, width) image of a single-image prompt: 1 + grid."""
        grid_h, grid_w = self.grid_shape(image_size)
        return 1 + grid_h * grid_w

    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        height, width = select_best_resolution(tuple(image_size), self.grid_pinpoints)
        return height // self.image_size, width // self.image_size

    # --------------------------------------------------------------------------------- encode

    @torch.no_grad()
    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        if not self._check_batch(batch):
            return []
        features = self.compute(self._tower_batch(batch))  # [all crops and frames, side * side, llm_hidden]
        newline = self.params["image_newline"]
        packed, start = [], 0  # (input_index, item_index, num_crops, rows on the device)
        for input_index, prepared in enumerate(batch):
            for item_index, num_crops in enumerate(prepared.num_crops):
                crops = features[start : start + num_crops]
                start += num_crops
                size = prepared.image_sizes[item_index]
                if prepared.media == "video":
                    rows = pool_video(crops, self.side, newline)
                elif num_crops > 1:
                    grid = self.grid_shape(size)
                    rows = pack_anyres(crops, size, grid, self.side, self.max_num_crops, newline)
                else:
                    rows = torch.cat([crops[0], newline[None]])
                packed.append((input_index, item_index, num_crops, rows))
        host_rows = tensors_to_host([rows for *_, rows in packed])  # one wait for the device per batch
        outputs = []
        for (input_index, item_index, num_crops, _), rows in zip(packed, host_rows, strict=True):
            prepared = batch[input_index]
            outputs.append(
                EncodedOutput(
                    features=rows,
                    media=prepared.media,
                    input_index=input_index,
                    item_index=item_index,
                    num_rows=rows.shape[0],
                    num_crops=num_crops,
                    image_size=prepared.image_sizes[item_index],
                    num_frames=num_crops if prepared.media == "video" else 0,
                )
            )
        return outputs


def pack_anyres(
    crops: torch.Tensor,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    side: int,
    max_num_crops: int,
    newline: torch.Tensor,
) -> torch.Tensor:
    """[1 + gh * gw, side * side, D] crop features -> the image's rows [base rows + map rows, D]."""
    grid_h, grid_w = grid
    base, tiles = crops[0], crops[1:]
    if tiles.shape[0] != grid_h * grid_w:
        raise AssertionError(f"{tiles.shape[0]} grid crops for a {grid_h}x{grid_w} grid")
    dim = crops.shape[-1]
    # [gh, gw, side, side, D] -> [D, gh * side, gw * side]: one feature map, crops side by side
    fmap = (
        tiles.reshape(grid_h, grid_w, side, side, dim)
        .permute(4, 0, 2, 1, 3)
        .reshape(dim, grid_h * side, grid_w * side)
    )
    fmap = unpad(fmap, image_size)
    _, height, width = fmap.shape
    ratio = math.sqrt(height * width / (max_num_crops * side**2))
    if ratio > 1.1:  # anyres_max_N: shrink to about N crops' worth of rows
        fmap = F.interpolate(fmap[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
    fmap = torch.cat([fmap, newline[:, None, None].expand(dim, fmap.shape[1], 1)], dim=-1)  # newline per row
    return torch.cat([base, fmap.flatten(1).transpose(0, 1)])


def unpad(fmap: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Cut the padding the processor added around the resized image: [D, H, W] -> [D, h, w]."""
    orig_h, orig_w = image_size
    _, cur_h, cur_w = fmap.shape
    if orig_w / orig_h > cur_w / cur_h:  # image wider than the map: padding above and below
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return fmap[:, pad : cur_h - pad, :]
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return fmap[:, :, pad : cur_w - pad]


def pool_video(frames: torch.Tensor, side: int, newline: torch.Tensor) -> torch.Tensor:
    """[T, side * side, D] frame features -> [T * ceil(side / 2) ** 2 + 1, D] (2x2 bilinear, one newline)."""
    num_frames, _, dim = frames.shape
    grid = frames.reshape(num_frames, side, side, dim).permute(0, 3, 1, 2)  # [T, D, side, side]
    pooled_side = math.ceil(side / 2)
    pooled = F.interpolate(grid, size=[pooled_side, pooled_side], mode="bilinear")
    rows = pooled.permute(0, 2, 3, 1).reshape(num_frames * pooled_side**2, dim)
    return torch.cat([rows, newline[None]])
