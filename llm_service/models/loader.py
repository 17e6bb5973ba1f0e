"""Find the decoder inside a checkpoint directory and load its weights from safetensors with HF names.

Works on the real layouts: composite HF checkpoints (`language_model.*` keys, e.g. llava-1.5-7b-hf,
blip2-opt, llava-onevision, Llama-3.2-Vision), VILA's `llm/` sub-directory, and plain text-only
checkpoints. Only the decoder's tensors are read; vision weights are never loaded here.

Checkpoints keep HF's names; our fused projections (`MergedLinear`: q/k/v, gate/up) are filled piece by
piece, each HF tensor copied into its rows of the fused parameter (`_weight_targets`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from llm_service.layers.linear import MergedLinear
from llm_service.models.llama import LlamaForCausalLM
from llm_service.models.mllama import MllamaForCausalLM
from llm_service.models.opt import OPTForCausalLM
from llm_service.models.qwen2 import Qwen2ForCausalLM

logger = logging.getLogger(__name__)

# config.json model_type -> our family name
_FAMILY_BY_MODEL_TYPE = {
    "blip-2": "blip2",
    "llava": "llava",
    "llava_llama": "vila",
    "llava_onevision": "llava_onevision",
    "mllama": "mllama",
    "llama": "text",
    "qwen2": "text",
    "opt": "text",
}
_DECODER_BY_TEXT_MODEL_TYPE: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "opt": OPTForCausalLM,
    "mllama_text_model": MllamaForCausalLM,
}
# checkpoint key prefix -> our prefix; first match wins, unmatched keys are not decoder weights
_PREFIX_RULES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
    ("model.", "model."),
)
_COMPOSITE_ONLY_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.vision_model.")


@dataclass(frozen=True)
class CheckpointInfo:
    family: str  # blip2 | llava | vila | llava_onevision | mllama | text
    root: Path  # the directory the user gave
    decoder_dir: Path  # where the decoder's safetensors live (VILA: llm/)
    tokenizer_dir: Path
    config: object  # the top-level HF config
    text_config: object  # the decoder's HF config


def inspect_checkpoint(model_dir: str | Path) -> CheckpointInfo:
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root} is not a checkpoint directory: config.json is missing")
    model_type = json.loads(config_path.read_text()).get("model_type")
    family = _FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(
            f"{root}: model_type {model_type!r} is not supported; expected one of {sorted(_FAMILY_BY_MODEL_TYPE)}"
        )
    if family == "vila":
        decoder_dir = root / "llm"
        text_config = AutoConfig.from_pretrained(decoder_dir)
        config = text_config
        tokenizer_dir = decoder_dir
    else:
        config = AutoConfig.from_pretrained(root)
        text_config = config if family == "text" else config.text_config
        decoder_dir = tokenizer_dir = root
    return CheckpointInfo(family, root, decoder_dir, tokenizer_dir, config, text_config)


def _rename(key: str) -> str | None:
    if key.startswith(_COMPOSITE_ONLY_PREFIXES):
        return None
    for prefix, replacement in _PREFIX_RULES:
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    return files


def iter_decoder_weights(decoder_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(decoder_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                name = _rename(key)
                if name is not None:
                    yield name, handle.get_tensor(key)


# HF tensor name -> (our parameter, the rows of it that tensor fills; None: the whole parameter)
WeightTargets = dict[str, tuple[nn.Parameter, slice | None]]


def _weight_targets(model: nn.Module, *, remove_duplicate: bool) -> WeightTargets:
    """Where each HF-named tensor goes. Every parameter is its own target, except those of a
    `MergedLinear`, which stand for one row slice per HF part: `<parent>.k_proj.weight` -> the k rows of
    `<parent>.qkv_proj.weight` (biases alike)."""
    targets: WeightTargets = {
        name: (param, None) for name, param in model.named_parameters(remove_duplicate=remove_duplicate)
    }
    for module_name, module in model.named_modules():
        if not isinstance(module, MergedLinear):
            continue
        parent = module_name.rpartition(".")[0]
        for param_name, param in module.named_parameters(recurse=False):  # weight, bias
            del targets[f"{module_name}.{param_name}"]
            for part, rows in module.part_slices().items():
                targets[".".join(filter(None, (parent, part, param_name)))] = (param, rows)
    return targets


def fused_weight_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF name -> view of the rows of our fused parameter holding that tensor (fused pieces only).

    For sharing the other way round: `hf.load_state_dict(fused_weight_views(ours), strict=False,
    assign=True)` points a Hugging Face model's q/k/v and gate/up at our fused tensors (no copies)."""
    targets = _weight_targets(model, remove_duplicate=True)
    return {name: param.detach()[rows] for name, (param, rows) in targets.items() if rows is not None}


