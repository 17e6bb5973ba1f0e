"""LLaVA-1.5: CLIP hidden state at `vision_feature_layer` (CLS dropped by the "default" strategy) -> MLP."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

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
from encoder_service.hf_processors import load_processor

TOWER_PREFIXES = ["vision_tower.", "model.vision_tower."]
PROJECTOR_PREFIXES = ["multi_modal_projector.", "model.multi_modal_projector."]
SELECT_STRATEGIES = ("default", "full")


class LlavaEngine(SquareImageEngine):
    family = "llava"
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
        config = LlavaConfig.from_pretrained(checkpoint_dir)
        if config.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"unsupported vision_feature_select_strategy {config.vision_feature_select_strategy!r}"
            )
        self.device, self.dtype = device, dtype
        self.image_processor = load_processor(checkpoint_dir).image_processor
        # rescale + normalize run in `encode`, on the device (see PixelNormalization)
        self.pixel_normalization = PixelNormalization.from_processor(self.image_processor)
        vision = config.vision_config
        self.image_size = vision.image_size
        self.llm_hidden_size = config.text_config.hidden_size
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.num_rows_per_image = (vision.image_size // vision.patch_size) ** 2 + (0 if self.drop_cls else 1)

        self.compute = compute if compute is not None else self._load_compute(checkpoint_dir, config)

    def _load_compute(self, checkpoint_dir: Path, config: LlavaConfig) -> TowerProjector:
        checkpoint = CheckpointTensors(checkpoint_dir)
        with torch.device(self.device):
            tower = AutoModel.from_config(config.vision_config).eval()
            projector = LlavaMultiModalProjector(config).eval()
        load_module_weights(tower, checkpoint, TOWER_PREFIXES, what="vision tower")
        load_module_weights(projector, checkpoint, PROJECTOR_PREFIXES, what="projector")
        tower = LayerSelectingTower(tower, config.vision_feature_layer)
        compute = TowerProjector(
            tower, projector, drop_cls=self.drop_cls, projector_role="multi_modal_projector"
        )
        return compute.to(self.dtype)

    def compute_inputs(self) -> tuple[ComputeInput, ...]:
        return (ComputeInput("pixel_values", (3, self.image_size, self.image_size), self.dtype),)

    @torch.no_grad()
    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        if not self._check_batch(batch):
            return []
        features = self.compute(self._tower_batch(batch))  # [N, rows, llm_hidden]
        return fixed_row_outputs(features, batch)
