"""Visual engines vs Hugging Face on the tiny checkpoints (fp32, CPU).

The oracle for the soft-prompt families is what HF feeds its language model (a forward pre-hook
captures `inputs_embeds`; the rows at the placeholder positions are the image's). mllama is
checked against the `cross_attention_states` HF passes to its text model; VILA, which is not in
transformers, against `vlm_tiny.vila.VilaReference`.

OneVision video: HF's video processor needs torchvision, absent on the CPU host, so the reference
forward gets `pixel_values_videos` built with the image processor's base crop per frame (the same
transform: resize to one crop, same normalisation) — as tests/unit does for the tiny checkpoint.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText

from encoder_service.engines import MediaInput, load_visual_engine
from encoder_service.engines import weights as weights_module
from encoder_service.hf_processors import load_processor
from vlm_protocol.errors import InvalidArgumentError

FAMILIES = ["blip2", "llava", "vila", "llava_onevision", "mllama"]
ATOL = 1e-5


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    _engines: dict[str, object] = {}

    def get(family: str):
        if family not in _engines:
            _engines[family] = load_visual_engine(tiny_checkpoint(family))
        return _engines[family]

    return get


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    """family -> (HF model, processor), loaded once."""
    _hf: dict[str, tuple] = {}

    def get(family: str):
        if family not in _hf:
            ckpt = tiny_checkpoint(family)
            _hf[family] = (AutoModelForImageTextToText.from_pretrained(ckpt).eval(), load_processor(ckpt))
        return _hf[family]

    return get


def _encode(engine, **media) -> list:
    return engine.encode([engine.preprocess(MediaInput(**media))])


def _lm_inputs(model, inputs) -> dict:
    """Run HF forward once; return the kwargs its language model received."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    language_model = getattr(model, "language_model", None) or model.model.language_model
    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured


def _hf_rows(model, inputs, token_id: int) -> torch.Tensor:
    """Rows HF put at the `token_id` placeholders, all samples and images in order: [rows, hidden]."""
    embeds = _lm_inputs(model, inputs)["inputs_embeds"]
    return embeds[inputs["input_ids"] == token_id]


