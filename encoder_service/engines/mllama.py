"""Llama-3.2-Vision (mllama): tiled ViT with aspect-ratio ids/mask -> projector -> cross-attention states.

Per image the output is `[1, max_tiles, num_patches, llm_hidden]` (num_patches includes the CLS row)
plus the tile metadata the LLM side turns into its cross-attention mask: `num_tiles`,
`aspect_ratio_id` (1-based into `supported_aspect_ratios`) and `aspect_ratio_mask`. Padding tiles
still get features (as in HF); the mask is what hides them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import nn
from transformers import MllamaConfig, MllamaVisionConfig, MllamaVisionModel

from encoder_service.engines import inputs
from encoder_service.engines.base import (
    CROSS_ATTENTION,
    ComputeInput,
    EncodedOutput,
    MediaInput,
    PreparedInput,
    VisualEngine,
    rows_to_host,
)
from encoder_service.engines.weights import CheckpointTensors, load_module_weights
from encoder_service.hf_processors import load_processor
from vlm_protocol.errors import InvalidArgumentError


class MllamaEngine(VisualEngine):
    family = "mllama"
    kind = CROSS_ATTENTION
    pixel_values_extras = ("aspect_ratio_ids", "aspect_ratio_mask")

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compute: nn.Module | None = None,
    ) -> None:
        """`compute`: a loaded export to run instead of the eager vision model + projector (none are built)."""
        config = MllamaConfig.from_pretrained(checkpoint_dir)
        vision = config.vision_config
        self.device, self.dtype = device, dtype
        self.image_processor = load_processor(checkpoint_dir).image_processor
        self.image_size = vision.image_size  # one tile
        self.max_tiles = vision.max_num_tiles
        self.supported_aspect_ratios = [
            tuple(r) for r in vision.supported_aspect_ratios
        ]  # (rows, cols) of tiles
        if self.image_processor.max_image_tiles != self.max_tiles:
            raise ValueError(
                f"image processor max_image_tiles={self.image_processor.max_image_tiles} but the vision model "
                f"has max_num_tiles={self.max_tiles}"
            )
        self.num_patches = (vision.image_size // vision.patch_size) ** 2 + 1  # + CLS
        self.num_rows_per_image = self.max_tiles * self.num_patches  # cross-attention KV rows
        self.llm_hidden_size = config.text_config.hidden_size

        self.compute = compute if compute is not None else self._load_compute(checkpoint_dir, vision)

    def _load_compute(self, checkpoint_dir: Path, vision: MllamaVisionConfig) -> MllamaCompute:
        checkpoint = CheckpointTensors(checkpoint_dir)
        with torch.device(self.device):
            vision_model = MllamaVisionModel(vision).eval()
            projector = nn.Linear(vision.vision_output_dim, self.llm_hidden_size, bias=True)
        load_module_weights(
            vision_model, checkpoint, ["vision_model.", "model.vision_model."], what="vision model"
        )
        load_module_weights(
            projector,
            checkpoint,
            ["multi_modal_projector.", "model.multi_modal_projector."],
            what="projector",
        )
        return MllamaCompute(vision_model, projector).to(self.dtype)

    def compute_inputs(self) -> tuple[ComputeInput, ...]:
        size, tiles = self.image_size, self.max_tiles
        return (
            ComputeInput("pixel_values", (1, tiles, 3, size, size), self.dtype),
            ComputeInput("aspect_ratio_ids", (1,), torch.long),
            ComputeInput("aspect_ratio_mask", (1, tiles), torch.long),
        )

    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        # one sample per image: every image gets its own max_tiles slots, whatever the prompt holds
        out = self.image_processor(images=[[image] for image in images], return_tensors="pt")
        return PreparedInput(
            family=self.family,
            media="image",
            pixel_values=out["pixel_values"][:, 0].float(),  # [n, max_tiles, 3, T, T]
            num_crops=(1,) * len(images),
            image_sizes=tuple((im.height, im.width) for im in images),
            aspect_ratio_ids=tuple(int(i) for i in out["aspect_ratio_ids"][:, 0].tolist()),
            aspect_ratio_masks=tuple(
                tuple(int(x) for x in m) for m in out["aspect_ratio_mask"][:, 0].tolist()
            ),
        )

    def _prepare_pixel_values(self, pixel_values: torch.Tensor, media: MediaInput) -> PreparedInput:
        size, tiles = self.image_size, self.max_tiles
        if pixel_values.ndim == 6 and pixel_values.shape[0] == 1:  # the processor's [batch=1, images, ...]
            pixel_values = pixel_values[0]
        inputs.check_shape(
            pixel_values, "pixel_values", [None, tiles, 3, size, size], "[images, max_tiles, 3, H, W]"
        )
        count = pixel_values.shape[0]
        if media.aspect_ratio_ids is None or media.aspect_ratio_mask is None:
            raise InvalidArgumentError("mllama pixel_values need aspect_ratio_ids and aspect_ratio_mask")
        ids = _int_tensor(media.aspect_ratio_ids, "aspect_ratio_ids").reshape(-1).tolist()
        masks = _int_tensor(media.aspect_ratio_mask, "aspect_ratio_mask")
        if len(ids) != count or masks.numel() != count * tiles:
            raise InvalidArgumentError(
                f"aspect_ratio_ids must have {count} entries and aspect_ratio_mask shape [{count}, {tiles}] "
                f"to match pixel_values (got {len(ids)} ids and mask shape {list(masks.shape)})"
            )
        masks_list = [tuple(m) for m in masks.reshape(count, tiles).tolist()]
        for ratio_id, mask in zip(ids, masks_list, strict=True):
            if not 1 <= ratio_id <= len(self.supported_aspect_ratios):
                raise InvalidArgumentError(
                    f"aspect_ratio_id {ratio_id} is out of range 1..{len(self.supported_aspect_ratios)}"
                )
            rows, cols = self.supported_aspect_ratios[ratio_id - 1]
            expected = (1,) * (rows * cols) + (0,) * (tiles - rows * cols)
            if mask != expected:
                raise InvalidArgumentError(
                    f"aspect_ratio_mask {list(mask)} does not match aspect_ratio_id {ratio_id} "
                    f"({rows}x{cols} tiles -> {list(expected)})"
                )
        return PreparedInput(
            self.family,
            "image",
            pixel_values,
            (1,) * count,
            (None,) * count,
            aspect_ratio_ids=tuple(ids),
            aspect_ratio_masks=tuple(masks_list),
        )

    @torch.no_grad()
    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        if not self._check_batch(batch):
            return []
        pixel_values = self._tower_batch(batch)  # [N, max_tiles, 3, T, T]
        ids = torch.tensor([i for p in batch for i in p.aspect_ratio_ids], device=self.device)
        masks = torch.tensor([m for p in batch for m in p.aspect_ratio_masks], device=self.device)
        # each image is its own sample: [N, 1 image, ...]
        features = rows_to_host(
            self.compute(pixel_values[:, None], ids[:, None], masks[:, None])
        )  # N x [1, max_tiles, num_patches, llm_hidden] on the CPU
        outputs, row = [], 0
        for input_index, prepared in enumerate(batch):
            for item_index in range(prepared.num_items):
                mask = prepared.aspect_ratio_masks[item_index]
                outputs.append(
                    EncodedOutput(
                        features=features[row],
                        media="image",
                        input_index=input_index,
                        item_index=item_index,
                        num_rows=self.num_rows_per_image,
                        image_size=prepared.image_sizes[item_index],
                        num_tiles=sum(mask),
                        aspect_ratio_id=prepared.aspect_ratio_ids[item_index],
                        aspect_ratio_mask=mask,
                    )
                )
                row += 1
        return outputs


class MllamaCompute(nn.Module):
    """Tiled ViT + projector: pixel_values `[N, 1, max_tiles, 3, T, T]`, aspect_ratio_ids `[N, 1]`
    (1-based), aspect_ratio_mask `[N, 1, max_tiles]` -> `[N, 1, max_tiles, num_patches, llm_hidden]`."""

    def __init__(self, vision_model: MllamaVisionModel, multi_modal_projector: nn.Linear) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.multi_modal_projector = multi_modal_projector

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.vision_model(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
        ).last_hidden_state  # [N, 1, max_tiles, num_patches, vision_output_dim]
        return self.multi_modal_projector(hidden)


def _int_tensor(value, name: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(f"{name} must be an integer tensor") from exc
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise InvalidArgumentError(f"{name} must hold integers, got {tensor.dtype}")
    return tensor.to(torch.long)
