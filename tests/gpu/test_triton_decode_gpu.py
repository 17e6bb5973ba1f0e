"""The Triton paged decode kernel compiled on a GPU: the interpreter cases of
tests/unit/triton_decode_cases.py in fp32 (to float64 rounding) and bf16 (bf16 tolerance)."""

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
