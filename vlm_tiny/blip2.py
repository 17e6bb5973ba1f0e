"""Tiny BLIP-2 (OPT) checkpoint in the Hugging Face `Salesforce/blip2-opt-*` layout.

One directory: config.json + model.safetensors (Blip2ForConditionalGeneration), the processor
files (preprocessor_config.json, processor_config.json, tokenizer.json, tokenizer_config.json) and
generation_config.json. Like the current HF repos, the tokenizer has an `<image>` token, the config
carries `image_token_index`, and the processor prepends `num_query_tokens` image tokens to the prompt
(before BOS), which the model replaces with the Q-Former outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    GenerationConfig,
    OPTConfig,
)

from vlm_tiny.common import randomize_weights_, save_processor_hub_layout
from vlm_tiny.tokenizer import build_tokenizer

BUILDER_VERSION = 1

IMAGE_SIZE = 32  # real: 224
PATCH_SIZE = 8  # real: 14
NUM_QUERY_TOKENS = 8  # real: 32
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# OPT's GPT-2 tokenizer uses "</s>" as both BOS and EOS and prepends it to every prompt.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]


def build(out_dir: Path, seed: int) -> None:
    """Write the tiny BLIP-2 checkpoint into `out_dir` (which must exist)."""
    tokenizer = build_tokenizer(
        special_tokens=SPECIAL_TOKENS,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=True,
        chat_template=None,
        vocab_size=768,
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}

    vision = Blip2VisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=32,  # unused without Q-Former text input; kept small
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        cross_attention_frequency=1,  # real: 2 (12 layers); every layer cross-attends here
        encoder_hidden_size=vision.hidden_size,
    )
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        do_layer_norm_before=True,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["</s>"],
        eos_token_id=ids["</s>"],
        tie_word_embeddings=True,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=ids["<image>"],
        image_text_hidden_size=32,
    )

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    randomize_weights_(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)

    # The PIL backend needs no torchvision; it saves as image_processor_type "BlipImageProcessor".
    image_processor = BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic, as the real checkpoint
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )
    save_processor_hub_layout(processor, out_dir)

    GenerationConfig(
        bos_token_id=ids["</s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    ).save_pretrained(out_dir)
