"""Tiny checkpoints for blip2, llava and vila: layout, determinism, CLI, and HF generate() with images."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image, ImageOps  # noqa: E402

from vlm_tiny import FAMILIES, make_tiny_checkpoint, read_manifest  # noqa: E402
from vlm_tiny.registry import MANIFEST_NAME  # noqa: E402
from vlm_tiny.tokenizer import build_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
MY_FAMILIES = ("blip2", "llava", "vila")
MAX_CHECKPOINT_BYTES = 8 * 1024 * 1024
MAX_NEW_TOKENS = 12

EXPECTED_FILES = {
    "blip2": [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ],
    "llava": [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ],
    "vila": [
        "config.json",
        "llm/config.json",
        "llm/model.safetensors",
        "llm/generation_config.json",
        "llm/tokenizer.json",
        "llm/tokenizer_config.json",
        "llm/chat_template.jinja",
        "vision_tower/config.json",
        "vision_tower/model.safetensors",
        "vision_tower/preprocessor_config.json",
        "mm_projector/config.json",
        "mm_projector/model.safetensors",
    ],
}


def _other_image(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image.rotate(90, expand=True))


def _assert_varied(new_tokens: list[int]) -> None:
    assert len(new_tokens) >= 3, f"generation stopped early: {new_tokens}"
    assert len(set(new_tokens)) >= 3, f"greedy output is degenerate: {new_tokens}"


# --- registry / manifest ---------------------------------------------------------------------------


def test_families_listed():
    assert FAMILIES == ("blip2", "llava", "vila", "llava_onevision", "mllama")


def test_unknown_family_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="blip2, llava, vila, llava_onevision, mllama"):
        make_tiny_checkpoint("llava2", tmp_path / "x")


@pytest.mark.parametrize("family", MY_FAMILIES)
def test_layout_manifest_and_size(tiny_checkpoint, family):
    ckpt = tiny_checkpoint(family)
    for rel in EXPECTED_FILES[family]:
        assert (ckpt / rel).is_file(), f"{family}: missing {rel}"
    manifest = read_manifest(ckpt)
    assert manifest["family"] == family and manifest["seed"] == 0
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert listed == on_disk
    assert sum(f["size"] for f in manifest["files"]) < MAX_CHECKPOINT_BYTES
    # No temp/backup directories left next to the checkpoint.
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(f".{ckpt.name}.")]


def test_llava_configs_consistent(tiny_checkpoint):
    ckpt = tiny_checkpoint("llava")
    config = json.loads((ckpt / "config.json").read_text())
    processor_config = json.loads((ckpt / "processor_config.json").read_text())
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<image>")
    assert config["image_token_index"] == image_id
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert processor_config["vision_feature_select_strategy"] == "default"
    assert processor_config["patch_size"] == config["vision_config"]["patch_size"]
    assert config["text_config"]["num_key_value_heads"] < config["text_config"]["num_attention_heads"]


def test_vila_top_level_config(tiny_checkpoint):
    ckpt = tiny_checkpoint("vila")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaModel"] and config["model_type"] == "llava_llama"
    assert config["mm_projector_type"] == "mlp_downsample"
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "cls_patch"
    assert config["image_aspect_ratio"] == "resize"
    assert config["llm_cfg"]["architectures"] == ["LlamaForCausalLM"]
    assert config["vision_tower_cfg"]["model_type"] == "siglip_vision_model"
    assert config["mm_projector_cfg"]["model_type"] == "v2l_projector"
    assert config["hidden_size"] == config["llm_cfg"]["hidden_size"]
    assert config["mm_hidden_size"] == config["vision_tower_cfg"]["hidden_size"]
    from safetensors import safe_open

    with safe_open(str(ckpt / "mm_projector" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == [f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("bias", "weight")]


def test_idempotent_reuse_and_overwrite(tmp_path):
    out = tmp_path / "llava"
    make_tiny_checkpoint("llava", out, seed=3)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    make_tiny_checkpoint("llava", out, seed=3)  # reused, not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="overwrite"):
        make_tiny_checkpoint("llava", out, seed=4)
    make_tiny_checkpoint("llava", out, seed=4, overwrite=True)
    assert read_manifest(out)["seed"] == 4
    # A damaged checkpoint of ours is rebuilt without needing overwrite.
    (out / "model.safetensors").write_bytes(b"junk")
    make_tiny_checkpoint("llava", out, seed=4)
    assert (out / "model.safetensors").stat().st_size > 1000


def test_refuses_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint("blip2", out)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("family", MY_FAMILIES)
def test_deterministic_per_seed(tiny_checkpoint, tmp_path, family):
    """Same seed -> every file byte-identical; another seed -> different weights."""
    first = read_manifest(tiny_checkpoint(family, seed=0))["files"]
    again = read_manifest(make_tiny_checkpoint(family, tmp_path / "again", seed=0))["files"]
    assert again == first
    other = {
        f["path"]: f["sha256"]
        for f in read_manifest(make_tiny_checkpoint(family, tmp_path / "s1", seed=1))["files"]
    }
    weights = [f for f in first if f["path"].endswith(".safetensors")]
    assert weights
    for f in weights:
        assert other[f["path"]] != f["sha256"], f"{family}: {f['path']} does not depend on the seed"


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path):
    """The CLI runs from outside the repo without the package on sys.path (one subprocess: ~imports)."""
    script = REPO_ROOT / "build" / "make_tiny_checkpoint.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "cli-llava"
    cmd = [sys.executable, str(script), "--family", "llava", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and (out / MANIFEST_NAME).is_file()
    assert "checkpoint ready" in done.stderr

    # argparse rejects an unknown family before anything heavy is imported.
    bad = [sys.executable, str(script), "--family", "nope", "--out", str(out)]
    done = subprocess.run(bad, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_cli_main_in_process(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    sys.path.insert(0, str(REPO_ROOT / "build"))
    try:
        import make_tiny_checkpoint as cli
    finally:
        sys.path.remove(str(REPO_ROOT / "build"))
    assert cli.FAMILIES == FAMILIES
    out = tmp_path / "b"
    assert cli.main(["--family", "blip2", "--out", str(out), "--seed", "2"]) == 0
    assert read_manifest(out)["seed"] == 2
    caplog.clear()
    assert cli.main(["--family", "blip2", "--out", str(out), "--seed", "2"]) == 0
    assert "reusing" in caplog.text
    assert cli.main(["--family", "vila", "--out", str(out)]) == 2  # holds another family
    assert "--overwrite" in caplog.text
    assert cli.main(["--family", "vila", "--out", str(out), "--overwrite"]) == 0
    assert read_manifest(out)["family"] == "vila"


# --- tokenizer ----------------------------------------------------------------------------------


def _llama_tokenizer(**overrides):
    kwargs = dict(
        special_tokens=["<unk>", "<s>", "</s>", "<image>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        unk_token="<unk>",
        add_bos=True,
        chat_template=None,
        vocab_size=640,
    )
    kwargs.update(overrides)
    return build_tokenizer(**kwargs)


def test_tokenizer_deterministic_and_sized(tmp_path):
    a, b = _llama_tokenizer(), _llama_tokenizer()
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert len(a) == 640
    ids = a("USER: <image>\nWhat is in this image? ASSISTANT:").input_ids
    assert ids[0] == a.bos_token_id
    assert ids.count(a.convert_tokens_to_ids("<image>")) == 1
    assert len(ids) < 20  # merges learned: far fewer tokens than bytes
    assert a.decode(ids, skip_special_tokens=True) == "USER: \nWhat is in this image? ASSISTANT:"
    assert a.decode(a("Zürich 東京 ☃").input_ids[1:]) == "Zürich 東京 ☃"  # byte-level: no <unk>


def test_tokenizer_options():
    no_bos = _llama_tokenizer(add_bos=False)
    assert no_bos("hello").input_ids[0] != no_bos.bos_token_id
    with pytest.raises(ValueError, match="must be listed"):
        _llama_tokenizer(pad_token="<pad>")
    with pytest.raises(ValueError, match="corpus supports at most"):
        _llama_tokenizer(vocab_size=100_000)


# --- HF generate() with images ------------------------------------------------------------------


def test_blip2_generate_with_image(tiny_checkpoint, sample_image):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, Blip2Processor

    ckpt = tiny_checkpoint("blip2")
    processor = AutoProcessor.from_pretrained(ckpt)
    assert isinstance(processor, Blip2Processor)
    model = Blip2ForConditionalGeneration.from_pretrained(ckpt).eval()
    prompt = "Question: what is in this image? Answer:"
    inputs = processor(images=sample_image, text=prompt, return_tensors="pt")
    num_image_tokens = (inputs.input_ids == model.config.image_token_index).sum().item()
    assert num_image_tokens == model.config.num_query_tokens == processor.num_query_tokens

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        _assert_varied(out[0, inputs.input_ids.shape[1] :].tolist())
        other = processor(images=_other_image(sample_image), text=prompt, return_tensors="pt")
        logits_a = model(**inputs).logits[0, -1]
        logits_b = model(**other).logits[0, -1]
    assert not torch.allclose(logits_a, logits_b, atol=1e-3), "the image does not affect the output"


def test_llava_generate_with_image(tiny_checkpoint, sample_image):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    ckpt = tiny_checkpoint("llava")
    processor = AutoProcessor.from_pretrained(ckpt)
    assert isinstance(processor, LlavaProcessor)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is in this image? ASSISTANT:"
    inputs = processor(images=sample_image, text=prompt, return_tensors="pt")
    assert tuple(inputs.pixel_values.shape) == (1, 3, 32, 32)
    assert (inputs.input_ids == model.config.image_token_index).sum().item() == 16  # 4x4 patches, CLS dropped

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        _assert_varied(out[0, inputs.input_ids.shape[1] :].tolist())
        other = processor(images=_other_image(sample_image), text=prompt, return_tensors="pt")
        logits_a = model(**inputs).logits[0, -1]
        logits_b = model(**other).logits[0, -1]
    assert not torch.allclose(logits_a, logits_b, atol=1e-3), "the image does not affect the output"


def test_vila_generate_with_two_images(tiny_checkpoint, sample_image):
    from vlm_tiny.vila import VilaReference

    ref = VilaReference(tiny_checkpoint("vila"))
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Compare the two images."},
            ],
        }
    ]
    prompt = ref.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("A chat between") and prompt.endswith(
        "<image>\n<image>\nCompare the two images. ASSISTANT:"
    )

    first, second = sample_image, _other_image(sample_image)
    features = ref.encode_images([first, second])
    assert tuple(features.shape) == (2, 16, ref.llm.config.hidden_size)  # 7x7 patches -> padded 8x8 -> 4x4

    embeds, mask = ref.build_inputs_embeds(prompt, [first, second])
    num_text = len(ref.tokenizer(prompt).input_ids)
    assert embeds.shape[1] == num_text - 2 + 2 * 16
    with torch.no_grad():
        out = ref.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
        _assert_varied(out[0].tolist())  # with inputs_embeds only, generate returns just the new tokens
        swapped, _ = ref.build_inputs_embeds(prompt, [second, first])
        logits_a = ref.llm(inputs_embeds=embeds).logits[0, -1]
        logits_b = ref.llm(inputs_embeds=swapped).logits[0, -1]
    assert not torch.allclose(logits_a, logits_b, atol=1e-3), "image order does not affect the output"
    with pytest.raises(ValueError, match="2 images"):
        ref.build_inputs_embeds("USER: <image> only one", [first, second])


def test_vila_downsample_matches_definition():
    """Token j*half+k is the 2x2 block at block row k, block column j: [TL, TR, BL, BR] channels."""
    from vlm_tiny.vila import VilaMlpDownsampleProjector, downsample_2x2

    for side in (4, 7):
        x = torch.randn(2, side * side, 3)
        grid = torch.zeros(2, side + side % 2, side + side % 2, 3)
        grid[:, :side, :side] = x.reshape(2, side, side, 3)
        half = (side + 1) // 2
        expected = torch.stack(
            [
                torch.cat(
                    [
                        grid[:, 2 * k, 2 * j],
                        grid[:, 2 * k, 2 * j + 1],
                        grid[:, 2 * k + 1, 2 * j],
                        grid[:, 2 * k + 1, 2 * j + 1],
                    ],
                    -1,
                )
                for j in range(half)
                for k in range(half)
            ],
            dim=1,
        )
        assert torch.equal(downsample_2x2(x), expected)
        assert VilaMlpDownsampleProjector.num_output_tokens(side) == half * half
    assert VilaMlpDownsampleProjector.num_output_tokens(27) == 196  # the real VILA-1.5 count


def test_vila_projector_round_trip(tmp_path):
    from vlm_tiny.vila import VilaMlpDownsampleProjector

    proj = VilaMlpDownsampleProjector(mm_hidden_size=6, hidden_size=10).eval()
    proj.save_pretrained(tmp_path / "mm_projector")
    loaded = VilaMlpDownsampleProjector.from_pretrained(tmp_path / "mm_projector")
    assert (loaded.mm_hidden_size, loaded.hidden_size) == (6, 10)
    x = torch.randn(1, 9, 6)
    with torch.no_grad():
        assert torch.equal(proj(x), loaded(x))
    assert loaded(x).shape == (1, 4, 10)
