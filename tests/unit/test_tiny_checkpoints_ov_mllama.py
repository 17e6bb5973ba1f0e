"""Tiny LLaVA-OneVision and mllama checkpoints: layout, HF loadability, HF generate, determinism.

These checkpoints are the parity targets of our own model code, so besides "it loads" the tests pin
the geometry later code relies on (crops, visual rows, newline rows, tiles, cross-attention layers).

OneVision's `AutoProcessor` needs torchvision in transformers 5 (the video processor slot is
type-checked against a torchvision-only class even when empty). Without torchvision the tests build
the same processor with the video slot left empty and feed video frames through the image
processor's base crop, which is the video processor's transform (resize to one crop, same
normalisation); with torchvision they use `AutoProcessor` and the real video processor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    MllamaForConditionalGeneration,
)
from transformers.utils import is_torchvision_available

from encoder_service.hf_processors import load_processor
from vlm_tiny import llava_onevision as ov
from vlm_tiny import mllama

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 12
PROMPT = "What is in this image?"
COMMON_FILES = [
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
]


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ov_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llava_onevision")


@pytest.fixture(scope="module")
def mllama_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mllama")


@pytest.fixture(scope="module")
def ov_processor(ov_dir: Path) -> LlavaOnevisionProcessor:
    return load_processor(ov_dir)


@pytest.fixture(scope="module")
def ov_model(ov_dir: Path) -> LlavaOnevisionForConditionalGeneration:
    return LlavaOnevisionForConditionalGeneration.from_pretrained(ov_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mllama_processor(mllama_dir: Path):
    return AutoProcessor.from_pretrained(mllama_dir)


@pytest.fixture(scope="module")
def mllama_model(mllama_dir: Path) -> MllamaForConditionalGeneration:
    return MllamaForConditionalGeneration.from_pretrained(mllama_dir, dtype=torch.float32).eval()


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")


def _chat(processor, *, num_images: int = 0, num_videos: int = 0) -> str:
    content = (
        [{"type": "image"}] * num_images
        + [{"type": "video"}] * num_videos
        + [{"type": "text", "text": PROMPT}]
    )
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _greedy(model, inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == MAX_NEW_TOKENS, "no eos expected from random weights within 12 steps"
    return new


def _last_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize(
    ("family", "extra_files", "architecture", "hub_prefixes"),
    [
        (
            "llava_onevision",
            ["video_preprocessor_config.json"],
            "LlavaOnevisionForConditionalGeneration",
            (
                "language_model.model.",
                "language_model.lm_head.",
                "vision_tower.vision_model.",
                "multi_modal_projector.",
                "image_newline",
            ),
        ),
        (
            "mllama",
            [],
            "MllamaForConditionalGeneration",
            ("language_model.model.", "language_model.lm_head.", "vision_model.", "multi_modal_projector."),
        ),
    ],
)
def test_layout_matches_hub(tiny_checkpoint, family, extra_files, architecture, hub_prefixes):
    ckpt = tiny_checkpoint(family)
    for name in COMMON_FILES + extra_files:
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == [architecture]
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(n).dtype for n in names} == {torch.float32}
    # Tensor names as published on the Hub (transformers 4 layout), not transformers 5's "model.*".
    assert all(n.startswith(hub_prefixes) for n in names), [
        n for n in names if not n.startswith(hub_prefixes)
    ]
    assert all(any(n.startswith(p) for n in names) for p in hub_prefixes)
    assert (ckpt / "model.safetensors").stat().st_size < 4_000_000


def test_ov_config_facts(ov_dir: Path, ov_processor):
    config = json.loads((ov_dir / "config.json").read_text())
    tok = ov_processor.tokenizer
    assert config["image_token_index"] == tok.convert_tokens_to_ids("<image>") == ov_processor.image_token_id
    assert config["video_token_index"] == tok.convert_tokens_to_ids("<video>") == ov_processor.video_token_id
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None
    assert config["vision_feature_layer"] == -1 and config["vision_feature_select_strategy"] == "full"
    assert config["vision_aspect_ratio"] == "anyres_max_9"
    crop = config["vision_config"]["image_size"]
    assert ov_processor.num_image_tokens == (crop // config["vision_config"]["patch_size"]) ** 2 == 25
    assert all(h % crop == 0 and w % crop == 0 for h, w in config["image_grid_pinpoints"])
    assert ov_processor.image_processor.image_grid_pinpoints == config["image_grid_pinpoints"]
    assert _chat(ov_processor, num_images=1) == (
        f"<|im_start|>user\n<image>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_mllama_config_facts(mllama_dir: Path, mllama_processor):
    config = json.loads((mllama_dir / "config.json").read_text())
    tok = mllama_processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert config["image_token_index"] == image_id == config["text_config"]["vocab_size"] == len(tok) - 1
    assert config["text_config"]["cross_attention_layers"] == mllama.CROSS_ATTENTION_LAYERS
    vision = config["vision_config"]
    assert max(vision["intermediate_layers_indices"]) <= vision["num_hidden_layers"]
    assert vision["vision_output_dim"] == vision["hidden_size"] * (
        1 + len(vision["intermediate_layers_indices"])
    )
    assert mllama_processor.image_processor.size == {
        "height": vision["image_size"],
        "width": vision["image_size"],
    }
    assert mllama_processor.image_processor.max_image_tiles == vision["max_num_tiles"] == 4
    generation = json.loads((mllama_dir / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|eot_id|>") in generation["eos_token_id"]
    assert _chat(mllama_processor, num_images=1) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        f"<|image|>{PROMPT}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("family", ["llava_onevision", "mllama"])
def test_loads_every_tensor(tiny_checkpoint, family):
    ckpt = tiny_checkpoint(family)
    cls = (
        LlavaOnevisionForConditionalGeneration
        if family == "llava_onevision"
        else MllamaForConditionalGeneration
    )
    _, info = cls.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


# --------------------------------------------------------------------------------------- OneVision


# (height, width) -> (crops incl. the base crop, image tokens), as HF's processor and model agree.
OV_GEOMETRY = {
    (40, 150): (5, 120),  # 1x4 grid, unpadded to 5x18 rows + 5 newlines + 25 base
    (100, 100): (10, 265),  # 3x3 grid: 15x15 + 15 newlines + 25 base
    (240, 240): (37, 265),  # 6x6 grid: 30x30 exceeds anyres_max_9 -> downsampled to 15x15
}


@pytest.mark.parametrize(("size", "expected"), list(OV_GEOMETRY.items()))
def test_ov_anyres_image_generate(ov_processor, ov_model, size, expected):
    num_crops, num_image_tokens = expected
    inputs = ov_processor(
        images=_image(*size, seed=1), text=_chat(ov_processor, num_images=1), return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (1, num_crops, 3, ov.IMAGE_SIZE, ov.IMAGE_SIZE)
    assert inputs["image_sizes"].tolist() == [list(size)]
    assert int((inputs["input_ids"] == ov_processor.image_token_id).sum()) == num_image_tokens

    # What the model consumes for this image: base crop + unpadded grid + one newline per grid row.
    with torch.no_grad():
        features = ov_model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"]
        ).pooler_output
    assert [f.shape[0] for f in features] == [num_image_tokens]

    tokens = _greedy(ov_model, inputs)
    assert len(set(tokens)) >= 3, tokens
    other = ov_processor(
        images=_image(*size, seed=2), text=_chat(ov_processor, num_images=1), return_tensors="pt"
    )
    assert not torch.allclose(_last_logits(ov_model, inputs), _last_logits(ov_model, other), atol=1e-4)


def test_ov_multi_image_uses_base_crop_plus_newline(ov_processor, ov_model):
    images = [_image(40, 150, seed=1), _image(100, 100, seed=2)]
    inputs = ov_processor(images=[images], text=_chat(ov_processor, num_images=2), return_tensors="pt")
    assert inputs["pixel_values"].shape[:2] == (2, 1)
    assert int((inputs["input_ids"] == ov_processor.image_token_id).sum()) == 2 * (ov.NUM_IMAGE_TOKENS + 1)
    assert len(set(_greedy(ov_model, inputs))) >= 3


def test_ov_text_only_generate(ov_processor, ov_model):
    inputs = ov_processor(text=_chat(ov_processor), return_tensors="pt")
    assert len(set(_greedy(ov_model, inputs))) >= 3


def _ov_video_inputs(processor, frames: list[Image.Image]) -> dict[str, torch.Tensor]:
    text = _chat(processor, num_videos=1)
    if processor.video_processor is not None:
        return processor(videos=[frames], text=text, return_tensors="pt")
    # No torchvision: the image processor's base crop is the video transform (plain resize to one
    # crop, bicubic, same mean/std); expand <video> as LlavaOnevisionProcessor.replace_video_token does.
    pixels = processor.image_processor(images=frames, return_tensors="pt")["pixel_values"][:, 0]
    grid = int(math.isqrt(processor.num_image_tokens))
    num_video_tokens = len(frames) * math.ceil(grid / 2) ** 2 + 1
    inputs = processor.tokenizer(text.replace("<video>", "<video>" * num_video_tokens), return_tensors="pt")
    return {**inputs, "pixel_values_videos": pixels[None]}


def test_ov_video_generate(ov_processor, ov_model):
    num_frames = 4
    frames = [_image(48, 64, seed=10 + i) for i in range(num_frames)]
    inputs = _ov_video_inputs(ov_processor, frames)
    assert inputs["pixel_values_videos"].shape == (1, num_frames, 3, ov.IMAGE_SIZE, ov.IMAGE_SIZE)
    # 5x5 rows per frame pooled to ceil(5/2)^2 = 9, plus one newline after the last frame.
    assert int((inputs["input_ids"] == ov_processor.video_token_id).sum()) == num_frames * 9 + 1
    # No separate feature-count check: where the trailing newline is appended moved between
    # transformers 5.17 (forward) and 5.24 (get_video_features). The model's own placeholder check
    # raises during generate if the <video> count differs from the rows it produces.
    tokens = _greedy(ov_model, inputs)
    assert len(set(tokens)) >= 3, tokens
    other = _ov_video_inputs(ov_processor, [_image(48, 64, seed=20 + i) for i in range(num_frames)])
    assert not torch.allclose(_last_logits(ov_model, inputs), _last_logits(ov_model, other), atol=1e-4)


@pytest.mark.skipif(not is_torchvision_available(), reason="LlavaOnevisionVideoProcessor needs torchvision")
def test_ov_video_processor_matches_image_base_crop(ov_processor):
    frames = [_image(48, 64, seed=30 + i) for i in range(2)]
    video = ov_processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    base = ov_processor.image_processor(images=frames, return_tensors="pt")["pixel_values"][:, 0]
    assert video.shape == base.shape
    assert torch.allclose(video, base, atol=0.1)  # PIL vs torchvision bicubic resize differ slightly


# ------------------------------------------------------------------------------------------ mllama


def _mllama_inputs(processor, image: Image.Image | None):
    text = _chat(processor, num_images=0 if image is None else 1)
    # The chat template already starts with <|begin_of_text|>; don't let the tokenizer add another.
    return processor(images=image, text=text, add_special_tokens=False, return_tensors="pt")


def test_mllama_image_generate(mllama_processor, mllama_model, sample_image):
    inputs = _mllama_inputs(mllama_processor, sample_image)  # 48x40: a 2x2 canvas of 32 px tiles
    tile = mllama.TILE_SIZE
    assert inputs["pixel_values"].shape == (1, 1, mllama.MAX_NUM_TILES, 3, tile, tile)
    assert inputs["aspect_ratio_ids"].tolist() == [[6]]  # 1-based index of [2, 2] in supported ratios
    assert inputs["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 1]]]
    seq_len = inputs["input_ids"].shape[1]
    assert inputs["cross_attention_mask"].shape == (1, seq_len, 1, mllama.MAX_NUM_TILES)
    image_pos = inputs["input_ids"][0].tolist().index(mllama_processor.image_token_id)
    assert inputs["cross_attention_mask"][0, :image_pos].sum() == 0  # text before <|image|> sees nothing
    assert inputs["cross_attention_mask"][0, image_pos:].min() == 1
    assert (inputs["input_ids"][0] == mllama_processor.tokenizer.bos_token_id).sum() == 1

    with torch.no_grad():
        vision = mllama_model.model.vision_model(
            pixel_values=inputs["pixel_values"],
            aspect_ratio_ids=inputs["aspect_ratio_ids"],
            aspect_ratio_mask=inputs["aspect_ratio_mask"],
        ).last_hidden_state
    rows_per_tile = (tile // 8) ** 2 + 1
    assert vision.shape == (1, 1, mllama.MAX_NUM_TILES, rows_per_tile, mllama.VISION_OUTPUT_DIM)

    tokens = _greedy(mllama_model, inputs)
    assert len(set(tokens)) >= 3, tokens
    other = _mllama_inputs(mllama_processor, _image(40, 48, seed=2))  # same size, other pixels
    assert not torch.allclose(
        _last_logits(mllama_model, inputs), _last_logits(mllama_model, other), atol=1e-4
    )


def test_mllama_wide_image_masks_unused_tiles(mllama_dir: Path, mllama_processor):
    ratios = json.loads((mllama_dir / "config.json").read_text())["vision_config"]["supported_aspect_ratios"]
    inputs = _mllama_inputs(mllama_processor, _image(30, 60, seed=3))
    assert ratios[inputs["aspect_ratio_ids"].item() - 1] == [1, 2]  # 1 row x 2 columns of tiles
    used = [1, 1] + [0] * (mllama.MAX_NUM_TILES - 2)
    assert inputs["aspect_ratio_mask"][0, 0].tolist() == used
    assert inputs["cross_attention_mask"][0, -1, 0].tolist() == used
    assert inputs["pixel_values"][0, 0, 2:].abs().sum() == 0  # padding tiles are zeros


def test_mllama_text_only_generate(mllama_processor, mllama_model):
    inputs = _mllama_inputs(mllama_processor, None)
    assert "pixel_values" not in inputs and "cross_attention_mask" not in inputs
    assert len(set(_greedy(mllama_model, inputs))) >= 3


# ---------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", ["llava_onevision", "mllama"])
def test_same_seed_same_bytes(tiny_checkpoint, tmp_path, family):
    module = ov if family == "llava_onevision" else mllama
    reference = tiny_checkpoint(family)
    again, other_seed = tmp_path / "again", tmp_path / "seed1"
    for out_dir, seed in ((again, 0), (other_seed, 1)):
        out_dir.mkdir()
        module.build(out_dir, seed)
    written = sorted(p.name for p in again.iterdir())
    assert written == sorted(p.name for p in reference.iterdir() if p.name != "tiny_manifest.json")
    for name in written:
        assert (again / name).read_bytes() == (reference / name).read_bytes(), name
    assert (other_seed / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
