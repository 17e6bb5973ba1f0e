"""The fp8 KV cache option (`--kv-cache-dtype fp8_e4m3`) below the engine: the saturating write, the SDPA
backends' fp8 reads, the device checks, and the flag's way from the CLI to `EngineConfig` and the
throughput benchmark. (The Triton kernels' fp8 cases run in the interpreter subprocesses of
test_triton_decode.py / test_triton_prefill.py; the engine-level checks are in
tests/engine/test_kv_cache_fp8.py.)"""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import pytest
import torch

from llm_service.__main__ import build_parser, config_from_args
from llm_service.config import LlmServiceConfig
from llm_service.engine.engine_core import EngineConfig
from llm_service.layers import attention
from llm_service.layers.attention import (
    AttentionMetadata,
    check_kv_cache_dtype,
    paged_attention,
    resolve_kv_cache_dtype,
    write_kv,
)
from tests.unit.test_paged_attention import _layout
from vlm_protocol.errors import InvalidArgumentError

FP8 = torch.float8_e4m3fn
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_write_kv_rounds_to_nearest_e4m3_and_saturates():
    cache_k = torch.zeros(3, 4, 1, 4, dtype=FP8)
    cache_v = torch.zeros(3, 4, 1, 4, dtype=FP8)
    key = torch.tensor([[[1.0, 7.75, -15.5, 0.3]], [[448.0, 464.0, 1e4, float("inf")]]])  # [2, 1, 4]
    value = torch.tensor([[[-1e30, -float("inf"), 2**-9, 2**-11]], [[0.0, -0.0, 100.0, -449.0]]])
    write_kv(key, value, cache_k, cache_v, torch.tensor([5, 10]))
    k = cache_k.view(-1, 1, 4).float()
    v = cache_v.view(-1, 1, 4).float()
    # 7.75 rounds up into the next binade; -15.5 is a tie (to even: -16); 0.3 -> 0.3125 (3 mantissa bits)
    assert k[5, 0].tolist() == [1.0, 8.0, -16.0, 0.3125]
    assert k[10, 0].tolist() == [448.0, 448.0, 448.0, 448.0]  # saturated, never NaN
    assert v[5, 0].tolist() == [-448.0, -448.0, 2**-9, 0.0]  # 2**-11 is below half the smallest step
    assert v[10, 0].tolist() == [0.0, 0.0, 96.0, -448.0]
    untouched = [i for i in range(12) if i not in (5, 10)]
    assert not k[untouched].any() and not v[untouched].any()


@pytest.mark.parametrize("backend", ["reference", "batched"])
def test_sdpa_backends_read_an_fp8_cache_as_its_upcast_values(backend):
    """Same layout over an fp8 cache and over an fp32 cache holding the same (upcast) values: the
    outputs agree to fp32 rounding, so the fp8 reads gather the right blocks and upcast exactly."""
    rng = random.Random(3)
    torch.manual_seed(3)
    block_size, num_blocks = 4, 40
    query_lens, seq_lens, tables = _layout(rng, 5, block_size, num_blocks, decode_share=0.5)
    k8 = (torch.randn(num_blocks, block_size, 2, 16) * 3).to(FP8)
    v8 = (torch.randn(num_blocks, block_size, 2, 16) * 3).to(FP8)
    query = torch.randn(sum(query_lens), 4, 16)
    meta, _ = AttentionMetadata.build(
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=tables,
        block_size=block_size,
        device=torch.device("cpu"),
        backend=backend,
    )
    out8 = paged_attention(query, k8, v8, meta, 0.25)
    out32 = paged_attention(query, k8.float(), v8.float(), meta, 0.25)
    assert out8.dtype == torch.float32
    torch.testing.assert_close(out8, out32, rtol=1e-6, atol=1e-6)


def test_kv_cache_dtype_names():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16) == FP8
    for bad in ("fp8", "float8_e4m3fn", "fp8_e5m2", "int8", ""):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8_e4m3"):
            resolve_kv_cache_dtype(bad, torch.bfloat16)


