"""Visual engines: one interface (`VisualEngine`), one adapter per model family.

`load_visual_engine(checkpoint_dir)` reads config.json, picks the adapter from `model_type`, and
loads only the vision tower and projector weights (never the language model's).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path

import torch

from encoder_service.engines.base import (
    CROSS_ATTENTION,
    PROMPT_TABLE,
    EncodedOutput,
    MediaInput,
    PreparedInput,
    VisualEngine,
)

__all__ = [
    "CROSS_ATTENTION",
    "ENGINE_FOR_MODEL_TYPE",
    "PROMPT_TABLE",
    "EncodedOutput",
    "MediaInput",
    "PreparedInput",
    "VisualEngine",
    "detect_family",
    "load_visual_engine",
]

logger = logging.getLogger(__name__)

# config.json `model_type` -> (family, "module:class"); adapters import lazily.
ENGINE_FOR_MODEL_TYPE: dict[str, tuple[str, str]] = {
    "blip-2": ("blip2", "encoder_service.engines.blip2:Blip2Engine"),
    "llava": ("llava", "encoder_service.engines.llava:LlavaEngine"),
    "llava_llama": ("vila", "encoder_service.engines.vila:VilaEngine"),
    "llava_onevision": ("llava_onevision", "encoder_service.engines.llava_onevision:LlavaOnevisionEngine"),
    "mllama": ("mllama", "encoder_service.engines.mllama:MllamaEngine"),
}


def detect_family(checkpoint_dir: str | Path) -> str:
    """The family name of a checkpoint directory, from its config.json `model_type`."""
    return _entry(Path(checkpoint_dir))[0]


def load_visual_engine(
    checkpoint_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    engine_dir: str | Path | None = None,
) -> VisualEngine:
    """Build the family's engine for `checkpoint_dir` on `device` in `dtype` (vision side only).

    With `engine_dir` (from build/export_visual_engine.py) the adapter runs that artifact instead of
    eager modules, which are then never built; it must have been exported from this checkpoint for
    this dtype and device type (FailedPreconditionError otherwise).
    """
    checkpoint_dir = Path(checkpoint_dir)
    family, target = _entry(checkpoint_dir)
    module_name, class_name = target.split(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    started = time.perf_counter()
    if engine_dir is None:
        engine = engine_cls(checkpoint_dir, device=torch.device(device), dtype=dtype)
    else:
        from encoder_service.engines import exported

        compute, manifest = exported.load_exported_compute(
            engine_dir, checkpoint_dir, family=family, device=device, dtype=dtype
        )
        engine = engine_cls(checkpoint_dir, device=torch.device(device), dtype=dtype, compute=compute)
        exported.check_signature(manifest, engine.compute_inputs(), engine.llm_hidden_size)
    logger.info(
        "loaded %s visual engine from %s%s: %.1fM parameters, %s, %s, %.1fs",
        family,
        checkpoint_dir,
        "" if engine_dir is None else f" with exported engine {engine_dir}",
        engine.num_parameters() / 1e6,
        device,
        dtype,
        time.perf_counter() - started,
    )
    return engine


def _entry(checkpoint_dir: Path) -> tuple[str, str]:
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no config.json")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in ENGINE_FOR_MODEL_TYPE:
        raise ValueError(
            f"{checkpoint_dir}: model_type {model_type!r} has no visual engine; "
            f"supported: {', '.join(sorted(ENGINE_FOR_MODEL_TYPE))}"
        )
    return ENGINE_FOR_MODEL_TYPE[model_type]
