"""Read only the vision-side tensors of a checkpoint directory (never the language model's).

Checkpoints come in several key layouts for the same module:
  - Hub / transformers-4 names: `vision_tower.vision_model.embeddings...`, `multi_modal_projector.*`;
  - transformers-5 names: `model.vision_tower.*`, `model.multi_modal_projector.*`;
  - and, inside a tower, with or without the `vision_model.` level (transformers 5.24 flattened
    `CLIPVisionModel`/`SiglipVisionModel`; older versions and the Hub keep it).
`load_module_weights` picks the outer prefix that exists in the file, then adds or strips the inner
`vision_model.` level so the names match the module actually built by the installed transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_INNER_LEVEL = "vision_model."


class CheckpointTensors:
    """Names and lazy reads of the safetensors of one (sub-)directory: single file or sharded index."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: directory / shard for name, shard in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            path = directory / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self._file_of = dict.fromkeys(f.keys(), path)
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self.directory = directory

    def names(self) -> list[str]:
        return list(self._file_of)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read exactly `names` (each shard opened once); nothing else is materialised."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        return tensors


def load_module_weights(
    module: nn.Module,
    checkpoint: CheckpointTensors,
    prefixes: Sequence[str],
    *,
    what: str,
) -> list[str]:
    """Load `module`'s whole state dict from the first of `prefixes` (each ending in ".") in `checkpoint`.

    Returns the checkpoint names read. Raises ValueError naming what does not match.
    """
    names = checkpoint.names()
    expected = list(module.state_dict())
    for prefix in prefixes:
        found = [n for n in names if n.startswith(prefix)]
        if not found:
            continue
        mapping = _match_names({n[len(prefix) :]: n for n in found}, expected)
        if mapping is None:
            sample = sorted(n[len(prefix) :] for n in found)[:5]
            raise ValueError(
                f"{checkpoint.directory}: tensors under {prefix!r} do not match the {what} built from the "
                f"config (checkpoint has e.g. {sample}, the module expects e.g. {expected[:5]})"
            )
        read = checkpoint.read(list(mapping.values()))
        module.load_state_dict({key: read[name] for key, name in mapping.items()}, strict=True)
        return list(mapping.values())
    raise ValueError(f"{checkpoint.directory}: no {what} weights found under any of {list(prefixes)}")


def _match_names(available: dict[str, str], expected: Sequence[str]) -> dict[str, str] | None:
    """Map each expected module key to a checkpoint name, allowing one `vision_model.` level of drift.

    Extra checkpoint tensors (e.g. SigLIP's unused pooling head when the module has none) are
    ignored; a missing one is a mismatch. Non-persistent buffers never appear in `expected`.
    """
    candidates = (
        lambda key: key,
        lambda key: _INNER_LEVEL + key,
        lambda key: key[len(_INNER_LEVEL) :] if key.startswith(_INNER_LEVEL) else None,
    )
    for to_checkpoint in candidates:
        mapping = {}
        for key in expected:
            name = to_checkpoint(key)
            if name is None or name not in available:
                break
            mapping[key] = available[name]
        else:
            return mapping
    return None


def load_tensor(checkpoint: CheckpointTensors, names: Sequence[str], *, what: str) -> torch.Tensor:
    """Read the first of `names` present in `checkpoint` (one tensor stored at the top level)."""
    available = set(checkpoint.names())
    for name in names:
        if name in available:
            return checkpoint.read([name])[name]
    raise ValueError(f"{checkpoint.directory}: no {what} tensor found under any of {list(names)}")