def test_fp8_needs_a_capable_device(monkeypatch):
    check_kv_cache_dtype(FP8, "batched", "cpu")  # CPU torch casts float8_e4m3fn: the SDPA paths run
    check_kv_cache_dtype(FP8, "triton", "cpu")  # (the Triton interpreter)
    check_kv_cache_dtype(torch.bfloat16, "triton", "mps")  # only fp8 is checked
    with pytest.raises(ValueError, match="needs a CPU or CUDA device"):
        check_kv_cache_dtype(FP8, "batched", "mps")
    # an A100 (8.0): Triton cannot store or load fp8 there; an H100 (9.0) and an L40S (8.9) can
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    monkeypatch.setattr(attention, "_cuda_capability", lambda index: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9 .* NVIDIA A100 is 8.0"):
        check_kv_cache_dtype(FP8, "triton", "cuda:0")
    check_kv_cache_dtype(FP8, "batched", "cuda:0")  # the SDPA paths upcast with torch ops
    assert not attention.triton_fp8_supported("cuda:0")  # so the K/V write takes write_kv there
    for capability in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(attention, "_cuda_capability", lambda index, c=capability: c)
        check_kv_cache_dtype(FP8, "triton", "cuda")
        assert attention.triton_fp8_supported("cuda")


def test_engine_config_validates_kv_cache_dtype():
    assert EngineConfig(model_dir="x").kv_cache_torch_dtype == torch.float32  # auto on CPU: the model dtype
    assert EngineConfig(model_dir="x", device="cuda").kv_cache_torch_dtype == torch.bfloat16
    assert EngineConfig(model_dir="x", kv_cache_dtype="fp8_e4m3").kv_cache_torch_dtype == FP8
    assert (
        EngineConfig(
            model_dir="x", device="cuda", dtype="float16", kv_cache_dtype="fp8_e4m3"
        ).kv_cache_torch_dtype
        == FP8
    )
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8_e4m3, got 'fp8'"):
        EngineConfig(model_dir="x", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="needs a CPU or CUDA device"):
        EngineConfig(model_dir="x", device="mps", kv_cache_dtype="fp8_e4m3")


def test_kv_cache_dtype_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["--model", "ckpt", "--device", "cpu", "--kv-cache-dtype", "fp8_e4m3"])
    config = config_from_args(args)
    assert config.kv_cache_dtype == "fp8_e4m3"
    assert config.engine_config().kv_cache_dtype == "fp8_e4m3"
    assert config.engine_config().kv_cache_torch_dtype == FP8
    default = config_from_args(build_parser().parse_args(["--model", "ckpt", "--device", "cpu"]))
    assert default.engine_config().kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser().parse_args(["--model", "ckpt", "--kv-cache-dtype", "fp8_e5m2"])
    with pytest.raises(InvalidArgumentError, match="kv_cache_dtype must be one of auto, fp8_e4m3"):
        LlmServiceConfig(model_dir="ckpt", kv_cache_dtype="float8")
    assert "saturated to +-448" in " ".join(build_parser().format_help().split())


def test_throughput_benchmark_records_the_kv_cache_dtype(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_throughput")
    common = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--scenarios", "8/4", "--concurrency", "2"]
    assert bench.main([*common, "--systems", "engine,hf_static"]) == 0
    assert bench.main([*common, "--systems", "engine", "--kv-cache-dtype", "fp8_e4m3", "--merge"]) == 0
    points = {p["system"]: p for p in json.loads((tmp_path / "throughput.json").read_text())["points"]}
    assert set(points) == {"engine", "hf_static", "engine_fp8kv"}  # the fp8 variant kept apart by --merge
    assert points["engine"]["kv_cache_dtype"] == points["hf_static"]["kv_cache_dtype"] == "float32"
    assert points["engine_fp8kv"]["kv_cache_dtype"] == "float8_e4m3fn"
    assert (
        points["engine_fp8kv"]["output_tokens"] == points["engine"]["output_tokens"] == 16
    )  # 4 requests x 4
    assert points["engine_fp8kv"]["num_kv_blocks"] == points["engine"]["num_kv_blocks"]  # CPU: a fixed count
