"""Family registry and the idempotent, atomic checkpoint writer.

Each family module exposes `build(out_dir: Path, seed: int) -> None`, which writes a complete
checkpoint directory in the real model's on-disk layout, and may expose `BUILDER_VERSION: int`
(bump it whenever the module's output changes, so cached checkpoints are rebuilt).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

FAMILIES = ("blip2", "llava", "vila", "llava_onevision", "mllama")

# Bump when the registry's own output (manifest format, shared helpers) changes.
BUILDER_VERSION = 1
MANIFEST_NAME = "tiny_manifest.json"

# Modules are imported lazily so that one broken or missing family never blocks the others.
_FAMILY_MODULES = {family: f"vlm_tiny.{family}" for family in FAMILIES}


def family_module(family: str) -> ModuleType:
    """Import and return the builder module of `family`; ValueError for an unknown family."""
    if family not in _FAMILY_MODULES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    module = importlib.import_module(_FAMILY_MODULES[family])
    if not callable(getattr(module, "build", None)):
        raise TypeError(f"{module.__name__} does not define build(out_dir, seed)")
    return module


def builder_version(family: str) -> str:
    """Version string recorded in the manifest: registry version + the family module's version."""
    module = family_module(family)
    return f"{BUILDER_VERSION}.{int(getattr(module, 'BUILDER_VERSION', 0))}"


def make_tiny_checkpoint(family: str, out_dir: Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write (or reuse) the tiny random-weight checkpoint of `family` at `out_dir`; return `out_dir`.

    Idempotent: a directory whose manifest has the same family, seed and builder version and whose
    files still match their recorded sha256 is reused as is. A directory that is ours but stale
    (older builder version, damaged files) is rebuilt. Anything else already at `out_dir` (another
    family/seed, or a non-empty directory without our manifest) is only replaced with
    `overwrite=True`. The checkpoint is built in a temporary sibling directory and renamed into
    place, so readers never see a half-written checkpoint.
    """
    out_dir = Path(out_dir).absolute()
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    version = builder_version(family)  # validates the family first
    module = family_module(family)

    if out_dir.exists() and not overwrite:
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        state = _existing_state(out_dir, family, seed, version)
        if state == "match":
            logger.info("reusing tiny %s checkpoint (seed %d) at %s", family, seed, out_dir)
            return out_dir
        if state == "foreign":
            raise FileExistsError(
                f"{out_dir} is not empty and is not a tiny {family} checkpoint with seed {seed}; "
                "pass overwrite=True (CLI: --overwrite) to replace it"
            )
        logger.info("rebuilding %s checkpoint at %s (%s)", family, out_dir, state)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        logger.info("building tiny %s checkpoint (seed %d) in %s", family, seed, tmp_dir)
        module.build(tmp_dir, seed)
        manifest = _make_manifest(tmp_dir, family, seed, version)
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp_dir, out_dir, family, seed, version)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    total = sum(f["size"] for f in read_manifest(out_dir)["files"])
    logger.info("wrote tiny %s checkpoint to %s (%.1f MB)", family, out_dir, total / 1e6)
    return out_dir


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """Parse `tiny_manifest.json` of a checkpoint directory."""
    return json.loads((Path(ckpt_dir) / MANIFEST_NAME).read_text())


def _existing_state(out_dir: Path, family: str, seed: int, version: str) -> str:
    """Classify an existing out_dir: "match", "foreign", or a reason string for a rebuild."""
    if not any(out_dir.iterdir()):
        return "empty directory"
    try:
        manifest = read_manifest(out_dir)
    except (OSError, ValueError):
        return "foreign"
    if manifest.get("family") != family or manifest.get("seed") != seed:
        return "foreign"
    if manifest.get("builder_version") != version:
        return f"builder version {manifest.get('builder_version')} != {version}"
    for entry in manifest.get("files", []):
        path = out_dir / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            return f"{entry['path']} is missing or modified"
    return "match"


def _make_manifest(ckpt_dir: Path, family: str, seed: int, version: str) -> dict[str, Any]:
    files = []
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(ckpt_dir).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": _sha256(path)})
    return {"family": family, "seed": seed, "builder_version": version, "files": files}


def _swap_into_place(tmp_dir: Path, out_dir: Path, family: str, seed: int, version: str) -> None:
    """Rename tmp_dir to out_dir, moving any old out_dir aside first (then deleting it)."""
    old_dir: Path | None = None
    if out_dir.exists():
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old_dir / "ckpt")
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        # A concurrent builder (e.g. another pytest worker sharing VLM_TINY_CACHE) won the race;
        # its result is equivalent to ours if it matches.
        if out_dir.is_dir() and _existing_state(out_dir, family, seed, version) == "match":
            logger.info("another process already wrote %s; using it", out_dir)
        else:
            raise
    finally:
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
