"""BLIP-2: ViT -> Q-Former over learned query tokens -> language projection (num_query_tokens rows)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import nn
from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

from encoder_service.engines import inputs
from encoder_service.engines.base import (
    PROMPT_TABLE,
    EncodedOutput,
    MediaInput,
    PreparedInput,
    VisualEngine,
    fixed_row_outputs,
    frozen_parameters,
    to_host,
)
from encoder_service.engines.weights import CheckpointTensors, load_module_weights, load_tensor
from encoder_service.hf_processors import load_processor


class Blip2Engine(VisualEngine):
    family = "blip2"
    kind = PROMPT_TABLE

    def __init__(self, checkpoint_dir: Path, *, device: torch.device, dtype: torch.dtype) -> None:
        config = Blip2Config.from_pretrained(checkpoint_dir)
        self.device, self.dtype = device, dtype
        self.image_processor = load_processor(checkpoint_dir).image_processor
        self.image_size = config.vision_config.image_size
        self.llm_hidden_size = config.text_config.hidden_size
        self.num_rows_per_image = config.num_query_tokens

        checkpoint = CheckpointTensors(checkpoint_dir)
        with torch.device(device):
            self.vision_model = Blip2VisionModel(config.vision_config).eval()
            self.qformer = Blip2QFormerModel(config.qformer_config).eval()
            self.language_projection = nn.Linear(config.qformer_config.hidden_size, self.llm_hidden_size)
        load_module_weights(
            self.vision_model, checkpoint, ["vision_model.", "model.vision_model."], what="ViT"
        )
        load_module_weights(self.qformer, checkpoint, ["qformer.", "model.qformer."], what="Q-Former")
        load_module_weights(
            self.language_projection,
            checkpoint,
            ["language_projection.", "model.language_projection."],
            what="language projection",
        )
        query_tokens = load_tensor(checkpoint, ["query_tokens", "model.query_tokens"], what="query tokens")
        # HF keeps the Q-Former and its queries in fp32 (`_keep_in_fp32_modules`) whatever the model dtype.
        self.params = frozen_parameters(query_tokens=query_tokens.to(device=device, dtype=torch.float32))
        self.vision_model.to(dtype)
        self.qformer.to(torch.float32)
        self.language_projection.to(dtype)

    def submodules(self) -> dict[str, nn.Module]:
        return {
            "vision_model": self.vision_model,
            "qformer": self.qformer,
            "language_projection": self.language_projection,
            "params": self.params,  # query_tokens [1, Q, qformer_hidden], fp32
        }

    def _preprocess_images(self, images: list[PIL.Image.Image], num_prompt_images: int) -> PreparedInput:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return PreparedInput(
            family=self.family,
            media="image",
            pixel_values=pixel_values.float(),  # [n, 3, S, S]
            num_crops=(1,) * len(images),
            image_sizes=tuple((im.height, im.width) for im in images),
        )

    def _prepare_pixel_values(self, pixel_values: torch.Tensor, media: MediaInput) -> PreparedInput:
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        size = self.image_size
        inputs.check_shape(pixel_values, "pixel_values", [None, 3, size, size], "[n, 3, H, W]")
        count = pixel_values.shape[0]
        return PreparedInput(self.family, "image", pixel_values, (1,) * count, (None,) * count)

    @torch.no_grad()
    def encode(self, batch: Sequence[PreparedInput]) -> list[EncodedOutput]:
        if not self._check_batch(batch):
            return []
        pixel_values = self._tower_batch(batch)  # [N, 3, S, S]
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [N, P+1, vit_hidden]
        attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_output = self.qformer(
            query_embeds=self.params["query_tokens"].expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=attention_mask,
        ).last_hidden_state  # [N, Q, qformer_hidden] fp32
        features = to_host(self.language_projection(query_output.to(self.dtype)))  # [N, Q, llm_hidden]
        return fixed_row_outputs(features, batch)
