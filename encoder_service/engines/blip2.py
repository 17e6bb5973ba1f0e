"""BLIP-2: ViT -> Q-Former over learned query tokens -> language projection (num_query_tokens rows)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

from encoder_service.engines.base import (
    PROMPT_TABLE,
    ComputeInput,
    EncodedOutput,
    PixelNormalization,
    PreparedInput,
    SquareImageEngine,
    fixed_row_outputs,
    frozen_parameters,
)
from encoder_service.engines.weights import CheckpointTensors, load_module_weights, load_tensor
from encoder_service.hf_processors import load_processor


class Blip2Engine(SquareImageEngine):
    family = "blip2"
    kind = PROMPT_TABLE

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compute: nn.Module | None = None,
    ) -> None:
        """`compute`: a loaded export to run instead of the eager ViT + Q-Former (none are built)."""
        config = Blip2Config.from_pretrained(checkpoint_dir)
        self.device, self.dtype = device, dtype
        self.image_processor = load_processor(checkpoint_dir).image_processor
        # rescale + normalize run in `encode`, on the device (see PixelNormalization)
        self.pixel_normalization = PixelNormalization.from_processor(self.image_processor)
        self.image_size = config.vision_config.image_size
        self.llm_hidden_size = config.text_config.hidden_size
        self.num_rows_per_image = config.num_query_tokens
        self.compute = compute if compute is not None else self._load_compute(checkpoint_dir, config)

    def _load_compute(self, checkpoint_dir: Path, config: Blip2Config) -> Blip2Compute:
        checkpoint = CheckpointTensors(checkpoint_dir)
        with torch.device(self.device):
            vision_model = Blip2VisionModel(config.vision_config).eval()
            qformer = Blip2QFormerModel(config.qformer_config).eval()
            language_projection = nn.Linear(config.qformer_config.hidden_size, self.llm_hidden_size)
        load_module_weights(vision_model, checkpoint, ["vision_model.", "model.vision_model."], what="ViT")
        load_module_weights(qformer, checkpoint, ["qformer.", "model.qformer."], what="Q-Former")
        load_module_weights(
            language_projection,
            checkpoint,
            ["language_projection.", "model.language_projection."],
            what="language projection",
        )
        query_tokens = load_tensor(checkpoint, ["query_tokens", "model.query_tokens"], what="query tokens")
        # HF keeps the Q-Former and its queries in fp32 (`_keep_in_fp32_modules`) whatever the model dtype.
        params = frozen_parameters(query_tokens=query_tokens.to(device=self.device, dtype=torch.float32))
        return Blip2Compute(
            vision_model.to(self.dtype), qformer.to(torch.float32), language_projection.to(self.dtype), params
        )

    def compute_inputs(self) -> tuple[ComputeInput, ...]:
        return (ComputeInput("pixel_values", (3, self.image_size, self.image_size), self.dtype),)

    @torch.no_grad()
    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        if not self._check_batch(batch):
            return []
        features = self.compute(self._tower_batch(batch))  # [N, Q, llm_hidden]
        return fixed_row_outputs(features, batch)


class Blip2Compute(nn.Module):
    """`[N, 3, S, S]` pixels -> ViT -> Q-Former over the query tokens -> `[N, Q, llm_hidden]`.

    Children by role: vision_model, qformer (fp32), language_projection, params (query_tokens
    `[1, Q, qformer_hidden]`, fp32).
    """

    def __init__(
        self,
        vision_model: Blip2VisionModel,
        qformer: Blip2QFormerModel,
        language_projection: nn.Linear,
        params: nn.ParameterDict,
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.qformer = qformer
        self.language_projection = language_projection
        self.params = params

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [N, P+1, vit_hidden]
        attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_output = self.qformer(
            query_embeds=self.params["query_tokens"].expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=attention_mask,
        ).last_hidden_state  # [N, Q, qformer_hidden] fp32
        projection = self.language_projection
        return projection(query_output.to(projection.weight.dtype))  # [N, Q, llm_hidden]
