"""Cases for the skinny GEMM (llm_service/layers/triton_skinny.py) against `F.linear` in float64;
shared by the CPU interpreter test (tests/unit/test_triton_skinny.py, TRITON_INTERPRET=1 in a
subprocess) and the GPU test (tests/gpu/test_triton_decode_gpu.py).

Run directly: `TRITON_INTERPRET=1 python -m tests.unit.triton_skinny_cases` (exits non-zero on a mismatch).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from llm_service.layers.triton_skinny import MAX_ROWS, SkinnyConfig, skinny_matmul

# (rows, N, K): one row and the dot path; N and K that are not multiples of the blocks
SHAPES = ((1, 64, 128), (1, 40, 200), (3, 96, 256), (16, 48, 72), (MAX_ROWS, 32, 512), (7, 130, 96))
CONFIGS = (SkinnyConfig(16, 64, 4, 2), SkinnyConfig(32, 128, 4, 3))


def run_all(device: str, dtype: torch.dtype) -> list[str]:
    failures = []
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for rows, n_dim, k_dim in SHAPES:
        for config in CONFIGS:
            for with_bias, with_residual in ((False, False), (True, False), (False, True), (True, True)):
                torch.manual_seed(rows * 1000 + n_dim + k_dim)
                x = torch.randn(rows, k_dim + 8, device=device, dtype=dtype)[:, :k_dim]  # row stride != K
                w = torch.randn(n_dim, k_dim, device=device, dtype=dtype) / k_dim**0.5
                b = torch.randn(n_dim, device=device, dtype=dtype) if with_bias else None
                r = torch.randn(rows, n_dim + 4, device=device, dtype=dtype)[:, :n_dim] if with_residual else None
                out = skinny_matmul(x, w, b, config, r)
                ref = F.linear(x.double(), w.double(), None if b is None else b.double())
                if r is not None:
                    ref = ref + r.double()
                err = float((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
                name = f"{rows}x[{n_dim},{k_dim}] bias={with_bias} residual={with_residual} {config}"
                if out.shape != (rows, n_dim) or out.dtype != dtype or not err <= tol:
                    failures.append(f"{name}: rel err {err:.2e} > {tol}")
                if r is not None:  # rounded as the eager pair: the product to the dtype, then the sum
                    eager = r + skinny_matmul(x, w, b, config)
                    if not torch.equal(out, eager):
                        failures.append(f"{name}: differs from the rounded product + residual")
    return failures


if __name__ == "__main__":
    problems = run_all("cpu", torch.float32)
    print("\n".join(problems) or "skinny GEMM: all cases match")
    sys.exit(1 if problems else 0)
