"""Hugging Face reference runs for engine parity: greedy ids, and the exact image rows HF merged.

The rows are captured from what HF feeds its language model (a forward pre-hook), so the engine is
compared on the LLM side alone, whatever each family's vision path does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from encoder_service.hf_processors import load_processor
from llm_service.engine.model_runner import CROSS_ATTENTION, PROMPT_TABLE, MultimodalEmbedding
from vlm_protocol.content_id import content_id_for_array


@dataclass
class Reference:
    prompt_token_ids: list[int]  # as HF tokenized the prompt (placeholders expanded)
    output_token_ids: list[int]
    embeddings: list[MultimodalEmbedding]
    first_logprobs: torch.Tensor | None = None  # [V] log-softmax of HF's first-step logits


class _Capture:
    def __init__(self) -> None:
        self.kwargs: dict | None = None

    def __call__(self, module, args, kwargs):
        if self.kwargs is None:
            self.kwargs = dict(kwargs)


def _embedding_id(tensor: torch.Tensor) -> str:
    return content_id_for_array("test/embedding", tensor.float().contiguous().numpy(), {})


class HFReference:
    """One loaded HF model + processor for a tiny checkpoint (not VILA: see `VilaHFReference`)."""

    def __init__(self, family: str, ckpt: Path) -> None:
        self.family = family
        self.processor = load_processor(ckpt)
        self.model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
        self.config = self.model.config

    @torch.no_grad()
    def run(self, prompt: str, images: list | None, max_new_tokens: int, videos: list | None = None) -> Reference:
        kwargs = {"text": prompt, "return_tensors": "pt"}
        if images:
            # one prompt: a nested list, so OneVision sees a multi-image sample (one crop per image,
            # no anyres tiling) as LLaVA-OneVision was trained; a flat list would tile each image
            kwargs["images"] = [images] if self.family == "llava_onevision" else images
        if videos and getattr(self.processor, "video_processor", None) is None:
            inputs = self._video_inputs_without_torchvision(prompt, videos)
        else:
            if videos:
                kwargs["videos"] = videos
            inputs = self.processor(**kwargs)
        capture = _Capture()
        language_model = getattr(self.model, "language_model", None) or self.model.model.language_model
        handle = language_model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        finally:
            handle.remove()
        ids = inputs["input_ids"][0].tolist()
        embeddings = self._embeddings(inputs, capture.kwargs, ids) if (images or videos) else []
        first = out.scores[0][0].float().log_softmax(-1)
        return Reference(ids, out.sequences[0, len(ids) :].tolist(), embeddings, first)

    def _video_inputs_without_torchvision(self, prompt: str, videos: list) -> dict:
        """OneVision video inputs on a host without torchvision: each frame's base crop from the image
        processor is the video processor's transform; `<video>` expands to frames * pooled rows + 1."""
        (frames,) = videos
        pixels = torch.stack(
            [self.processor.image_processor(f, return_tensors="pt")["pixel_values"][0, 0] for f in frames]
        )
        vision = self.config.vision_config
        grid = vision.image_size // vision.patch_size
        num_tokens = len(frames) * (-(-grid // 2)) ** 2 + 1
        inputs = self.processor.tokenizer(prompt.replace("<video>", "<video>" * num_tokens), return_tensors="pt")
        return {**inputs, "pixel_values_videos": pixels[None]}

    def _embeddings(self, inputs, captured: dict, ids: list[int]) -> list[MultimodalEmbedding]:
        if self.family == "mllama":
            states = captured["cross_attention_states"]  # [B * n_img * tiles, P, H]
            num_tiles = [int(n) for n in inputs["aspect_ratio_mask"][0].sum(-1).tolist()]
            max_tiles = inputs["aspect_ratio_mask"].shape[-1]
            features = states.reshape(len(num_tiles), max_tiles, states.shape[-2], states.shape[-1])
            return [
                MultimodalEmbedding(_embedding_id(features[i]), CROSS_ATTENTION, features[i : i + 1], "image", (n,))
                for i, n in enumerate(num_tiles)
            ]
        embeds = captured["inputs_embeds"][0]  # [S, H]
        # transformers 5.17 names these *_token_index on some configs, 5.24 *_token_id
        image_id = getattr(self.config, "image_token_id", None) or self.config.image_token_index
        placeholder_ids = {image_id}
        video_id = getattr(self.config, "video_token_id", None) or getattr(self.config, "video_token_index", None)
        if video_id is not None:
            placeholder_ids.add(video_id)
        # consecutive runs of the same placeholder id are one image (or video)
        result, start = [], None
        for pos in range(len(ids) + 1):
            inside = pos < len(ids) and ids[pos] in placeholder_ids
            if inside and start is None:
                start = pos
            elif start is not None and (not inside or ids[pos] != ids[start]):
                rows = embeds[start:pos].clone()
                media = "video" if ids[start] == video_id else "image"
                result.append(MultimodalEmbedding(_embedding_id(rows), PROMPT_TABLE, rows, media))
                start = pos if inside else None
        return result


class VilaHFReference:
    """VILA through the parts transformers has (SigLIP + our projector + LlamaForCausalLM)."""

    def __init__(self, ckpt: Path) -> None:
        from vlm_tiny.vila import VilaReference

        self.ref = VilaReference(ckpt)

    @torch.no_grad()
    def run(self, prompt: str, images: list | None, max_new_tokens: int) -> Reference:
        images = images or []
        embeds, mask = self.ref.build_inputs_embeds(prompt, images)
        out = self.ref.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=False, output_scores=True, return_dict_in_generate=True,
        )
        rows = self.ref.encode_images(images) if images else []
        embeddings = [MultimodalEmbedding(_embedding_id(r), PROMPT_TABLE, r.clone(), "image") for r in rows]
        ids = self.ref.tokenizer(prompt).input_ids
        expanded: list[int] = []
        for t in ids:
            expanded += [t] * (embeddings[0].features.shape[0] if t == self.ref.image_token_id else 1)
        return Reference(expanded, out.sequences[0].tolist(), embeddings, out.scores[0][0].float().log_softmax(-1))
