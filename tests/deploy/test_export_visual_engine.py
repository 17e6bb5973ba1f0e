"""build/export_visual_engine.py and `encoder_service --engine-dir` (issue 7), on tiny checkpoints.

The exported engine must give the eager engine's features through `encode` (fp32: max abs diff
<= 1e-5) at two batch sizes, refuse tampered or foreign artifacts at load time, and serve the same
Encode answers. The GPU test (LLaVA-1.5 vision shapes, bf16) runs on a CUDA host only.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from vlm.v1 import common_pb2, encoder_service_pb2, encoder_service_pb2_grpc

from encoder_service.config import EncoderConfig
from encoder_service.engines import exported, load_visual_engine
from encoder_service.engines import weights as weights_module
from encoder_service.engines.base import MediaInput
from encoder_service.server import build_server, load_engine
from vlm_protocol.checkpoint_identity import model_fingerprint, processor_config_hash
from vlm_protocol.errors import FailedPreconditionError
from vlm_protocol.grpc_server import ServerConfig
from vlm_protocol.tensor_codec import decode_torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "build" / "export_visual_engine.py"
ARTIFACT = exported.ARTIFACT_NAMES["exported"]
MAX_BATCH = 4  # small, so a OneVision batch of crops runs in chunks
FP32_TOLERANCE = 1e-5


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_visual_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_script = _load_script()


def export(model: Path, out: Path, *extra: str) -> int:
    return export_script.main(
        ["--model", str(model), "--out", str(out), "--max-batch", str(MAX_BATCH), *extra]
    )


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(30, 45), (40, 24), (33, 33), (20, 50)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def llava_engine_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """Built by the CLI in a fresh interpreter, from another directory, without PYTHONPATH."""
    out = tmp_path_factory.mktemp("engines") / "llava"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_checkpoint("llava")), "--out", str(out)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for step in ("loading the eager llava engine", "tracing llava compute", "self-check", "engine ready"):
        assert step in result.stderr, result.stderr
    return out


@pytest.fixture(scope="module")
def engine_dirs(tiny_checkpoint, tmp_path_factory):
    """family -> exported engine directory (fp32, cpu, max batch 4), built once per module."""
    root = tmp_path_factory.mktemp("engines-by-family")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            assert export(tiny_checkpoint(family), root / family) == 0
            built[family] = root / family
        return built[family]

    return get


# -- the CLI and its manifest ------------------------------------------------------------------------------


def test_cli_writes_a_manifest_that_describes_the_artifact(llava_engine_dir, tiny_checkpoint):
    checkpoint = tiny_checkpoint("llava")
    manifest = json.loads((llava_engine_dir / exported.MANIFEST_NAME).read_text())
    assert sorted(p.name for p in llava_engine_dir.iterdir()) == sorted([exported.MANIFEST_NAME, ARTIFACT])
    assert not [p for p in llava_engine_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert (manifest["kind"], manifest["family"], manifest["format"]) == (
        "vlm-visual-engine",
        "llava",
        "exported",
    )
    assert (manifest["dtype"], manifest["device"], manifest["max_batch"]) == ("float32", "cpu", 64)
    assert manifest["dynamic_dims"] == {"batch": {"min": 1, "max": 64}}
    engine = load_visual_engine(checkpoint)
    size = engine.image_size
    assert manifest["inputs"] == [
        {"name": "pixel_values", "shape": ["batch", 3, size, size], "dtype": "float32"}
    ]
    assert manifest["outputs"] == [
        {
            "name": "features",
            "shape": ["batch", engine.num_rows_per_image, engine.llm_hidden_size],
            "dtype": "float32",
        }
    ]
    assert manifest["source"]["model_fingerprint"] == model_fingerprint(checkpoint)
    assert manifest["source"]["processor_config_hash"] == processor_config_hash(checkpoint)
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["transformers"]
    assert manifest["num_parameters"] == engine.num_parameters()
    assert manifest["self_check"]["max_abs_diff"] <= FP32_TOLERANCE
    entry = manifest["artifacts"][ARTIFACT]
    artifact = llava_engine_dir / ARTIFACT
    assert entry == {"sha256": exported.file_sha256(artifact), "bytes": artifact.stat().st_size}
    program = torch.export.load(str(artifact))  # a plain ExportedProgram
    assert isinstance(program, torch.export.ExportedProgram)


def test_rerun_reuses_a_matching_directory(llava_engine_dir, tiny_checkpoint, caplog):
    artifact = llava_engine_dir / ARTIFACT
    before = (artifact.stat().st_mtime_ns, (llava_engine_dir / exported.MANIFEST_NAME).read_bytes())
    argv = ["--model", str(tiny_checkpoint("llava")), "--out", str(llava_engine_dir)]
    with caplog.at_level(logging.INFO):
        assert export_script.main(argv) == 0
    assert "up to date" in caplog.text
    assert (artifact.stat().st_mtime_ns, (llava_engine_dir / exported.MANIFEST_NAME).read_bytes()) == before


def test_other_options_or_a_tampered_artifact_need_overwrite(
    llava_engine_dir, tiny_checkpoint, tmp_path, caplog
):
    out = tmp_path / "engine"
    shutil.copytree(llava_engine_dir, out)
    checkpoint = tiny_checkpoint("llava")
    with caplog.at_level(logging.INFO):
        assert export(checkpoint, out) == 2  # --max-batch 4, built with 64
    assert "--overwrite" in caplog.text
    assert json.loads((out / exported.MANIFEST_NAME).read_text())["max_batch"] == 64  # untouched

    data = bytearray((out / ARTIFACT).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / ARTIFACT).write_bytes(bytes(data))
    argv = ["--model", str(checkpoint), "--out", str(out)]
    assert export_script.main(argv) == 2  # same options, but the artifact no longer matches
    assert export_script.main([*argv, "--overwrite"]) == 0
    manifest = json.loads((out / exported.MANIFEST_NAME).read_text())
    assert manifest["artifacts"][ARTIFACT]["sha256"] == exported.file_sha256(out / ARTIFACT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # swapped in place, nothing left over


def test_cli_refuses_bad_combinations(tiny_checkpoint, tmp_path, caplog):
    checkpoint = tiny_checkpoint("llava")
    with caplog.at_level(logging.ERROR):
        assert export(checkpoint, tmp_path / "a", "--family", "mllama") == 2
        assert "llava checkpoint" in caplog.text
        assert export(tmp_path, tmp_path / "b") == 2  # not a checkpoint
        assert "config.json" in caplog.text
        if not torch.cuda.is_available():
            assert export(checkpoint, tmp_path / "c", "--device", "cuda") == 2
            assert "no CUDA device" in caplog.text
    with pytest.raises(SystemExit):
        export_script.parse_args(
            ["--model", str(checkpoint), "--out", str(tmp_path / "d"), "--max-batch", "1"]
        )
    assert list(tmp_path.iterdir()) == []  # nothing written


# -- loading: verification ---------------------------------------------------------------------------------


def test_tampered_artifact_is_refused_at_load(llava_engine_dir, tiny_checkpoint, tmp_path):
    engine_dir = shutil.copytree(llava_engine_dir, tmp_path / "engine")
    with (engine_dir / ARTIFACT).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(FailedPreconditionError, match="checksum"):
        load_visual_engine(tiny_checkpoint("llava"), engine_dir=engine_dir)
    manifest_path = engine_dir / exported.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    shutil.copy(llava_engine_dir / ARTIFACT, engine_dir / ARTIFACT)
    manifest["inputs"][0]["shape"][-1] += 1  # a hand-edited manifest no longer matches the adapter
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FailedPreconditionError, match="engine inputs .* differ"):
        load_visual_engine(tiny_checkpoint("llava"), engine_dir=engine_dir)
    (engine_dir / ARTIFACT).unlink()
    with pytest.raises(FailedPreconditionError, match="missing"):
        load_visual_engine(tiny_checkpoint("llava"), engine_dir=engine_dir)
    (engine_dir / exported.MANIFEST_NAME).unlink()
    with pytest.raises(FailedPreconditionError, match="no manifest.json"):
        load_visual_engine(tiny_checkpoint("llava"), engine_dir=engine_dir)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_engine_from_another_checkpoint_or_runtime_is_refused(llava_engine_dir, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llava")
    other_config = shutil.copytree(checkpoint, tmp_path / "other-config")
    _edit_json(other_config / "config.json", projector_hidden_act="relu")
    with pytest.raises(FailedPreconditionError, match="another checkpoint: its model_fingerprint"):
        load_visual_engine(other_config, engine_dir=llava_engine_dir)

    other_processor = shutil.copytree(checkpoint, tmp_path / "other-processor")
    _edit_json(other_processor / "preprocessor_config.json", image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(FailedPreconditionError, match="processor_config_hash"):
        load_visual_engine(other_processor, engine_dir=llava_engine_dir)

    with pytest.raises(FailedPreconditionError, match="family 'llava' but .* is 'vila'"):
        load_visual_engine(tiny_checkpoint("vila"), engine_dir=llava_engine_dir)
    with pytest.raises(FailedPreconditionError, match="--dtype float32"):
        load_visual_engine(checkpoint, engine_dir=llava_engine_dir, dtype=torch.bfloat16)
    with pytest.raises(FailedPreconditionError, match="--device cpu"):
        load_visual_engine(checkpoint, engine_dir=llava_engine_dir, device="cuda")


def test_service_main_reports_a_mismatch_at_startup(llava_engine_dir, tiny_checkpoint, caplog):
    from encoder_service.__main__ import main

    argv = ["--model", str(tiny_checkpoint("vila")), "--engine-dir", str(llava_engine_dir), "--port", "0"]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    assert "encoder failed to start" in caplog.text and "exported for family 'llava'" in caplog.text


# -- loading: the same features ----------------------------------------------------------------------------


def _batch(engine, family: str, images: list[Image.Image]) -> list:
    """One PreparedInput per image; OneVision: a single-image prompt (anyres: base crop + grid), then
    one prompt with the other images (one crop each)."""
    if family == "llava_onevision" and len(images) > 1:
        return [
            engine.preprocess(MediaInput(images=images[:1])),
            engine.preprocess(MediaInput(images=images[1:])),
        ]
    return [engine.preprocess(MediaInput(images=[image])) for image in images]


@pytest.mark.parametrize("family", ["llava", "blip2", "vila", "llava_onevision", "mllama"])
def test_exported_engine_encodes_like_eager(engine_dirs, tiny_checkpoint, family, monkeypatch):
    checkpoint, engine_dir = tiny_checkpoint(family), engine_dirs(family)
    eager = load_visual_engine(checkpoint)
    read: list[str] = []
    original_read = weights_module.CheckpointTensors.read
    monkeypatch.setattr(
        weights_module.CheckpointTensors,
        "read",
        lambda self, names: read.extend(names) or original_read(self, names),
    )
    engine = load_visual_engine(checkpoint, engine_dir=engine_dir)
    assert read == (["image_newline"] if family == "llava_onevision" else [])  # no eager weights loaded
    assert isinstance(engine.compute, exported.ExportedCompute) and engine.num_parameters() > 0
    for attribute in ("kind", "llm_hidden_size", "image_size", "num_rows_per_image"):
        assert getattr(engine, attribute) == getattr(eager, attribute)

    for num_images in (1, 3):  # two batch sizes through the dynamic batch dim
        images = _images(num_images, seed=num_images)
        batch = _batch(engine, family, images)
        ours, theirs = engine.encode(batch), eager.encode(_batch(eager, family, images))
        assert len(ours) == len(theirs) == len(images)
        for a, b in zip(ours, theirs, strict=True):
            assert a.features.shape == b.features.shape and a.features.dtype == b.features.dtype
            assert (a.features - b.features).abs().max().item() <= FP32_TOLERANCE
            assert (a.num_rows, a.num_crops, a.image_size) == (b.num_rows, b.num_crops, b.image_size)
            assert (a.num_tiles, a.aspect_ratio_id, a.aspect_ratio_mask) == (
                b.num_tiles,
                b.aspect_ratio_id,
                b.aspect_ratio_mask,
            )
        if family == "llava_onevision" and num_images == 3:
            assert sum(p.pixel_values.shape[0] for p in batch) > MAX_BATCH  # ran in chunks


# -- the service --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _serving(config: EncoderConfig) -> AsyncIterator[encoder_service_pb2_grpc.EncoderServiceStub]:
    server = build_server(config, load_engine(config))
    channel = grpc.aio.insecure_channel(server.address)
    try:
        await server.start()
        yield encoder_service_pb2_grpc.EncoderServiceStub(channel)
    finally:
        await channel.close()
        await server.stop_now()


def test_server_with_engine_dir_serves_the_eager_features(llava_engine_dir, tiny_checkpoint):
    checkpoint = tiny_checkpoint("llava")
    png = io.BytesIO()
    _images(1, seed=7)[0].save(png, format="PNG")
    request = encoder_service_pb2.EncodeRequest(
        items=[common_pb2.MediaItem(image=common_pb2.Image(data=png.getvalue()))]
    )

    async def encode(engine_dir: Path | None):
        config = EncoderConfig(
            model_dir=checkpoint,
            engine_dir=engine_dir,
            server=ServerConfig(host="127.0.0.1", port=0, grace_period_s=0.5),
        )
        async with _serving(config) as stub:
            return (await stub.Encode(request, timeout=30)).results[0].embedding

    async def scenario():
        return await encode(None), await encode(llava_engine_dir)

    eager, ours = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert ours.content_id == eager.content_id  # same checkpoint identity, same preprocessing
    assert torch.equal(decode_torch(ours.features), decode_torch(eager.features))


# -- on the GPU host ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["exported", "aoti"])
def test_llava15_shaped_engine_on_cuda_bf16_matches_eager(tmp_path, fmt):
    """CLIP ViT-L/14-336 + 2-layer MLP (random weights), bf16 on CUDA, at batch sizes 1 and 8.

    bf16 tolerance: against eager fp32 (the same weights), the artifact's relative L2 error is at
    most twice eager bf16's own (floor 1e-2), and it is within 5e-2 of eager bf16. AOTInductor fuses
    and reorders reductions, so bit equality with eager bf16 is not expected.
    """
    from benchmarks.bench_encoder import make_llava15_vision_checkpoint

    checkpoint = tmp_path / "llava15"
    checkpoint.mkdir()
    make_llava15_vision_checkpoint(checkpoint, "cuda")
    out = tmp_path / f"engine-{fmt}"
    argv = ["--model", str(checkpoint), "--out", str(out), "--device", "cuda", "--dtype", "bfloat16"]
    assert export_script.main([*argv, "--format", fmt, "--max-batch", "16"]) == 0

    engine = load_visual_engine(checkpoint, device="cuda", dtype=torch.bfloat16, engine_dir=out)
    eager = load_visual_engine(checkpoint, device="cuda", dtype=torch.bfloat16)
    reference = load_visual_engine(checkpoint, device="cuda", dtype=torch.float32)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    for num_images in (1, 8):
        batch = [engine.preprocess(MediaInput(images=_images(num_images, seed=num_images)))]
        ours, bf16, fp32 = (
            torch.stack([o.features for o in e.encode(batch)]).float() for e in (engine, eager, reference)
        )
        assert ours.shape == bf16.shape == (num_images, 576, 4096)
        assert relative(ours, fp32) <= max(2 * relative(bf16, fp32), 1e-2), (
            relative(ours, fp32),
            relative(bf16, fp32),
        )
        assert relative(ours, bf16) <= 5e-2, relative(ours, bf16)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler"
)
def test_aoti_package_on_cpu(tiny_checkpoint, tmp_path):
    """AOTInductor on CPU (slow: about a minute to compile even this tiny model; meant for GPU hosts)."""
    checkpoint = tiny_checkpoint("llava")
    out = tmp_path / "aoti"
    assert export(checkpoint, out, "--format", "aoti") == 0
    manifest = json.loads((out / exported.MANIFEST_NAME).read_text())
    assert manifest["format"] == "aoti" and exported.ARTIFACT_NAMES["aoti"] in manifest["artifacts"]
    engine = load_visual_engine(checkpoint, engine_dir=out)
    eager = load_visual_engine(checkpoint)
    images = _images(6)  # above --max-batch 4: two calls
    ours = engine.encode([engine.preprocess(MediaInput(images=images))])
    theirs = eager.encode([eager.preprocess(MediaInput(images=images))])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.features, b.features, atol=1e-3, rtol=1e-3)  # fused kernels
