"""The skinny GEMM kernel on CPU through Triton's interpreter (subprocess: TRITON_INTERPRET=1 must be
set before the kernel is defined), and the routing of `Linear` by its policy. The same cases run
compiled in tests/gpu/test_triton_decode_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_service.layers.linear import Linear, MergedLinear

REPO = Path(__file__).resolve().parents[2]


def test_skinny_gemm_matches_reference_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.triton_skinny_cases"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_policy_routes_only_chosen_shapes_and_row_counts():
    pytest.importorskip("triton")
    from llm_service.layers.triton_skinny import CANDIDATES, SkinnyGemmPolicy, row_class

    one, many = CANDIDATES[1][1], CANDIDATES[16][2]
    policy = SkinnyGemmPolicy(chosen={(1, 64, 32, torch.bfloat16): one, (16, 48, 32, torch.bfloat16): many})
    assert [row_class(m) for m in (1, 2, 9, 16)] == [1, 16, 16, 16]
    assert policy.config_for(1, 64, 32, torch.bfloat16) == one
    assert policy.config_for(2, 64, 32, torch.bfloat16) is None
    assert policy.config_for(7, 48, 32, torch.bfloat16) == many == policy.config_for(16, 48, 32, torch.bfloat16)
    assert policy.config_for(17, 48, 32, torch.bfloat16) is None  # past the kernel's 16-row tile
    assert policy.config_for(1, 64, 32, torch.float16) is None  # calibrated per dtype


def test_linear_off_cuda_is_f_linear_whatever_the_policy():
    pytest.importorskip("triton")
    from llm_service.layers.triton_skinny import CANDIDATES, SkinnyGemmPolicy

    torch.manual_seed(0)
    layer = MergedLinear(32, {"a": 16, "b": 48}, bias=True)
    layer.skinny_policy = SkinnyGemmPolicy(chosen={(1, 64, 32, torch.float32): CANDIDATES[1][0]})
    x, residual = torch.randn(1, 32), torch.randn(1, 64)
    out = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), out)
    assert torch.equal(layer(x, residual), residual + out)
    assert isinstance(layer, Linear)
