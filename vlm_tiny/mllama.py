"""Tiny Llama-3.2-Vision (mllama) checkpoint in the `meta-llama/Llama-3.2-11B-Vision-Instruct` layout.

Files: config.json, model.safetensors (tensor names as published on the Hub, which transformers 5
renames on load), generation_config.json, tokenizer.json + tokenizer_config.json, chat_template.jinja,
preprocessor_config.json (MllamaImageProcessor) and processor_config.json (MllamaProcessor).

Scaled-down geometry (real values in comments at the definitions):
  - a tile is TILE_SIZE=32 px with patch 8 -> 16 patches + 1 CLS = 17 vision rows per tile, padded to
    24 inside the vision tower (multiple of 8) and cut back to 17 at its output;
  - up to 4 tiles per image with the real 8 supported aspect ratios; `aspect_ratio_ids` are 1-based
    indices into that list (0 = padding image), `aspect_ratio_mask` marks real tiles;
  - the vision tower outputs [batch, images, 4 tiles, 17, VISION_OUTPUT_DIM] = the last hidden state
    concatenated with the hidden states listed in `intermediate_layers_indices`; the projector maps
    that to the text width, and cross-attention layers read these 4 x 17 = 68 rows per image as KV;
  - the text decoder has 5 layers and cross-attends in layers CROSS_ATTENTION_LAYERS = [1, 3]; those
    layers have no self-attention (so no text KV) and are skipped entirely for text-only prompts;
  - `<|image|>` is the last token, id == text vocab_size (the embedding table has vocab_size + 8 rows,
    the LM head vocab_size), as in the real tokenizer (128256).

All tanh gates (cross-attention attn/MLP gates, tile/position embedding gates, global-layer gates) are
set to non-zero values (0.1..0.4): HF initialises most of them to 0, which would make the image invisible
to the text model and leave half of the vision embeddings untested.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    GenerationConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
)

from vlm_tiny.common import randomize_weights_, save_processor_hub_layout
from vlm_tiny.tokenizer import build_tokenizer

__all__ = [
    "BUILDER_VERSION",
    "CHAT_TEMPLATE",
    "CROSS_ATTENTION_LAYERS",
    "HUB_KEY_PREFIXES",
    "MAX_NUM_TILES",
    "TILE_SIZE",
    "build",
]

BUILDER_VERSION = 1

TILE_SIZE = 32  # real: 560
PATCH_SIZE = 8  # real: 14 (40x40 + CLS = 1601 rows per tile)
MAX_NUM_TILES = 4  # real: 4
VISION_HIDDEN = 32  # real: 1280
INTERMEDIATE_LAYERS_INDICES = [1, 3]  # real: [3, 7, 15, 23, 30] of 32 layers
VISION_OUTPUT_DIM = VISION_HIDDEN * (1 + len(INTERMEDIATE_LAYERS_INDICES))  # real: 7680
NUM_TEXT_LAYERS = 5  # real: 40
CROSS_ATTENTION_LAYERS = [1, 3]  # real: [3, 8, 13, ..., 38]
# Scalar tanh gates: tile/position embeddings, global vision layers, cross-attention decoder layers.
GATE_NAMES = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Llama 3 specials in their real relative order (128000, 128001, 128004, 128006..128010), then
# `<|image|>` last so that its id equals the text vocab size, as in the real tokenizer.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]

# Llama-3.2-Vision-Instruct's message layout, without the real template's tool calling and default
# "Cutting Knowledge Date" system block: a system message is rendered only when given. Content parts
# are rendered in order; an image part becomes `<|image|>`.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# transformers-5 parameter name prefix -> name in the published safetensors (transformers 4 layout).
HUB_KEY_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def build(out_dir: Path, seed: int) -> None:
    """Write the tiny mllama checkpoint into `out_dir` (which must exist)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(
        special_tokens=SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token=None,
        add_bos=True,
        chat_template=CHAT_TEMPLATE,
        vocab_size=768,
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    if ids["<|image|>"] != len(tokenizer) - 1:
        raise AssertionError("<|image|> must be the last token")
    config = _model_config(ids)

    with torch.random.fork_rng(devices=[]):  # seed HF's init without touching the caller's RNG
        torch.manual_seed(seed)
        model = MllamaForConditionalGeneration(config).eval()
    randomize_weights_(model, seed, linear_gain=1.0)  # 1.5 (as OneVision) made image prompts loop
    _set_gates_(model, seed)
    _save_hub_safetensors(model, out_dir / "model.safetensors")
    config.architectures = ["MllamaForConditionalGeneration"]
    config.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
    ).save_pretrained(out_dir)

    image_processor = MllamaImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_image_tiles=MAX_NUM_TILES,
        resample=2,  # bilinear, as the real checkpoint
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
        do_pad=True,
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    save_processor_hub_layout(processor, out_dir)


def _model_config(ids: dict[str, int]) -> MllamaConfig:
    vision = MllamaVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=4,
        num_global_layers=2,  # real: 8
        attention_heads=2,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        max_num_tiles=MAX_NUM_TILES,
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        intermediate_layers_indices=INTERMEDIATE_LAYERS_INDICES,
        vision_output_dim=VISION_OUTPUT_DIM,
        hidden_act="gelu",
        norm_eps=1e-5,
    )
    text = MllamaTextConfig(
        # `<|image|>` == vocab_size: embeddable (the table has vocab_size + 8 rows), never predicted.
        vocab_size=ids["<|image|>"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=CROSS_ATTENTION_LAYERS,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|eot_id|>"],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
    )
    return MllamaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=ids["<|image|>"],
        dtype="float32",
    )


def _set_gates_(model: MllamaForConditionalGeneration, seed: int) -> None:
    """Give every scalar tanh gate a value in [0.1, 0.4] (tanh 0.10..0.38), deterministically.

    Non-zero so that every gated path is live; small so that the cross-attention output does not
    swamp the text residual stream (larger gates made greedy decoding loop on one or two tokens).
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.rsplit(".", 1)[-1] in GATE_NAMES:
                param.copy_(0.1 + 0.3 * torch.rand(param.shape, generator=gen))


def _save_hub_safetensors(model: torch.nn.Module, path: Path) -> None:
    """Save the weights under the Hub's tensor names (what a hand-written loader must read)."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        hub_name = next(
            (new + name[len(old) :] for old, new in HUB_KEY_PREFIXES if name.startswith(old)), None
        )
        if hub_name is None:
            raise AssertionError(f"no Hub name for parameter {name}")
        tensors[hub_name] = tensor.detach().contiguous().clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
