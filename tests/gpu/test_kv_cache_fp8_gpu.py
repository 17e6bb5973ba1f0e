"""The fp8 KV cache (`kv_cache_dtype="fp8_e4m3"`) on a GPU (compute capability >= 8.9: Triton's fp8).

Kernels, compiled: the paged decode and prefill kernels over float8_e4m3fn caches against the float64
reference over the same values (fp32 and bf16 queries), and the rotary + KV write into an fp8 cache
against `write_kv` (that case runs inside `triton_ops_cases.run_all`, see test_triton_decode_gpu.py;
it is repeated here so this file covers fp8 on its own).

Engine: fp32 weights with an fp8 cache give the same greedy ids on the triton backend with CUDA graphs
(decode and piecewise prefill) as eagerly and as the reference (SDPA) backend, all of which read the
same fp8 values; the production setting (bf16, triton, graphs) runs and agrees with itself eagerly on
the first token; the auto-sized cache holds about twice the blocks of a bf16 cache.
"""

from __future__ import annotations

import gc

import pytest
import torch

from llm_service.engine.engine_core import EngineConfig, EngineCore, GenerationInput
from llm_service.engine.sampling_params import SamplingParams
from tests.engine.conftest import references  # noqa: F401 - the shared HF reference fixture
from tests.engine.test_engine_parity import _run_engine

FP8 = torch.float8_e4m3fn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
        reason="Triton's fp8 needs compute capability >= 8.9",
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_kernel_reads_an_fp8_cache(dtype):
    from tests.unit.triton_decode_cases import run_all

    assert run_all("cuda", dtype, seeds=range(6), kv_dtype=FP8) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_kernel_reads_an_fp8_cache(dtype):
    from tests.unit.triton_prefill_cases import run_all

    assert run_all("cuda", dtype, kv_dtype=FP8) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_write_into_an_fp8_cache(dtype):
    from tests.unit.triton_ops_cases import _check_rotary_fp8

    with torch.no_grad():
        assert _check_rotary_fp8(torch.device("cuda"), dtype) == []


def _outputs(
    ckpt, cases, dtype: str, backend: str, *, enforce_eager: bool, prepare=None
) -> dict[str, list[int]]:
    engine, outputs = _run_engine(
        ckpt,
        cases,
        16,
        prepare=prepare,
        device="cuda",
        dtype=dtype,
        num_kv_blocks=512,
        enforce_eager=enforce_eager,
        attention_backend=backend,
        kv_cache_dtype="fp8_e4m3",
    )
    assert engine.runner.kv_cache.dtype == FP8
    return outputs


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "mllama"])
def test_fp8_engine_paths_agree_fp32(references, family):  # noqa: F811
    ckpt, cases = references(family)
    replays = {"decode_graphs": 0, "prefill_graphs": 0}

    def count(engine) -> None:
        for attr in replays:
            graphs = getattr(engine.runner, attr)
            if graphs is None:
                continue
            run = graphs.run

            def counted(*args, _run=run, _attr=attr, **kwargs):
                replays[_attr] += 1
                return _run(*args, **kwargs)

            graphs.run = counted

    graphs = _outputs(ckpt, cases, "float32", "triton", enforce_eager=False, prepare=count)
    eager = _outputs(ckpt, cases, "float32", "triton", enforce_eager=True)
    reference = _outputs(ckpt, cases, "float32", "reference", enforce_eager=True)
    if family != "mllama":  # (mllama runs eagerly: cross-attention)
        assert replays["decode_graphs"] > 0 and replays["prefill_graphs"] > 0
    assert graphs == eager == reference


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_fp8_production_setting_bf16(references, family):  # noqa: F811
    ckpt, cases = references(family)
    first = {}
    for eager in (False, True):
        engine = EngineCore(
            EngineConfig(
                model_dir=str(ckpt),
                device="cuda",
                dtype="bfloat16",
                num_kv_blocks=256,
                kv_cache_dtype="fp8_e4m3",
                enforce_eager=eager,
            )
        )
        for i, (prompt, ref) in enumerate(cases):
            embeddings = [
                type(e)(e.content_id, e.kind, e.features.to(torch.bfloat16), e.media_type, e.num_tiles)
                for e in ref.embeddings
            ]
            params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=5)
            engine.add_request(
                GenerationInput(f"r{i}", prompt=prompt, embeddings=embeddings, sampling=params)
            )
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                for _, top in out.logprobs:
                    assert all(lp == lp and lp > -1e30 for _, lp in top), "NaN or -inf log probs"
        first[eager] = {rid: t[0] for rid, t in tokens.items()}
    assert first[False] == first[True]


def test_fp8_doubles_the_auto_sized_block_count(tiny_checkpoint):
    """The cache sized from the free GPU memory (a small fraction: the tiny model's blocks are ~4 KB and
    the scheduler keeps one object per block)."""
    ckpt = tiny_checkpoint("llava")
    blocks = {}
    for kv in ("auto", "fp8_e4m3"):
        engine = EngineCore(
            EngineConfig(
                model_dir=str(ckpt),
                device="cuda",
                dtype="bfloat16",
                kv_memory_fraction=0.002,
                kv_cache_dtype=kv,
                enforce_eager=True,
            )
        )
        blocks[kv] = engine.scheduler.config.num_blocks
        assert engine.runner.kv_cache.dtype == (FP8 if kv == "fp8_e4m3" else torch.bfloat16)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    assert 1.9 <= blocks["fp8_e4m3"] / blocks["auto"] <= 2.1, blocks
