"""Skinny GEMM for decode-sized batches: `x @ W.T (+ b)` with at most 16 rows of `x` (Triton).

Why: at batch 1 a 7B decode step is the weight read, and cuBLAS's kernels for M = 1 read it at
~2.5 TB/s on an H100 (benchmarks/results/profile_b1_graph_kernels_cublas.txt: the gate/up GEMV
70.5 us for 180 MB), and for q/k/v and o it splits K and adds a reduce kernel per GEMM. This kernel
streams each weight row block once, whole K per program (no split, no reduce), with the x rows held
in registers (gate/up at 3.0 TB/s in skinny_gemm_tuning.json; batch-1 decode 5.99 -> 5.30 ms/token,
decode_bs1.json):

* one row (`M == 1`): a GEMV, products accumulated elementwise in a `[BLOCK_N, BLOCK_K]` fp32 tile
  and reduced once at the end;
* 2..16 rows: `tl.dot` on a 16-row tile (rows past M are masked), so the weight is still read once.

Accumulation is fp32 and the result rounds once to the model dtype, as cuBLAS does; only the order of
the fp32 sum differs (so results match cuBLAS to rounding, not bit for bit).

An optional `residual` [M, N] is added in the epilogue (the MLP's `x + down_proj(h)`: one kernel
less per layer), rounded as the eager pair of ops rounds: the product to the model dtype, then the sum.

Whether a shape uses it, and with which launch config, is decided by measurement
(`SkinnyGemmPolicy.calibrate`, at engine start on CUDA): for every weight shape of the model and both
row classes (1, and 2..16), one pass over all the model's weights of that shape (as a decode step
reads them: from HBM, one after another) is timed with cuBLAS and with each candidate config, and the
fastest is kept. So a GPU, shape or dtype where cuBLAS wins keeps cuBLAS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from llm_service.layers.triton_ops import _round_to_model_dtype

logger = logging.getLogger(__name__)

MAX_ROWS = 16  # the dot path's tile height; more rows go to cuBLAS


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_rm, stride_om,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ONE_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[M, N] = x[M, K] @ w[N, K]^T (+ b[N]) (+ r[M, N]); program i owns columns [i * BLOCK_N, (i + 1) * BLOCK_N)
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns = weight rows
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None] * stride_wn  # [BLOCK_N, 1]
    dtype = out_ptr.dtype.element_ty
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
        if HAS_RESIDUAL:
            out = _round_to_model_dtype(out, dtype) + tl.load(r_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, _round_to_model_dtype(out, dtype).to(dtype), mask=col_ok)
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
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_RESIDUAL:
            res = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
            acc = _round_to_model_dtype(acc, dtype) + res.to(tl.float32)
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, _round_to_model_dtype(acc, dtype).to(dtype), mask=mask)


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Candidate launch configs per row class, from benchmarks/tune_skinny_gemm.py on an H100 (Llama-7B
# projection shapes): calibration times each on the model's own shapes. The first is the default of a
# direct `skinny_matmul` call.
CANDIDATES = {
    1: (SkinnyConfig(2, 1024, 4, 2), SkinnyConfig(2, 2048, 8, 3), SkinnyConfig(8, 2048, 4, 2)),
    16: (SkinnyConfig(64, 256, 4, 5), SkinnyConfig(32, 256, 4, 5), SkinnyConfig(32, 128, 4, 4)),
}


def row_class(num_rows: int) -> int:
    """1 for one row, 16 for 2..16 rows (the kernel's two paths)."""
    return 1 if num_rows == 1 else MAX_ROWS


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [M, K] (M <= 16, unit stride along K), weight: [N, K] contiguous, bias: [N] or None,
    residual: [M, N] (unit stride along N) or None -> x @ weight.T (+ bias) (+ residual): [M, N] in
    x's dtype."""
    num_rows, k_dim = x.shape
    n_dim = weight.shape[0]
    assert 1 <= num_rows <= MAX_ROWS and weight.shape[1] == k_dim
    assert x.stride(1) == 1 and weight.is_contiguous() and (bias is None or bias.is_contiguous())
    assert residual is None or (residual.shape == (num_rows, n_dim) and residual.stride(1) == 1)
    config = config or CANDIDATES[row_class(num_rows)][0]
    out = torch.empty(num_rows, n_dim, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n_dim, config.block_n),)](
        x, weight, bias if bias is not None else weight, residual if residual is not None else out, out,
        num_rows, n_dim, k_dim,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ONE_ROW=num_rows == 1,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


@dataclass
class SkinnyGemmPolicy:
    """Which (row class, N, K, dtype) GEMMs run on `skinny_matmul`, and with which config; everything
    else is cuBLAS. Empty (nothing skinny) until `calibrate` measures; `report` holds what it measured."""

    chosen: dict[tuple[int, int, int, torch.dtype], SkinnyConfig] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)

    def config_for(self, num_rows: int, n_dim: int, k_dim: int, dtype: torch.dtype) -> SkinnyConfig | None:
        """The config to run `num_rows` x [n_dim, k_dim] with, or None for cuBLAS."""
        if num_rows > MAX_ROWS:
            return None
        return self.chosen.get((row_class(num_rows), n_dim, k_dim, dtype))

    def calibrate(self, weights: list[torch.Tensor], *, passes: int = 5) -> None:
        """For each weight shape `[N, K]` (CUDA bf16/fp16 tensors) and 1 and 16 rows: time one pass over
        all `weights` of that shape with cuBLAS and with each candidate config; keep the fastest
        config where it beats cuBLAS by more than 2%."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for weight in weights:
            if (
                weight.dim() == 2
                and weight.is_cuda
                and weight.is_contiguous()
                and weight.dtype in (torch.bfloat16, torch.float16)  # fp32 would go through tf32 dots
            ):
                group = groups.setdefault((tuple(weight.shape), weight.dtype), [])
                if all(w.data_ptr() != weight.data_ptr() for w in group):  # tied weights count once
                    group.append(weight)
        for ((n_dim, k_dim), dtype), group in groups.items():
            for rows in (1, MAX_ROWS):
                x = torch.randn(rows, k_dim, device=group[0].device, dtype=dtype)
                cublas_us = pass_time_us(lambda w, x=x: torch.nn.functional.linear(x, w), group, passes)
                timed = [
                    (pass_time_us(lambda w, x=x, c=c: skinny_matmul(x, w, None, c), group, passes), c)
                    for c in CANDIDATES[rows]
                ]
                skinny_us, config = min(timed, key=lambda t: t[0])
                use = skinny_us < 0.98 * cublas_us
                if use:
                    self.chosen[(rows, n_dim, k_dim, dtype)] = config
                self.report.append(
                    {"rows": rows, "n": n_dim, "k": k_dim, "weights": len(group), "cublas_us": cublas_us,
                     "skinny_us": skinny_us, "config": config.__dict__, "skinny": use}
                )  # fmt: skip
                logger.info(
                    "skinny GEMM %s for %2d x [%d, %d] (%d weights): cuBLAS %.1f us, Triton %.1f us (%s)",
                    "on " if use else "off", rows, n_dim, k_dim, len(group), cublas_us, skinny_us, config,
                )


def pass_time_us(fn, weights: list[torch.Tensor], passes: int) -> float:
    """GPU time of one `fn(w)` (us, mean) in a CUDA graph of one pass through `weights`, replayed
    `passes` times after a warm-up pass (first compile). The graph is how decode runs them, and it
    keeps the timing off the host: a Triton launch from Python costs more host time (~30-50 us) than
    a small GEMM takes on the GPU. Only a group larger than L2 (50 MB on an H100; any 7B layer group)
    measures HBM reads, as a decode step sees them."""
    for w in weights:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(passes):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (passes * len(weights))