def _decoder_class(text_config) -> type[nn.Module]:
    cls = _DECODER_BY_TEXT_MODEL_TYPE.get(text_config.model_type)
    if cls is None:
        raise ValueError(
            f"decoder type {text_config.model_type!r} is not supported; expected {sorted(_DECODER_BY_TEXT_MODEL_TYPE)}"
        )
    return cls


def build_decoder_from_config(
    text_config,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Our decoder for an HF text config, without a checkpoint file (benchmarks, tests).

    Parameters are created on `device` in `dtype`, randomly initialised, unless `weights` (HF names,
    e.g. a Hugging Face model's `state_dict()`, already on `device` in `dtype`) is given: then the
    model's parameters become those very tensors (shared, not copied), so a baseline can run on the
    same weights without a second copy in memory. The exception is the fused projections (q/k/v,
    gate/up): the HF pieces are copied into their fused tensors; to hold those once as well, point the
    HF model at ours afterwards with `fused_weight_views`.
    """
    cls = _decoder_class(text_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate parameters in `dtype` directly (no fp32 copy of a 7B model)
    try:
        with torch.device(device):
            model = cls(text_config)
    finally:
        torch.set_default_dtype(previous)
    if weights is not None:
        targets = _weight_targets(model, remove_duplicate=True)  # tied parameters once
        missing = sorted(set(targets) - set(weights))
        if missing:
            raise ValueError(f"weights lack {missing[:8]}")
        for name, (param, rows) in targets.items():
            tensor = weights[name]
            dest = param.data if rows is None else param.data[rows]
            if tensor.shape != dest.shape or tensor.dtype != dtype or tensor.device != param.device:
                raise ValueError(
                    f"{name}: got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, "
                    f"expected {tuple(dest.shape)} {dtype} on {param.device}"
                )
            if rows is None:
                param.data = tensor  # shared
            else:
                dest.copy_(tensor)  # a piece of a fused parameter: copied
    return model.eval()


def build_decoder(info: CheckpointInfo, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Instantiate the decoder for the checkpoint and load its weights (strict: nothing missing)."""
    cls = _decoder_class(info.text_config)
    with torch.device(device):
        model = cls(info.text_config)
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)  # buffers (rotary frequencies) stay fp32, as in HF
    targets = _weight_targets(model, remove_duplicate=False)
    loaded: set[str] = set()
    for name, tensor in iter_decoder_weights(info.decoder_dir):
        if name not in targets:
            raise ValueError(f"{info.decoder_dir}: unexpected decoder weight {name!r} for {cls.__name__}")
        param, rows = targets[name]
        dest = param.data if rows is None else param.data[rows]  # a fused parameter: this tensor's rows
        if dest.shape != tensor.shape:
            raise ValueError(f"{info.decoder_dir}: {name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor.to(dtype))
        loaded.add(name)
    tied = {"lm_head.weight"} if model.lm_head.weight is _input_embedding_weight(model) else set()
    # a fused parameter is complete only when all its pieces were loaded: report each missing piece
    missing = set(targets) - loaded - tied
    if missing:
        raise ValueError(f"{info.decoder_dir}: decoder weights missing from the checkpoint: {sorted(missing)[:8]}")
    logger.info("loaded %s decoder (%d tensors) from %s", cls.__name__, len(loaded), info.decoder_dir)
    return model.eval()


def _input_embedding_weight(model: nn.Module) -> torch.Tensor:
    inner = model.model
    embed = inner.decoder.embed_tokens if hasattr(inner, "decoder") else inner.embed_tokens
    return embed.weight