def _chat(processor, *, images: int = 0, videos: int = 0) -> str:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": "Hi?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    """Max abs difference within `atol` times the reference's largest magnitude (at least 1): fp32
    sums in another order (our patch GEMM against HF's convolution) differ at ~1e-6 of the values,
    and tiny random towers reach magnitudes of ~70; a real error is O(1)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours.float() - ref.float()).abs().max().item()
    bound = atol * max(1.0, ref.float().abs().max().item())
    assert diff <= bound, f"max abs diff {diff:.3g} > {bound:.3g} (reference max {ref.abs().max():.3g})"


# ------------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize(
    ("family", "kind", "rows", "video"),
    [
        ("blip2", "prompt_table", 8, False),
        ("llava", "prompt_table", 16, False),
        ("vila", "prompt_table", 16, False),
        ("llava_onevision", "prompt_table", 0, True),
        ("mllama", "cross_attention", 4 * 17, False),
    ],
)
def test_engine_metadata(engine, family, kind, rows, video):
    eng = engine(family)
    assert (eng.family, eng.kind, eng.num_rows_per_image, eng.supports_video) == (family, kind, rows, video)
    assert eng.llm_hidden_size == 64 and eng.image_size > 0


# -------------------------------------------------------------------------------------- parity


def test_blip2_parity_several_images(engine, hf):
    model, processor = hf("blip2")
    images = [_image(40, 48, 1), _image(64, 30, 2)]
    inputs = processor(images=images, text=["a photo of", "a photo of"], return_tensors="pt")
    ref = _hf_rows(model, inputs, model.config.image_token_id)
    outputs = _encode(engine("blip2"), images=images)
    assert [o.num_rows for o in outputs] == [8, 8]
    _assert_close(torch.cat([o.features for o in outputs]), ref)


def test_llava_parity_several_images(engine, hf):
    model, processor = hf("llava")
    images = [_image(40, 48, 1), _image(64, 30, 2)]
    inputs = processor(images=images, text=_chat(processor, images=2), return_tensors="pt")
    ref = _hf_rows(model, inputs, model.config.image_token_id)
    outputs = _encode(engine("llava"), images=images)
    assert [(o.input_index, o.item_index, o.num_rows) for o in outputs] == [(0, 0, 16), (0, 1, 16)]
    _assert_close(torch.cat([o.features for o in outputs]), ref)


def test_vila_parity_several_images(engine, tiny_checkpoint):
    from vlm_tiny.vila import VilaReference

    images = [_image(40, 48, 1), _image(64, 30, 2), _image(56, 56, 3)]
    ref = VilaReference(tiny_checkpoint("vila")).encode_images(images)  # [3, 16, 64]
    outputs = _encode(engine("vila"), images=images)
    _assert_close(torch.stack([o.features for o in outputs]), ref)


# (height, width) -> crops: a wide strip (unpadding), a 3x3 grid, a 6x6 grid over anyres_max_9 (downsampling)
OV_CASES = {(40, 150): 5, (100, 100): 10, (240, 240): 37}


@pytest.mark.parametrize(("size", "num_crops"), list(OV_CASES.items()))
def test_onevision_anyres_parity(engine, hf, size, num_crops):
    model, processor = hf("llava_onevision")
    image = _image(*size, seed=sum(size))
    inputs = processor(images=image, text=_chat(processor, images=1), return_tensors="pt")
    ref = _hf_rows(model, inputs, model.config.image_token_id)
    [out] = _encode(engine("llava_onevision"), images=[image])
    assert (out.num_crops, out.image_size, out.num_rows) == (num_crops, size, ref.shape[0])
    _assert_close(out.features, ref)


def test_onevision_multi_image_prompt_parity(engine, hf):
    model, processor = hf("llava_onevision")
    images = [_image(40, 150, 1), _image(100, 100, 2)]
    inputs = processor(images=[images], text=_chat(processor, images=2), return_tensors="pt")
    ref = _hf_rows(model, inputs, model.config.image_token_id)
    eng = engine("llava_onevision")
    outputs = _encode(eng, images=images)
    assert [(o.num_crops, o.num_rows) for o in outputs] == [(1, 26), (1, 26)]  # 5x5 + newline each
    _assert_close(torch.cat([o.features for o in outputs]), ref)
    # encoding the prompt's images one at a time (one per content id) gives the same rows
    [second] = _encode(eng, images=images[1:], num_prompt_images=2)
    assert torch.equal(second.features, outputs[1].features)


def test_onevision_video_parity(engine, hf):
    model, processor = hf("llava_onevision")
    frames = np.stack([np.asarray(_image(48, 64, seed=10 + i)) for i in range(4)])  # [T, H, W, C]
    pixels = processor.image_processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt")
    pixel_values_videos = pixels["pixel_values"][:, 0][None]  # base crop per frame: [1, T, 3, S, S]
    num_rows = 4 * 3 * 3 + 1  # 5x5 per frame pooled to 3x3 (ceil), one newline at the end
    text = _chat(processor, videos=1).replace("<video>", "<video>" * num_rows)
    inputs = {**processor.tokenizer(text, return_tensors="pt"), "pixel_values_videos": pixel_values_videos}
    ref = _hf_rows(model, inputs, model.config.video_token_id)
    [out] = _encode(engine("llava_onevision"), video_frames=frames)
    assert (out.media, out.num_frames, out.num_rows, out.image_size) == ("video", 4, num_rows, (48, 64))
    _assert_close(out.features, ref)


def test_mllama_parity_several_images(engine, hf):
    model, processor = hf("mllama")
    images = [_image(40, 48, 1), _image(30, 60, 2)]  # a 2x2 and a 1x2 tile layout
    inputs = processor(
        images=[images], text=_chat(processor, images=2), add_special_tokens=False, return_tensors="pt"
    )
    states = _lm_inputs(model, inputs)["cross_attention_states"]  # [n_img * max_tiles, P, H]
    ref = states.reshape(2, 4, *states.shape[-2:])
    outputs = _encode(engine("mllama"), images=images)
    for i, out in enumerate(outputs):
        _assert_close(out.features, ref[i : i + 1])
        assert out.aspect_ratio_id == inputs["aspect_ratio_ids"][0, i].item()
        assert list(out.aspect_ratio_mask) == inputs["aspect_ratio_mask"][0, i].tolist()
        assert out.num_tiles == sum(out.aspect_ratio_mask) and out.num_rows == 4 * 17
    assert [o.num_tiles for o in outputs] == [4, 2]


# --------------------------------------------------------------------------------- input forms


def _hf_pixel_media(family: str, ckpt: Path, image: Image.Image) -> dict:
    """The image preprocessed by HF's own image processor, as a `pixel_values` MediaInput."""
    if family == "vila":
        processor = AutoImageProcessor.from_pretrained(ckpt / "vision_tower")
        side = processor.size["height"]
        return {
            "pixel_values": processor(images=[image.resize((side, side))], return_tensors="pt")[
                "pixel_values"
            ]
        }
    image_processor = load_processor(ckpt).image_processor
    out = image_processor(images=[[image]] if family == "mllama" else [image], return_tensors="pt")
    media = {"pixel_values": out["pixel_values"]}
    if family == "llava_onevision":
        media["image_sizes"] = out["image_sizes"]
    if family == "mllama":
        media.update(aspect_ratio_ids=out["aspect_ratio_ids"], aspect_ratio_mask=out["aspect_ratio_mask"])
    return media


