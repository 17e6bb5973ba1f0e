"""The Triton kernels on CPU, through Triton's interpreter (TRITON_INTERPRET=1 must be set before the
kernels are defined, hence the subprocesses). Paged decode attention: random paged layouts, GQA/MQA, a
head dim that is not a power of two, and the split-KV merge, against the float64 reference. Fused
elementwise ops (add + RMSNorm, rotary + KV write, SiLU * up): against the eager ops they replace.
The same cases run compiled on a GPU in tests/gpu/test_triton_decode_gpu.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_service.engine.cuda_graphs import DecodeGraphs
from llm_service.layers.attention import resolve_attention_backend

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cases", ["triton_decode_cases", "triton_ops_cases"])
def test_kernels_match_reference_under_interpreter(cases):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", f"tests.unit.{cases}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_attention_backend("triton", "cpu")
    assert resolve_attention_backend("auto", "cpu") == "batched"
    if importlib.util.find_spec("triton") is not None:
        assert resolve_attention_backend("triton", "cuda") == "triton"
        assert resolve_attention_backend("auto", "cuda") == "triton"
    # without the triton package: auto falls back (with a warning), an explicit request is refused
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert resolve_attention_backend("auto", "cuda") == "batched"
    with pytest.raises(ValueError, match="triton package"):
        resolve_attention_backend("triton", "cuda")


def test_decode_graphs_with_triton_need_one_block_bucket():
    graphs = DecodeGraphs(
        torch.nn.Identity(), [], block_size=16, scratch_block=0, max_batch_size=64, max_blocks_per_seq=64,
        hidden_size=4, device=torch.device("cpu"), dtype=torch.float32, capture=False, attention_backend="triton",
    )
    assert graphs.keys == [(b, 64) for b in (1, 2, 4, 8, 16, 32, 48, 64)]
    assert graphs.bucket_for(3, 16 * 3) == (4, 64)  # any context length: the kernel reads seq_lens
