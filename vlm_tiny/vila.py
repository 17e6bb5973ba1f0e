"""Tiny VILA-1.5 checkpoint in the NVlabs `Efficient-Large-Model/VILA1.5-*` layout.

VILA is not in transformers. Its checkpoint is a directory of three Hugging Face sub-models plus a
top-level config (`model_type: "llava_llama"`):

    config.json        architectures ["LlavaLlamaModel"], mm_* settings, and llm_cfg / vision_tower_cfg /
                       mm_projector_cfg: copies of the sub-configs. VILA's loader resolves each to the
                       sub-directory named after the key minus "_cfg" (llm/, vision_tower/, mm_projector/).
    llm/               LlamaForCausalLM (config.json, model.safetensors, generation_config.json) + tokenizer
    vision_tower/      SiglipVisionModel + preprocessor_config.json (SiglipImageProcessor)
    mm_projector/      config.json (model_type "v2l_projector", mm_projector_type "mlp_downsample") +
                       model.safetensors with weights layers.1.* (LayerNorm), layers.2.*, layers.4.* (Linear)

Per image: SigLIP hidden state at layer -2, every token kept ("cls_patch"; SigLIP has no CLS) ->
2x2 downsample (odd grids zero-padded: real 27x27 -> 28x28 -> 196 tokens; tiny 7x7 -> 8x8 -> 16) ->
LayerNorm -> Linear -> GELU -> Linear. Images are resized to the tower's square size first
(`image_aspect_ratio: "resize"`). Multi-image prompts put one `<image>` per image, in order.

Unsure (not verified against a downloaded checkpoint): the exact extra keys of the real top-level
config, whether its vision_tower weights include SigLIP's pooling head (ours do; it is unused), and
whether the real llm/ tokenizer has `<image>` as a token (VILA splits the text on the literal and
inserts a -200 sentinel; ours makes `<image>` a special token so both approaches give the same ids).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlm_tiny.common import randomize_weights_, write_json
from vlm_tiny.tokenizer import build_tokenizer

BUILDER_VERSION = 1

IMAGE_SIZE = 56  # real: 384
PATCH_SIZE = 8  # real: 14; 56 / 8 = 7 patches per side (odd, like the real 27)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>"]
IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# VILA1.5-3b's "vicuna_v1" conversation: "<system> USER: <image>\n<text> ASSISTANT: <answer></s>".
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}"
    "{%- else -%}{{- '" + SYSTEM_PROMPT.replace("'", "\\'") + "' -}}{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- ' ' ~ (message['role'] | upper) ~ ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)

PROJECTOR_TYPE = "mlp_downsample"


def downsample_2x2(features: torch.Tensor) -> torch.Tensor:
    """VILA's 2x2 token merge: [N, S*S, C] -> [N, ceil(S/2)**2, 4*C].

    The S x S grid (row-major tokens) is zero-padded to even size; each 2x2 block becomes one token
    whose channels are [top-left, top-right, bottom-left, bottom-right]. Output tokens are ordered
    block-column-major (block column outer, block row inner): that is the order the reference
    implementation's view/permute/view produces, and the LLM was trained on it.
    """
    n, num_tokens, c = features.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"expected a square token grid, got {num_tokens} tokens")
    grid = features.reshape(n, side, side, c)  # [N, rows, cols, C]
    pad = side % 2
    if pad:
        grid = nn.functional.pad(grid, (0, 0, 0, pad, 0, pad))  # one zero column right, one zero row below
    half = (side + pad) // 2
    blocks = grid.reshape(n, half, 2, half, 2, c)  # [N, block_row, dy, block_col, dx, C]
    blocks = blocks.permute(0, 3, 1, 2, 4, 5)  # [N, block_col, block_row, dy, dx, C]
    return blocks.reshape(n, half * half, 4 * c)


class _DownSample2x2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return downsample_2x2(x)


class VilaMlpDownsampleProjector(nn.Module):
    """VILA-1.5 `mlp_downsample` projector: 2x2 downsample -> LayerNorm -> Linear -> GELU -> Linear.

    Module names match the checkpoint (`layers.1` LayerNorm, `layers.2` / `layers.4` Linear), so
    `mm_projector/model.safetensors` loads with a plain `load_state_dict`.
    """

    def __init__(self, mm_hidden_size: int, hidden_size: int, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.mm_hidden_size = mm_hidden_size
        self.hidden_size = hidden_size
        self.layers = nn.Sequential(
            _DownSample2x2(),
            nn.LayerNorm(4 * mm_hidden_size, eps=layer_norm_eps),
            nn.Linear(4 * mm_hidden_size, hidden_size),
            nn.GELU(),  # exact (erf) GELU, nn.GELU's default
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, S*S, mm_hidden] vision features -> [N, ceil(S/2)**2, hidden] LLM embeddings."""
        return self.layers(features)

    @staticmethod
    def num_output_tokens(num_patches_per_side: int) -> int:
        return ((num_patches_per_side + 1) // 2) ** 2

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None
    ) -> VilaMlpDownsampleProjector:
        """Load `mm_projector/` (config.json + model.safetensors); sizes come from the weight shapes."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("mm_projector_type") != PROJECTOR_TYPE:
            raise ValueError(
                f"{path}: mm_projector_type is {config.get('mm_projector_type')!r}, expected {PROJECTOR_TYPE!r}"
            )
        state = load_file(str(path / "model.safetensors"))
        hidden_size, in_features = state["layers.2.weight"].shape
        if in_features % 4:
            raise ValueError(f"{path}: layers.2.weight has {in_features} input features, not a multiple of 4")
        model = cls(mm_hidden_size=in_features // 4, hidden_size=hidden_size)
        model.load_state_dict(state, strict=True)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "config.json", projector_config())
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def projector_config() -> dict:
    return {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": PROJECTOR_TYPE,
        "model_type": "v2l_projector",
        "torch_dtype": "float32",
    }


def build(out_dir: Path, seed: int) -> None:
    """Write the tiny VILA-1.5 checkpoint into `out_dir` (which must exist)."""
    tokenizer = build_tokenizer(
        special_tokens=SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,  # Llama-2 tokenizers ship without one
        unk_token="<unk>",
        add_bos=True,
        chat_template=CHAT_TEMPLATE,
        vocab_size=768,
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}

    vision_config = SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,  # layer -2 feeds the projector
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    llm_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # MHA, as VILA1.5-3b
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        tie_word_embeddings=False,
    )

    torch.manual_seed(seed)
    vision = SiglipVisionModel(vision_config).eval()
    randomize_weights_(vision, seed)
    projector = VilaMlpDownsampleProjector(vision_config.hidden_size, llm_config.hidden_size).eval()
    randomize_weights_(projector, seed + 1)
    llm = LlamaForCausalLM(llm_config).eval()
    randomize_weights_(llm, seed + 2)

    llm.save_pretrained(out_dir / "llm", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "llm")
    GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"]).save_pretrained(out_dir / "llm")
    vision.save_pretrained(out_dir / "vision_tower", safe_serialization=True)
    SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out_dir / "vision_tower")
    projector.save_pretrained(out_dir / "mm_projector")

    def sub_config(name: str) -> dict:
        cfg = json.loads((out_dir / name / "config.json").read_text())
        cfg["_name_or_path"] = f"./{name}"
        return cfg

    write_json(
        out_dir / "config.json",
        {
            "architectures": ["LlavaLlamaModel"],
            "model_type": "llava_llama",
            "_name_or_path": "./vlm",
            "resume_path": "./vlm",
            "hidden_size": llm_config.hidden_size,
            "mm_hidden_size": vision_config.hidden_size,
            "mm_projector_type": PROJECTOR_TYPE,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "cls_patch",
            "image_aspect_ratio": "resize",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "vision_resolution": -1,
            "interpolate_mode": "linear",
            "s2": False,
            "num_video_frames": 8,
            "model_dtype": "torch.float32",
            "llm_cfg": sub_config("llm"),
            "vision_tower_cfg": sub_config("vision_tower"),
            "mm_projector_cfg": sub_config("mm_projector"),
        },
    )


class VilaReference:
    """Test helper: the VILA-1.5 forward path assembled from HF parts, for `generate(inputs_embeds=...)`.

    Loads the three sub-models of a VILA checkpoint directory and builds the LLM input embeddings of
    a prompt in which the k-th `<image>` token is replaced by the k-th image's projector rows.
    """

    def __init__(self, ckpt_dir: str | Path) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        ckpt_dir = Path(ckpt_dir)
        self.config = json.loads((ckpt_dir / "config.json").read_text())
        if self.config.get("mm_vision_select_feature") != "cls_patch":
            raise ValueError("only mm_vision_select_feature='cls_patch' is supported")
        self.select_layer = int(self.config["mm_vision_select_layer"])
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / "llm")
        self.image_processor = AutoImageProcessor.from_pretrained(ckpt_dir / "vision_tower")
        self.vision_tower = SiglipVisionModel.from_pretrained(ckpt_dir / "vision_tower").eval()
        self.projector = VilaMlpDownsampleProjector.from_pretrained(ckpt_dir / "mm_projector")
        self.llm = LlamaForCausalLM.from_pretrained(ckpt_dir / "llm").eval()
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images -> pixel_values [n_img, 3, H, W] ("resize" aspect ratio: squash to the tower size)."""
        size = self.image_processor.size
        resized = [im.convert("RGB").resize((size["width"], size["height"])) for im in images]
        return self.image_processor(resized, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> projector output [n_img, tokens_per_image, llm_hidden]."""
        pixel_values = self.preprocess(images)
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.select_layer]  # [n_img, S*S, mm_hidden], cls_patch keeps all
        return self.projector(features)

    @torch.no_grad()
    def build_inputs_embeds(self, prompt: str, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize `prompt` (with BOS), splice image rows at each `<image>`; -> (embeds [1,S,H], mask [1,S])."""
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
        positions = (ids == self.image_token_id).nonzero().flatten().tolist()
        if len(positions) != len(images):
            raise ValueError(
                f"prompt has {len(positions)} {IMAGE_TOKEN} tokens but {len(images)} images were given"
            )
        text_embeds = self.llm.get_input_embeddings()(ids)  # [T, H]
        image_embeds = self.encode_images(images) if images else None
        pieces, start = [], 0
        for k, pos in enumerate(positions):
            pieces.append(text_embeds[start:pos])
            pieces.append(image_embeds[k])
            start = pos + 1
        pieces.append(text_embeds[start:])
        embeds = torch.cat(pieces, dim=0).unsqueeze(0)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long)