@pytest.mark.parametrize("family", FAMILIES)
def test_every_input_form_gives_the_same_features(engine, tiny_checkpoint, family):
    eng = engine(family)
    picture = _image(45, 70, seed=5)
    png = io.BytesIO()
    picture.save(png, format="PNG")
    decoded = Image.open(io.BytesIO(png.getvalue()))
    forms = {
        "png": {"images": [decoded]},
        "hwc_uint8": {"images": [np.asarray(picture)]},
        "pixel_values": _hf_pixel_media(family, tiny_checkpoint(family), picture),
    }
    features = {name: _encode(eng, **media)[0].features for name, media in forms.items()}
    for name in ("hwc_uint8", "pixel_values"):
        assert torch.equal(features[name], features["png"]), name


def test_transparency_and_grey_are_converted_like_hf(engine):
    eng = engine("llava")
    rgb = np.asarray(_image(30, 40, seed=6))
    opaque = np.concatenate([rgb, np.full((30, 40, 1), 255, np.uint8)], axis=-1)  # [H, W, 4]
    same = [_encode(eng, images=[x])[0].features for x in (rgb, opaque, Image.fromarray(opaque, "RGBA"))]
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    grey = rgb[..., 0]
    assert torch.equal(
        _encode(eng, images=[grey])[0].features, _encode(eng, images=[np.stack([grey] * 3, -1)])[0].features
    )


# ------------------------------------------------------------------------------------ batching


def _batch_media(family: str) -> list[dict]:
    a, b, c = _image(40, 48, 1), _image(64, 30, 2), _image(100, 100, 3)
    media = [{"images": [a]}, {"images": [b, c]}, {"images": [c]}]
    if family == "llava_onevision":
        media.append({"video_frames": np.stack([np.asarray(_image(48, 64, 20 + i)) for i in range(3)])})
        media.append({"images": [_image(40, 150, 4)]})
    return media


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one(engine, family):
    eng = engine(family)
    prepared = [eng.preprocess(MediaInput(**m)) for m in _batch_media(family)]
    batched = eng.encode(prepared)
    alone = [out for p in prepared for out in eng.encode([p])]
    assert [(o.input_index, o.item_index) for o in batched] == [
        (i, j) for i, p in enumerate(prepared) for j in range(p.num_items)
    ]
    assert len(batched) == len(alone)
    for together, single in zip(batched, alone, strict=True):
        assert together.features.shape == single.features.shape
        # bit-identical on some CPUs; other BLAS builds pick other kernels per batch size
        assert (together.features - single.features).abs().max().item() <= 1e-5
        assert (together.num_rows, together.num_crops, together.media) == (
            single.num_rows,
            single.num_crops,
            single.media,
        )


def test_empty_batch(engine):
    assert engine("llava").encode([]) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_engine_follows_fp32(engine, tiny_checkpoint, family):
    eng = load_visual_engine(tiny_checkpoint(family), dtype=torch.bfloat16)
    media = {"images": [_image(40, 48, 1)]}
    [low] = _encode(eng, **media)
    [full] = _encode(engine(family), **media)
    assert low.features.dtype == torch.bfloat16 and low.features.shape == full.features.shape
    error = (low.features.float() - full.features).norm() / full.features.norm()
    assert error < 0.05, error


# ------------------------------------------------------------------------------ weights loaded

LLM_MARKERS = ("language_model", "lm_head", "embed_tokens", "decoder", "llm/")


@pytest.mark.parametrize("family", FAMILIES)
def test_never_loads_llm_weights(tiny_checkpoint, hf, monkeypatch, family):
    ckpt = tiny_checkpoint(family)
    read: list[str] = []
    directories: list[Path] = []
    original_read, original_init = (
        weights_module.CheckpointTensors.read,
        weights_module.CheckpointTensors.__init__,
    )

    def spy_read(self, names):
        read.extend(f"{self.directory.name}/{n}" for n in names)
        return original_read(self, names)

    def spy_init(self, directory):
        directories.append(Path(directory))
        original_init(self, directory)

    monkeypatch.setattr(weights_module.CheckpointTensors, "read", spy_read)
    monkeypatch.setattr(weights_module.CheckpointTensors, "__init__", spy_init)
    eng = load_visual_engine(ckpt)
    assert read, "nothing was read through CheckpointTensors"
    assert not [n for n in read if any(m in n for m in LLM_MARKERS)]
    assert ckpt / "llm" not in directories
    names = [name for name, _ in eng.named_parameters()]
    assert not [n for n in names if any(m in n for m in LLM_MARKERS)]
    if family != "vila":  # compare with HF's vision side + projector (VILA: no HF model)
        model = hf(family)[0]
        vision_side = sum(
            p.numel() for n, p in model.named_parameters() if not any(m in n for m in LLM_MARKERS)
        )
        assert 0 < eng.num_parameters() <= vision_side
        assert eng.num_parameters() < sum(p.numel() for p in model.parameters()) - 10_000  # the LLM is big


