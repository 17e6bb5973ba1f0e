"""Identity of a checkpoint directory, computed the same way by the encoder and the LLM service.

The fingerprint covers the top-level config and the names and sizes of every safetensors file
(hashing gigabytes of weights at start-up would be too slow); both services compute it from the
same directory and refuse embeddings whose fingerprint differs.
"""

from __future__ import annotations

from pathlib import Path

import blake3

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def model_fingerprint(checkpoint_dir: str | Path) -> str:
    root = Path(checkpoint_dir)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{root} is not a checkpoint directory: config.json is missing")
    hasher = blake3.blake3(_framed(config.read_bytes()))
    for path in sorted(root.rglob("*.safetensors")):
        hasher.update(_framed(str(path.relative_to(root)).encode()))
        hasher.update(path.stat().st_size.to_bytes(8, "little"))
    return "b3:" + hasher.hexdigest()


def processor_config_hash(checkpoint_dir: str | Path) -> str:
    """Hash of the processor configuration files (VILA keeps its processor in vision_tower/)."""
    root = Path(checkpoint_dir)
    hasher = blake3.blake3()
    found = False
    for directory in (root, root / "vision_tower"):
        for name in _PROCESSOR_FILES:
            path = directory / name
            if path.is_file():
                found = True
                hasher.update(_framed(str(path.relative_to(root)).encode()) + _framed(path.read_bytes()))
    if not found:
        raise FileNotFoundError(f"{root}: no processor configuration ({', '.join(_PROCESSOR_FILES)})")
    return "b3:" + hasher.hexdigest()
