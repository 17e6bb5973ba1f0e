#!/usr/bin/env python3
"""Export the vision side (tower + projector, ...) of a VLM checkpoint into an engine directory.

    python build/export_visual_engine.py --model CKPT --out ENGINE_DIR [--family auto]
        [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--format exported|aoti]
        [--max-batch 64] [--overwrite]

then serve it with `vlm-encoder --model CKPT --engine-dir ENGINE_DIR --dtype ... --device ...`.

What is exported is the adapter's `compute`: preprocessed pixel tensors in, features out, with a
dynamic batch dim (1..--max-batch rows per call; the server splits larger batches). LLaVA, VILA,
BLIP-2: `[B, 3, S, S]`; OneVision: crops `[N, 3, S, S]` (anyres packing and newline rows stay in
Python); mllama: `[B, 1, tiles, 3, S, S]` + aspect_ratio_ids `[B, 1]` + aspect_ratio_mask `[B, 1, tiles]`.

Formats: `exported` (default) is a `torch.export` ExportedProgram: quick to build, portable to any
machine with the same device type, about eager speed. `aoti` compiles it with AOTInductor into
native kernels: minutes to build, slow and pointless on CPU (a minute even for a tiny model); build
it on the GPU host that serves it, with the torch version that serves it.

The output directory holds the artifact and `manifest.json` (family, format, dtype, device, input
and output shapes, versions, the checkpoint's identity, sha256 per file). Idempotent: a directory
built from the same inputs is reused; the directory is written under a temporary name and renamed.
Works from a clean checkout without installing the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("encoder_service") is None:  # not installed: use this checkout
    sys.path.insert(0, str(REPO_ROOT))

from encoder_service.engines import detect_family, exported, load_visual_engine  # noqa: E402
from encoder_service.engines.base import ComputeInput, VisualEngine  # noqa: E402
from vlm_protocol.checkpoint_identity import model_fingerprint, processor_config_hash  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
FORMATS = exported.FORMATS
FAMILIES = ("auto", "blip2", "llava", "vila", "llava_onevision", "mllama")
DEFAULT_MAX_BATCH = 64
EXAMPLE_BATCH = 2  # traced batch size; 0/1 would be specialised by the tracer
SELF_CHECK_BATCHES = (1, 3)  # batch sizes compared with eager after the export

logger = logging.getLogger("export_visual_engine")


class ExportError(Exception):
    """A refused combination or an unusable input; the message says what to change."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="engine directory to write")
    parser.add_argument(
        "--family", default="auto", choices=FAMILIES, help="expected family (default: detect)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default: float32)")
    parser.add_argument(
        "--device", default="cpu", choices=DEVICES, help="device to export for (default: cpu)"
    )
    parser.add_argument(
        "--format", default="exported", choices=FORMATS, help="artifact kind (default: exported)"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"most rows (images, crops, frames) per artifact call, >= 2 (default: {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if built from other inputs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.max_batch < 2:
        parser.error(f"--max-batch must be >= 2 (the batch dim is dynamic), got {args.max_batch}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        out = export_visual_engine(args)
    except ExportError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("engine ready: %s", out)
    return 0


def export_visual_engine(args: argparse.Namespace) -> Path:
    model_dir, out = args.model.resolve(), args.out.resolve()
    try:
        family = detect_family(model_dir)
        identity = {
            "model_fingerprint": model_fingerprint(model_dir),
            "processor_config_hash": processor_config_hash(model_dir),
        }
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(str(exc)) from exc
    if args.family != "auto" and args.family != family:
        raise ExportError(f"--family {args.family} but {model_dir} is a {family} checkpoint")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda but this machine has no CUDA device; export on the GPU host")
    device = (
        torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    )
    if args.format == "aoti" and args.device == "cpu":
        logger.warning("--format aoti on CPU: compiling takes minutes and is meant for GPU hosts")

    build_key = {
        "family": family,
        "format": args.format,
        "dtype": args.dtype,
        "device": str(device),
        "max_batch": args.max_batch,
        **identity,
        # the fingerprint covers file names and sizes only; stats catch rewritten weights too
        "weight_files": _file_stats(model_dir),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "schema_version": exported.SCHEMA_VERSION,
    }
    if out.exists():
        if _is_up_to_date(out, build_key):
            logger.info("%s is up to date (same checkpoint, options and versions); reusing it", out)
            return out
        if not args.overwrite:
            raise ExportError(
                f"{out} exists and was not built from these inputs; pass --overwrite to replace it"
            )

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _build(partial, model_dir, family, device, args, build_key, identity)
        (partial / exported.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _build(
    directory: Path,
    model_dir: Path,
    family: str,
    device: torch.device,
    args: argparse.Namespace,
    build_key: dict[str, Any],
    identity: dict[str, str],
) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    logger.info("loading the eager %s engine from %s (%s, %s)", family, model_dir, device, args.dtype)
    try:
        engine = load_visual_engine(model_dir, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:  # e.g. a model variant the adapter refuses
        raise ExportError(f"cannot load the {family} engine from {model_dir}: {exc}") from exc
    try:
        inputs = engine.compute_inputs()
    except NotImplementedError as exc:
        raise ExportError(f"{family}: {exc}") from exc

    example = _example_inputs(inputs, EXAMPLE_BATCH, device)
    batch = torch.export.Dim(exported.BATCH_DIM, min=1, max=args.max_batch)
    started = time.perf_counter()
    logger.info("tracing %s compute with torch.export (batch 1..%d)", family, args.max_batch)
    with torch.no_grad():
        try:
            program = torch.export.export(
                engine.compute.eval(),
                example,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                strict=False,
            )
        except Exception as exc:  # torch.export raises many kinds; say which family and why
            raise ExportError(
                f"torch.export cannot trace the {family} compute with a dynamic batch: {type(exc).__name__}: {exc}"
            ) from exc
        output = engine.compute(*example)
    artifact = directory / exported.ARTIFACT_NAMES[args.format]
    if args.format == "exported":
        torch.export.save(program, str(artifact))
    else:
        from torch._inductor import aoti_compile_and_package

        logger.info("compiling with AOTInductor for %s (slow on CPU)", device)
        aoti_compile_and_package(program, package_path=str(artifact))
    build_seconds = time.perf_counter() - started
    logger.info("wrote %s (%.1f MB) in %.1fs", artifact.name, artifact.stat().st_size / 1e6, build_seconds)

    max_abs_diff = _self_check(engine, artifact, args.format, device, inputs, args.max_batch)
    logger.info(
        "self-check against eager at batch sizes %s: max abs diff %.3g", SELF_CHECK_BATCHES, max_abs_diff
    )
    return {
        "kind": exported.MANIFEST_KIND,
        "schema_version": exported.SCHEMA_VERSION,
        "family": family,
        "format": args.format,
        "dtype": args.dtype,
        "device": str(device),
        "max_batch": args.max_batch,
        "dynamic_dims": {exported.BATCH_DIM: {"min": 1, "max": args.max_batch}},
        "inputs": exported.input_entries(inputs),
        "outputs": [
            {
                "name": "features",
                "shape": [exported.BATCH_DIM, *output.shape[1:]],
                "dtype": exported.dtype_name(output.dtype),
            }
        ],
        "num_parameters": engine.num_parameters(),
        "source": {"model_dir": str(model_dir), **identity},
        "versions": {
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "python": platform.python_version(),
        },
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "self_check": {"batch_sizes": list(SELF_CHECK_BATCHES), "max_abs_diff": max_abs_diff},
        "build_seconds": round(build_seconds, 2),
        "build_key": build_key,
        "artifacts": {
            artifact.name: {"sha256": exported.file_sha256(artifact), "bytes": artifact.stat().st_size}
        },
    }


def _example_inputs(
    inputs: Sequence[ComputeInput], batch_size: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random pixels; integer inputs (mllama's aspect-ratio id and mask) all ones, a valid value."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in inputs:
        shape = (batch_size, *spec.shape)
        if spec.dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(spec.dtype)
        else:
            tensor = torch.ones(shape, dtype=spec.dtype)
        tensors.append(tensor.to(device))
    return tuple(tensors)


def _self_check(
    engine: VisualEngine,
    artifact: Path,
    fmt: str,
    device: torch.device,
    inputs: Sequence[ComputeInput],
    max_batch: int,
) -> float:
    """Load the written artifact back and compare it with the eager compute; returns the max abs diff."""
    program = exported.load_program(artifact, fmt, device, str(device))
    worst = 0.0
    with torch.no_grad():
        for batch_size in (b for b in SELF_CHECK_BATCHES if b <= max_batch):
            example = _example_inputs(inputs, batch_size, device, seed=batch_size)
            diff = (program(*example).float() - engine.compute(*example).float()).abs().max().item()
            if not math.isfinite(diff):
                raise ExportError(f"the exported {engine.family} engine gives non-finite features")
            worst = max(worst, diff)
    return worst


def _is_up_to_date(out: Path, build_key: dict[str, Any]) -> bool:
    try:
        manifest = exported.read_manifest(out)
        if manifest.get("build_key") != build_key:
            return False
        exported.verify_artifacts(manifest, out)
    except Exception as exc:  # any unreadable or stale directory is rebuilt (with --overwrite)
        logger.info("%s cannot be reused: %s", out, exc)
        return False
    return True


def _replace_dir(partial: Path, out: Path) -> None:
    """Move the finished directory into place; an old one is swapped out first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _file_stats(model_dir: Path) -> list[list]:
    return [
        [str(path.relative_to(model_dir)), path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(model_dir.rglob("*.safetensors"))
    ]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
