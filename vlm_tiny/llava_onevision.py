"""Tiny LLaVA-OneVision (SigLIP + Qwen2) checkpoint in the `llava-hf/llava-onevision-qwen2-*-ov-hf` layout.

Files: config.json, model.safetensors (tensor names as published on the Hub, which transformers 5
renames on load), generation_config.json, tokenizer.json + tokenizer_config.json, chat_template.jinja,
preprocessor_config.json (LlavaOnevisionImageProcessor), video_preprocessor_config.json
(LlavaOnevisionVideoProcessor) and processor_config.json (LlavaOnevisionProcessor).

Geometry, scaled down from the real 384 px / patch 14 / 27x27 SigLIP:
  - one crop is IMAGE_SIZE=40 px, patch 8 -> a 5x5 grid = 25 visual rows per crop. The grid is odd on
    purpose, like the real 27x27, so video pooling exercises its ceil(): 5x5 -> 3x3 = 9 rows per frame;
  - `image_grid_pinpoints` are the real 6x6 set of multiples of the crop size (40..240 instead of
    384..2304), so a single image becomes 1 base crop + up to 36 grid crops, and `anyres_max_9`
    downsampling (when sqrt(unpadded rows / (9 x 25)) > 1.1) is reachable;
  - every row of the unpadded grid ends with `image_newline`; a single-crop image (multi-image
    prompts) is base + 1 newline; a video is frames x 9 pooled rows + 1 newline.

`LlavaOnevisionProcessor` cannot be instantiated without torchvision in transformers 5 (its
`video_processor` slot is type-checked against a torchvision-only class, even when None), so the
processor files are written directly instead of through `processor.save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
)

from vlm_tiny.common import randomize_weights_, write_json
from vlm_tiny.tokenizer import build_tokenizer

__all__ = [
    "BUILDER_VERSION",
    "CHAT_TEMPLATE",
    "HUB_KEY_PREFIXES",
    "IMAGE_SIZE",
    "NUM_IMAGE_TOKENS",
    "PATCH_SIZE",
    "build",
]

BUILDER_VERSION = 1

IMAGE_SIZE = 40  # real: 384
PATCH_SIZE = 8  # real: 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 25 rows per crop; real: 729
MAX_GRID = 6  # real pinpoints go up to 6x6 crops (2304 px)
GRID_PINPOINTS = [
    [IMAGE_SIZE * h, IMAGE_SIZE * w] for h in range(1, MAX_GRID + 1) for w in range(1, MAX_GRID + 1)
]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

# Qwen2's specials in their real relative order (151643..151647).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# ChatML with LLaVA-OneVision's content layout: per message, all images, then all videos, then each
# text part on its own line: "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{ '<video>' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ '\\n' + part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# transformers-5 parameter name prefix -> name in the published safetensors (transformers 4 layout).
HUB_KEY_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]


def build(out_dir: Path, seed: int) -> None:
    """Write the tiny LLaVA-OneVision checkpoint into `out_dir` (which must exist)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(
        special_tokens=SPECIAL_TOKENS,
        bos_token=None,  # Qwen2 prepends nothing
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        add_bos=False,
        chat_template=CHAT_TEMPLATE,
        vocab_size=768,
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = _model_config(vocab_size=len(tokenizer), ids=ids)

    with torch.random.fork_rng(devices=[]):  # seed HF's init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    # Larger-than-HF scales so greedy decoding depends on prompt and image (see randomize_weights_).
    randomize_weights_(model, seed, linear_gain=1.5)
    _save_hub_safetensors(model, out_dir / "model.safetensors")
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    ).save_pretrained(out_dir)

    tokenizer.save_pretrained(out_dir)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        resample=3,  # bicubic, as the real checkpoint
        do_pad=True,
        do_convert_rgb=True,
    )
    image_processor.save_pretrained(out_dir)  # image_processor_type "LlavaOnevisionImageProcessor"
    _write_processor_files(out_dir)


def _model_config(*, vocab_size: int, ids: dict[str, int]) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,  # real: 151936/152064, padded past the tokenizer; here exactly len(tokenizer)
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        dtype="float32",
    )


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


def _write_processor_files(out_dir: Path) -> None:
    write_json(
        out_dir / "processor_config.json",
        {
            "processor_class": "LlavaOnevisionProcessor",
            "image_token": "<image>",
            "video_token": "<video>",
            "num_image_tokens": NUM_IMAGE_TOKENS,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
    )
    # Video frames are resized to one crop (no anyres tiling) with the image normalisation.
    write_json(
        out_dir / "video_preprocessor_config.json",
        {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "processor_class": "LlavaOnevisionProcessor",
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "resample": 3,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": SIGLIP_MEAN,
            "image_std": SIGLIP_STD,
            "do_convert_rgb": True,
            "do_sample_frames": False,
            "default_to_square": False,
        },
    )
    # Where transformers 5 looks first for a processor's template; the tokenizer carries it as well.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