def _rename_keys(src: Path, dst: Path, rename) -> Path:
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    save_file(
        {rename(k): v for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    return dst


def _hub_llava(key: str) -> str:  # transformers-4 / Hub names: the tower keeps its `vision_model.` level
    return (
        "vision_tower.vision_model." + key[len("vision_tower.") :] if key.startswith("vision_tower.") else key
    )


def _t5_names(key: str) -> str:  # transformers-5 names: `model.` in front of every non-LM sub-module
    return key if key.startswith("language_model") else "model." + key


@pytest.mark.parametrize(
    ("family", "rename"), [("llava", _hub_llava), ("llava", _t5_names), ("mllama", _t5_names)]
)
def test_other_key_layouts_load_the_same_weights(engine, tiny_checkpoint, tmp_path, family, rename):
    ckpt = _rename_keys(tiny_checkpoint(family), tmp_path / "ckpt", rename)
    image = _image(40, 48, 1)
    ours = _encode(load_visual_engine(ckpt), images=[image])[0].features
    assert torch.equal(ours, _encode(engine(family), images=[image])[0].features)


# -------------------------------------------------------------------------------- bad input


def _truncated_png() -> Image.Image:
    buffer = io.BytesIO()
    _image(64, 64, 0).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:200]))


BAD_INPUTS = [
    ("llava", {}, "exactly one"),
    ("llava", {"images": []}, "empty"),
    ("llava", {"images": [_image(8, 8, 0)], "video_frames": np.zeros((1, 8, 8, 3), np.uint8)}, "exactly one"),
    ("llava", {"images": [Image.new("RGB", (0, 5))]}, "empty"),
    ("llava", {"images": [np.zeros((0, 5, 3), np.uint8)]}, "empty"),
    ("llava", {"images": [np.zeros((5, 5, 3), np.float32)]}, "uint8"),
    ("llava", {"images": [np.zeros((5, 5, 2), np.uint8)]}, "shape"),
    ("llava", {"images": ["not an image"]}, "not an image"),
    ("llava", {"images": [_truncated_png()]}, "decoded"),
    ("llava", {"pixel_values": torch.zeros(1, 3, 31, 32)}, "shape"),
    ("llava", {"pixel_values": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)}, "floating point"),
    ("llava", {"pixel_values": torch.full((1, 3, 32, 32), float("nan"))}, "NaN"),
    ("llava", {"pixel_values": torch.zeros(1, 3, 32, 32), "image_sizes": [(32, 32)]}, "llava"),
    ("llava", {"video_frames": np.zeros((2, 8, 8, 3), np.uint8)}, "does not accept video"),
    ("llava_onevision", {"video_frames": np.zeros((2, 8, 8), np.uint8)}, "[T, H, W, 3]"),
    ("llava_onevision", {"video_frames": np.zeros((0, 8, 8, 3), np.uint8)}, "empty"),
    ("llava_onevision", {"video_frames": np.zeros((2, 8, 8, 3), np.float32)}, "uint8"),
    ("llava_onevision", {"pixel_values": torch.zeros(5, 3, 40, 40)}, "image_sizes"),
    ("llava_onevision", {"pixel_values": torch.zeros(3, 3, 40, 40), "image_sizes": [(40, 150)]}, "needs 5"),
    ("llava_onevision", {"images": [_image(8, 8, 0)] * 2, "num_prompt_images": 1}, "num_prompt_images"),
    ("mllama", {"pixel_values": torch.zeros(1, 4, 3, 32, 32)}, "aspect_ratio_ids"),
    (
        "mllama",
        {
            "pixel_values": torch.zeros(1, 4, 3, 32, 32),
            "aspect_ratio_ids": [2],
            "aspect_ratio_mask": [[1, 1, 1, 1]],
        },
        "does not match",
    ),
    (
        "mllama",
        {
            "pixel_values": torch.zeros(1, 4, 3, 32, 32),
            "aspect_ratio_ids": [9],
            "aspect_ratio_mask": [[1, 0, 0, 0]],
        },
        "out of range",
    ),
]


@pytest.mark.parametrize(("family", "media", "message"), BAD_INPUTS)
def test_bad_input_is_invalid_argument(engine, family, media, message):
    with pytest.raises(InvalidArgumentError) as excinfo:
        engine(family).preprocess(MediaInput(**media))
    assert message in str(excinfo.value)


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="no visual engine"):
        load_visual_engine(tmp_path)
