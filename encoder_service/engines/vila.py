"""VILA-1.5: SigLIP hidden state at `mm_vision_select_layer` -> 2x2-downsample MLP projector.

The checkpoint is a directory of sub-models (see `vlm_tiny.vila`); only `vision_tower/` and
`mm_projector/` are read, never `llm/`. Images are squashed to the tower's square size
(`image_aspect_ratio: "resize"`) or padded to a square with the mean colour ("pad") first. A
request may carry several images; each one is encoded on its own (no cross-image dependence).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from encoder_service.engines.base import (
    PROMPT_TABLE,
    ComputeInput,
    EncodedOutput,
    PixelNormalization,
    PreparedInput,
    SquareImageEngine,
    fixed_row_outputs,
)
from encoder_service.engines.towers import LayerSelectingTower, TowerProjector
from encoder_service.engines.weights import CheckpointTensors, load_module_weights
from vlm_tiny.vila import VilaMlpDownsampleProjector

ASPECT_MODES = ("resize", "pad")
SELECT_FEATURES = ("cls_patch", "patch")


class VilaEngine(SquareImageEngine):
    family = "vila"
    kind = PROMPT_TABLE

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compute: nn.Module | None = None,
    ) -> None:
        """`compute`: a loaded export to run instead of the eager tower + projector (none are built)."""
        config = json.loads((checkpoint_dir / "config.json").read_text())
        self.aspect_mode = config.get("image_aspect_ratio", "resize")
        self.select_feature = config.get("mm_vision_select_feature", "cls_patch")
        if self.aspect_mode not in ASPECT_MODES:
            raise ValueError(
                f"unsupported VILA image_aspect_ratio {self.aspect_mode!r}; supported: {ASPECT_MODES}"
            )
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"unsupported mm_vision_select_feature {self.select_feature!r}")
        if config.get("s2"):
            raise ValueError("VILA S2 multi-scale towers are not supported")
        self.device, self.dtype = device, dtype
        tower_dir = checkpoint_dir / "vision_tower"
        self.image_processor = AutoImageProcessor.from_pretrained(tower_dir)
        # rescale + normalize run in `encode`, on the device (see PixelNormalization)
        self.pixel_normalization = PixelNormalization.from_processor(self.image_processor)
        vision = AutoConfig.from_pretrained(tower_dir)
        self.image_size = vision.image_size
        side = vision.image_size // vision.patch_size
        # SigLIP with "cls_patch" (or CLIP with "patch", CLS dropped) leaves a square side x side grid
        self.num_rows_per_image = VilaMlpDownsampleProjector.num_output_tokens(side)

        if compute is None:
            with torch.device(device):
                tower = AutoModel.from_config(vision).eval()
            load_module_weights(tower, CheckpointTensors(tower_dir), [""], what="vision tower")
            tower = LayerSelectingTower(tower, int(config["mm_vision_select_layer"]))
            projector = VilaMlpDownsampleProjector.from_pretrained(checkpoint_dir / "mm_projector")
            drop_cls = self.select_feature == "patch"
            compute = TowerProjector(tower, projector, drop_cls=drop_cls, projector_role="mm_projector")
            compute.to(device, dtype)
        self.compute = compute
        # the projector's output width, read from its weights file so an export needs no eager projector
        self.llm_hidden_size = _projector_hidden_size(checkpoint_dir / "mm_projector")
        if config.get("hidden_size", self.llm_hidden_size) != self.llm_hidden_size:
            raise ValueError(
                f"mm_projector outputs {self.llm_hidden_size} features but the LLM hidden size is {config['hidden_size']}"
            )

    def compute_inputs(self) -> tuple[ComputeInput, ...]:
        return (ComputeInput("pixel_values", (3, self.image_size, self.image_size), self.dtype),)

    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        squares = [self._to_square(image) for image in images]
        return self._single_crop_batch(self._processor_pixels(squares), images)

    def _to_square(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if self.aspect_mode == "resize":
            return image.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)
        # "pad": LLaVA's expand2square, centred on a canvas of the normalisation mean colour
        side = max(image.size)
        background = tuple(int(x * 255) for x in self.image_processor.image_mean)
        canvas = PIL.Image.new("RGB", (side, side), background)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return canvas

    @torch.no_grad()
    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        if not self._check_batch(batch):
            return []
        features = self.compute(self._tower_batch(batch))  # [N, ceil(side / 2) ** 2, llm_hidden]
        return fixed_row_outputs(features, batch)


def _projector_hidden_size(projector_dir: Path) -> int:
    """The LLM width `mm_projector` maps to (as `VilaMlpDownsampleProjector.from_pretrained` reads it)."""
    with safe_open(str(projector_dir / "model.safetensors"), framework="pt") as f:
        return int(f.get_slice("layers.2.weight").get_shape()[0])
