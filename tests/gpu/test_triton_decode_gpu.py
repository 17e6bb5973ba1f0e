"""The Triton kernels compiled on a GPU: the interpreter cases of tests/unit/triton_decode_cases.py
(paged decode attention), tests/unit/triton_ops_cases.py (fused norm / rotary / SiLU) in fp32 and
bf16, and tests/unit/triton_skinny_cases.py (skinny GEMM) in bf16 and fp16, plus the skinny GEMM's
calibration on real projection shapes."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference_on_gpu(dtype):
    from tests.unit.triton_decode_cases import run_all

    assert run_all("cuda", dtype, seeds=range(6)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_ops_match_eager_on_gpu(dtype):
    from tests.unit.triton_ops_cases import run_all

    assert run_all("cuda", dtype) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_skinny_gemm_matches_reference_on_gpu(dtype):
    from tests.unit.triton_skinny_cases import run_all

    assert run_all("cuda", dtype) == []


def test_skinny_gemm_calibration_routes_linear_layers():
    """Calibration times cuBLAS and every candidate for each shape and row class (a tied weight counts
    once); a Linear then gives the same result (to bf16 rounding) whichever kernel its policy picked,
    for 1, 5 and 16 rows and cuBLAS beyond, with and without a residual."""
    from llm_service.layers.linear import Linear
    from llm_service.layers.triton_skinny import SkinnyGemmPolicy

    torch.manual_seed(0)
    layers = [Linear(4096, 11008, bias=False).to("cuda", torch.bfloat16) for _ in range(4)]
    policy = SkinnyGemmPolicy()
    policy.calibrate([layers[0].weight, *(layer.weight for layer in layers)])
    assert [(r["rows"], r["n"], r["k"], r["weights"]) for r in policy.report] == [(1, 11008, 4096, 4), (16, 11008, 4096, 4)]
    assert all(r["cublas_us"] > 0 and r["skinny_us"] > 0 for r in policy.report)
    layer = layers[0]
    layer.skinny_policy = policy
    for rows in (1, 5, 16, 17):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(rows, 11008, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), layer.weight.float())
        err = float((layer(x).float() - ref).abs().max() / ref.abs().max())
        assert err < 1e-2, (rows, err)
        err = float((layer(x, residual).float() - ref - residual.float()).abs().max() / ref.abs().max())
        assert err < 2e-2, (rows, err)
    assert policy.config_for(17, 11008, 4096, torch.bfloat16) is None
