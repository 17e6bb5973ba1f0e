"""Exported visual engines: the model-side compute of an adapter, loaded from an engine directory.

`build/export_visual_engine.py` writes an engine directory: one artifact plus `manifest.json`.
  - format "exported": a `torch.export` ExportedProgram (`torch.export.save`), run as an ATen graph;
    portable across machines of the same device type, no transformers modelling code at run time;
  - format "aoti": an AOTInductor package (compiled kernels), the fast one on GPU hosts.
The artifact covers `engine.compute` only (tower, projector, ...), with a dynamic batch dim of at
most `max_batch` rows; the adapter around it (processor, batching, splitting, packing) is built from
the checkpoint directory as usual, so outputs keep their layout. Larger batches run in chunks.

Loading refuses, with a `FailedPreconditionError` that says what to do, an engine whose files do not
match their sha256, that was built from another checkpoint (`model_fingerprint`,
`processor_config_hash`) or family, or for another dtype or device type. An export is not moved
between device types: the graph holds device-specific kernels (e.g. CPU flash attention).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoder_service.engines.base import ComputeInput
from vlm_protocol.checkpoint_identity import model_fingerprint, processor_config_hash
from vlm_protocol.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "vlm-visual-engine"
SCHEMA_VERSION = 1
ARTIFACT_NAMES = {"exported": "visual_engine.pt2", "aoti": "visual_engine.aoti.pt2"}
FORMATS = tuple(ARTIFACT_NAMES)
BATCH_DIM = "batch"  # the one dynamic dim: dim 0 of every input and of the output
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.long: "int64",
}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_entries(inputs: Sequence[ComputeInput]) -> list[dict[str, Any]]:
    """Manifest form of `compute_inputs()`: shapes with the dynamic batch dim named."""
    return [{"name": i.name, "shape": [BATCH_DIM, *i.shape], "dtype": dtype_name(i.dtype)} for i in inputs]


def read_manifest(engine_dir: Path) -> dict[str, Any]:
    path = engine_dir / MANIFEST_NAME
    if not path.is_file():
        raise FailedPreconditionError(
            f"engine directory {engine_dir} has no {MANIFEST_NAME}; build one with build/export_visual_engine.py"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FailedPreconditionError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise FailedPreconditionError(f"{path} is not a visual-engine manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise FailedPreconditionError(
            f"{path} has schema version {manifest.get('schema_version')}, this server reads "
            f"{SCHEMA_VERSION}; re-export the engine"
        )
    if manifest.get("format") not in FORMATS:
        raise FailedPreconditionError(f"{path}: unknown format {manifest.get('format')!r} (known: {FORMATS})")
    return manifest


def verify_artifacts(manifest: dict[str, Any], engine_dir: Path) -> None:
    """Every listed file exists with its recorded size and sha256 (a copy cut short or edited fails)."""
    artifacts = manifest.get("artifacts") or {}
    if ARTIFACT_NAMES[manifest["format"]] not in artifacts:
        raise FailedPreconditionError(f"{engine_dir}: the manifest lists no {manifest['format']} artifact")
    for name, entry in artifacts.items():
        path = engine_dir / name
        if not path.is_file():
            raise FailedPreconditionError(f"{engine_dir}: artifact {name} is missing; re-export the engine")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise FailedPreconditionError(
                f"{engine_dir}: artifact {name} does not match its manifest checksum (corrupt or "
                "modified); re-export the engine"
            )


def verify_source(manifest: dict[str, Any], checkpoint_dir: Path, *, family: str) -> None:
    """The engine was exported from this checkpoint: same family, fingerprint and processor config."""
    source = manifest.get("source") or {}
    if manifest.get("family") != family:
        raise FailedPreconditionError(
            f"engine was exported for family {manifest.get('family')!r} but {checkpoint_dir} is {family!r}"
        )
    for key, actual in (
        ("model_fingerprint", model_fingerprint(checkpoint_dir)),
        ("processor_config_hash", processor_config_hash(checkpoint_dir)),
    ):
        if source.get(key) != actual:
            raise FailedPreconditionError(
                f"engine was exported from another checkpoint: its {key} {source.get(key)} differs from "
                f"{checkpoint_dir}'s {actual}; re-export it from this checkpoint"
            )


def verify_runtime(manifest: dict[str, Any], *, device: torch.device, dtype: torch.dtype) -> None:
    """Same dtype and device type as the export; a different torch version only warns."""
    if manifest["dtype"] != dtype_name(dtype):
        raise FailedPreconditionError(
            f"engine was exported for dtype {manifest['dtype']}, not {dtype_name(dtype)}; "
            f"run with --dtype {manifest['dtype']} or re-export"
        )
    exported_on = torch.device(manifest["device"])
    if exported_on.type != device.type:
        raise FailedPreconditionError(
            f"engine was exported for device {manifest['device']}, not {device}; run with "
            f"--device {exported_on.type} or re-export with --device {device.type}"
        )
    built_with = (manifest.get("versions") or {}).get("torch")
    if built_with != torch.__version__:
        logger.warning(
            "engine %s was built with torch %s, this is torch %s (%s artifacts may not load)",
            manifest["family"],
            built_with,
            torch.__version__,
            manifest["format"],
        )


class ExportedCompute(nn.Module):
    """An engine's `compute` backed by a loaded artifact; splits batches larger than `max_batch`.

    `program` (exported format: the unlifted GraphModule, whose weights `named_parameters` reports;
    aoti: the compiled package, weights opaque) takes the inputs listed in the manifest.
    """

    def __init__(self, program: Callable[..., torch.Tensor], *, max_batch: int, fmt: str) -> None:
        super().__init__()
        self.program = program  # registered as a child when it is a module
        self.max_batch = max_batch
        self.format = fmt

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        num_rows = inputs[0].shape[0]  # every input shares the batch dim
        if num_rows <= self.max_batch:
            return self.program(*inputs)
        chunks = [
            self.program(*(t[start : start + self.max_batch] for t in inputs))
            for start in range(0, num_rows, self.max_batch)
        ]
        return torch.cat(chunks)


def load_program(path: Path, fmt: str, device: torch.device, exported_on: str) -> Callable[..., torch.Tensor]:
    """The callable of one artifact on `device` (same device type as `exported_on`)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if fmt == "exported":
        program = torch.export.load(str(path))
        if torch.device(exported_on) != device:  # e.g. built on cuda:0, served on cuda:1
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, {str(torch.device(exported_on)): str(device)})
        return program.module()
    from torch._inductor import aoti_load_package

    kwargs = {}
    if device.type == "cuda" and "device_index" in inspect.signature(aoti_load_package).parameters:
        kwargs["device_index"] = device.index
    return aoti_load_package(str(path), **kwargs)


