"""Skinny GEMM for decode-sized batches: `x @ W.T (+ b)` with at most 16 rows of `x` (Triton).

Why: at batch 1 a 7B decode step is the weight read, and cuBLAS's kernels for M = 1 read it at
~2.6 TB/s on an H100 (profile_b1_graph_kernels.txt: the gate/up GEMV 70.5 us for 180 MB), and for
q/k/v and o it splits K and adds a reduce kernel per GEMM. This kernel streams each weight row block
once, whole K per program (no split, no reduce), with the x rows held in registers:

* one row (`M == 1`): a GEMV, products accumulated elementwise in a `[BLOCK_N, BLOCK_K]` fp32 tile
  and reduced once at the end;
* 2..16 rows: `tl.dot` on a 16-row tile (rows past M are masked), so the weight is still read once.

Accumulation is fp32 and the result rounds once to the model dtype, as cuBLAS does; only the order of
the fp32 sum differs (so results match cuBLAS to rounding, not bit for bit).

Whether a shape uses it is decided by measurement (`SkinnyGemmPolicy.calibrate`, at engine start on
CUDA): for every weight shape of the model and both row classes (1, and 2..16), cuBLAS and this kernel
are timed and the faster one is kept. So a GPU, shape or dtype where cuBLAS wins keeps cuBLAS.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

MAX_ROWS = 16  # the dot path's tile height; more rows go to cuBLAS


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[M, N] = x[M, K] @ w[N, K]^T (+ b[N]); program i owns columns [i * BLOCK_N, (i + 1) * BLOCK_N)
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns = weight rows
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None] * stride_wn  # [BLOCK_N, 1]
    if ONE_ROW:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)  # [BLOCK_N]
        if HAS_BIAS:
            out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        rows = tl.arange(0, 16)
        row_ok = rows < M
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)  # [16, BLOCK_K] @ [BLOCK_K, BLOCK_N]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Defaults from benchmarks/tune_skinny_gemm.py on an H100 (LLaVA-1.5-7B / Llama-7B shapes); any
# other shape takes the row class's default. Calibration still decides whether a shape uses them.
DEFAULT_CONFIGS = {
    1: SkinnyConfig(block_n=8, block_k=512, num_warps=4, num_stages=4),
    16: SkinnyConfig(block_n=32, block_k=256, num_warps=4, num_stages=4),
}


def row_class(num_rows: int) -> int:
    """1 for one row, 16 for 2..16 rows (the kernel's two paths)."""
    return 1 if num_rows == 1 else MAX_ROWS


def skinny_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyConfig | None = None
) -> torch.Tensor:
    """x: [M, K] (M <= 16, unit stride along K), weight: [N, K] contiguous, bias: [N] or None ->
    [M, N] in x's dtype."""
    num_rows, k_dim = x.shape
    n_dim = weight.shape[0]
    assert 1 <= num_rows <= MAX_ROWS and weight.shape[1] == k_dim
    assert x.stride(1) == 1 and weight.is_contiguous() and (bias is None or bias.is_contiguous())
    config = config or DEFAULT_CONFIGS[row_class(num_rows)]
    out = torch.empty(num_rows, n_dim, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n_dim, config.block_n),)](
        x, weight, bias if bias is not None else weight, out,
        num_rows, n_dim, k_dim,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ONE_ROW=num_rows == 1,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


@dataclass
class SkinnyGemmPolicy:
    """Which (row class, N, K, dtype) GEMMs run on `skinny_matmul`; everything else is cuBLAS.

    Empty (nothing skinny) until `calibrate` measures; `report` holds what it measured (us)."""

    chosen: set[tuple[int, int, int, torch.dtype]] = field(default_factory=set)
    report: list[dict] = field(default_factory=list)

    def use(self, num_rows: int, n_dim: int, k_dim: int, dtype: torch.dtype) -> bool:
        return num_rows <= MAX_ROWS and (row_class(num_rows), n_dim, k_dim, dtype) in self.chosen

    def calibrate(self, weights: list[torch.Tensor], *, iters: int = 30) -> None:
        """Time cuBLAS and the skinny kernel for each distinct weight shape `[N, K]` (CUDA tensors) at
        1 and 16 rows; keep the kernel where it is faster by more than 2%."""
        seen = set()
        for weight in weights:
            key = (tuple(weight.shape), weight.dtype)
            if (
                key in seen
                or weight.dim() != 2
                or not weight.is_cuda
                or not weight.is_contiguous()
                or weight.dtype not in (torch.bfloat16, torch.float16)  # fp32 would go through tf32 dots
            ):
                continue
            seen.add(key)
            n_dim, k_dim = weight.shape
            for rows in (1, MAX_ROWS):
                x = torch.randn(rows, k_dim, device=weight.device, dtype=weight.dtype)
                cublas_us = _time_us(functools.partial(torch.nn.functional.linear, x, weight), iters)
                skinny_us = _time_us(functools.partial(skinny_matmul, x, weight), iters)
                use = skinny_us < 0.98 * cublas_us
                if use:
                    self.chosen.add((rows, n_dim, k_dim, weight.dtype))
                self.report.append(
                    {"rows": rows, "n": n_dim, "k": k_dim, "cublas_us": cublas_us, "skinny_us": skinny_us, "skinny": use}
                )
        for r in self.report:
            logger.info(
                "skinny GEMM %s for %2d x [%d, %d]: cuBLAS %.1f us, Triton %.1f us",
                "on " if r["skinny"] else "off", r["rows"], r["n"], r["k"], r["cublas_us"], r["skinny_us"],
            )


def _time_us(fn, iters: int) -> float:
    """Median time of one call (us), each timed with CUDA events after a warm-up (first compile), with
    the L2 cache flushed before each: in a decode step every weight is read once, from HBM."""
    for _ in range(3):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # > the 50 MB L2 of an H100
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]
