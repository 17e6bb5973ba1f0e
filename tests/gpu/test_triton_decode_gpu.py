"""The Triton kernels compiled on a GPU: the interpreter cases of tests/unit/triton_decode_cases.py
(paged decode attention) and tests/unit/triton_ops_cases.py (fused norm / rotary / SiLU) in fp32 and
bf16."""

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
