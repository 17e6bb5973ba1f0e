"""Tiny LLaVA-1.5 checkpoint in the Hugging Face `llava-hf/llava-1.5-*-hf` layout.

One directory: config.json + model.safetensors (LlavaForConditionalGeneration: CLIP vision tower,
2-layer GELU MLP projector, Llama decoder), preprocessor_config.json (CLIPImageProcessor),
processor_config.json (LlavaProcessor), tokenizer.json/tokenizer_config.json, chat_template.jinja
and generation_config.json. As in llava-1.5, the projector reads the vision tower's second-to-last
hidden state with CLS dropped ("default" strategy): 32 px / patch 8 -> 4x4 = 16 tokens per image
(real: 336 / 14 -> 576).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlm_tiny.common import randomize_weights_, save_processor_hub_layout
from vlm_tiny.tokenizer import build_tokenizer

BUILDER_VERSION = 1

IMAGE_SIZE = 32  # real: 336
PATCH_SIZE = 8  # real: 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

# llava-1.5 conversation style: "USER: <image>\n<text> ASSISTANT: <answer></s>". Images of a turn are
# rendered before its text; content may be a plain string or a list of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'] | upper ~ ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] ~ ' ' }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] ~ ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def build(out_dir: Path, seed: int) -> None:
    """Write the tiny LLaVA-1.5 checkpoint into `out_dir` (which must exist)."""
    tokenizer = build_tokenizer(
        special_tokens=SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=True,
        chat_template=CHAT_TEMPLATE,
        vocab_size=768,
        extra={"padding_side": "left"},
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}

    vision = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,  # layer -2 feeds the projector, so the last layer is unused (as in llava)
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA (real llava-1.5-7b has MHA); exercises grouped KV heads
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=ids["<image>"],
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    randomize_weights_(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)

    # PIL backend: no torchvision needed; saved as image_processor_type "CLIPImageProcessor".
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        resample=3,  # bicubic
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # CLS, removed again by the "default" strategy
    )
    save_processor_hub_layout(processor, out_dir)

    GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    ).save_pretrained(out_dir)
