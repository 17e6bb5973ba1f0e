"""Helpers shared by the family builders: deterministic weight init and small file writers."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["randomize_weights_", "save_processor_hub_layout", "write_json"]


def randomize_weights_(
    model: nn.Module,
    seed: int,
    *,
    embed_std: float = 0.5,
    linear_gain: float = 2.0,
    raw_std: float = 0.5,
    norm_noise: float = 0.1,
    bias_std: float = 0.02,
) -> None:
    """Re-initialise every parameter of `model` in place, deterministically from (seed, name).

    HF's default init (std 0.02) makes a tiny random model almost input-independent: greedy decoding
    then repeats one token (worse with tied embeddings, where a token's own logit dominates). A linear
    gain of ~2 lets the layers outweigh the residual embedding, so outputs depend on the prompt and
    the image (measured on tiny BLIP-2: 5-12 distinct tokens in 12 greedy steps, vs 1-3 at gain 1):
      - Linear/Conv weights: N(0, linear_gain / sqrt(fan_in));
      - Embedding tables: N(0, embed_std);
      - norm weights: 1 + N(0, norm_noise); all biases: N(0, bias_std);
      - any other parameter (query tokens, class/position embeddings held as raw Parameters): N(0, raw_std).
    Each tensor draws from its own generator seeded by (seed, parameter name), so the result does not
    depend on module construction order or on the global RNG. Tied parameters are set once.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                gen = torch.Generator().manual_seed(
                    (seed * 0x9E3779B1 + zlib.crc32(full_name.encode())) % 2**63
                )
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                is_norm = "norm" in type(module).__name__.lower()
                if param_name.endswith("bias"):
                    value = noise * bias_std
                elif is_norm and param.ndim == 1:
                    value = 1.0 + noise * norm_noise
                elif isinstance(module, nn.Embedding):
                    value = noise * embed_std
                elif isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) and param.ndim >= 2:
                    fan_in = math.prod(param.shape[1:])
                    value = noise * (linear_gain / math.sqrt(fan_in))
                else:
                    value = noise * raw_std
                param.copy_(value.to(param.dtype))


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write `obj` as indented, key-sorted JSON (stable bytes for the manifest hash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_processor_hub_layout(processor: Any, out_dir: Path) -> None:
    """Save a transformers processor the way the real Hub repos are laid out.

    transformers 5 nests the image processor inside processor_config.json; the published checkpoints
    (and older loaders) keep it in its own preprocessor_config.json. Write the latter and strip the
    nested copy, so both `AutoImageProcessor` and `AutoProcessor` read one source of truth.
    """
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    processor_config = out_dir / "processor_config.json"
    config = json.loads(processor_config.read_text())
    config.pop("image_processor", None)
    write_json(processor_config, config)