def load_exported_compute(
    engine_dir: str | Path,
    checkpoint_dir: str | Path,
    *,
    family: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> tuple[ExportedCompute, dict[str, Any]]:
    """Verify `engine_dir` against the checkpoint and runtime, then load it: (compute, manifest)."""
    engine_dir, checkpoint_dir, device = Path(engine_dir), Path(checkpoint_dir), torch.device(device)
    manifest = read_manifest(engine_dir)
    verify_source(manifest, checkpoint_dir, family=family)
    verify_runtime(manifest, device=device, dtype=dtype)
    verify_artifacts(manifest, engine_dir)
    fmt = manifest["format"]
    path = engine_dir / ARTIFACT_NAMES[fmt]
    try:
        program = load_program(path, fmt, device, manifest["device"])
    except Exception as exc:  # torch raises many types for an unloadable archive
        raise FailedPreconditionError(
            f"{path} could not be loaded ({type(exc).__name__}: {exc}); re-export it with this torch version"
        ) from exc
    logger.info(
        "loaded %s visual engine artifact %s (%s, %s, batch <= %d per call)",
        family,
        path,
        fmt,
        manifest["dtype"],
        manifest["max_batch"],
    )
    return ExportedCompute(program, max_batch=int(manifest["max_batch"]), fmt=fmt), manifest


def check_signature(manifest: dict[str, Any], inputs: Sequence[ComputeInput], llm_hidden_size: int) -> None:
    """The adapter built from the checkpoint feeds the inputs the artifact was traced with and
    expects features of its LLM width."""
    expected = input_entries(inputs)
    if manifest.get("inputs") != expected:
        raise FailedPreconditionError(
            f"engine inputs {manifest.get('inputs')} differ from what the checkpoint's adapter feeds "
            f"({expected}); re-export the engine"
        )
    width = manifest["outputs"][0]["shape"][-1]
    if width != llm_hidden_size:
        raise FailedPreconditionError(
            f"engine outputs {width} features per row but the checkpoint's LLM takes {llm_hidden_size}; "
            "re-export the engine"
        )
