"""Experiment (not used by the service): `act(x @ W.T + b)` in one Triton kernel, a vision MLP's first
linear with its activation fused, in two forms: a tiled kernel on pointer loads and a persistent one
on TMA descriptors (optionally warp-specialized).

Why it was tried: in the compiled ViT-L/14-336 at batch 64 the QuickGELU after `fc1` is a kernel of
its own that reads and writes the whole `[B * 577, 4096]` intermediate (600 MB per layer): 23 x 270 us
= 6.2 ms of a 51.3 ms call on an H200 (benchmarks/results/encoder_kernels_bs64_h200.txt). cuBLAS
epilogues offer erf/tanh GELU but not QuickGELU, so Inductor cannot fold it into the GEMM.

Why it is not used: on the H200 (benchmarks/results/encoder_kernels_h200.json, bs 64) the best fused
kernel takes 0.670 ms (TMA, persistent, 128x256x64, 462 TFLOP/s) against 0.623 ms for cuBLAS
(0.434 ms, 714 TFLOP/s) plus Inductor's activation kernel; the pointer-load kernel reaches 417 TFLOP/s.
Triton 3.6's Hopper GEMMs lose more on the product than the fusion saves.

Numerics match the compiled pair: fp32 accumulation, bias added, rounded to the model dtype (as
cuBLAS's output is), the activation in fp32 on that value, rounded once more. Checked by
bench_encoder_kernels.py (max abs diff 0 against the compiled pair at bs 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# HF activation names (config.hidden_act) this kernel implements, and the code the kernel switches on.
ACTIVATIONS = {"quick_gelu": 0, "gelu_pytorch_tanh": 1, "gelu": 2, "identity": 3}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    # x: fp32 tile holding the linear's output rounded to the model dtype
    if ACT == 0:  # QuickGELU (CLIP): x * sigmoid(1.702 x)
        return x * tl.sigmoid(1.702 * x)
    elif ACT == 1:  # tanh-approximated GELU (SigLIP): 0.5 x (1 + tanh(y)) == x * sigmoid(2 y)
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * y)
    elif ACT == 2:  # exact GELU
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        return x


@triton.jit
def _tile_position(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Tiles in groups of GROUP_M row blocks, so that neighbouring programs share x and w tiles in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _linear_activation_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # out[M, N] = act(x[M, K] @ w[N, K]^T + b[N]); one program per [BLOCK_M, BLOCK_N] output tile.
    pid_m, pid_n = _tile_position(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols load row 0 instead of being masked (their results are never stored):
    # unmasked loads keep the main loop on the fast path.
    safe_rows = tl.where(rows < M, rows, 0)
    safe_cols = tl.where(cols < N, cols, 0)
    x_ptrs = x_ptr + safe_rows[:, None] * stride_xm + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + safe_cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N] = w^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + safe_cols).to(tl.float32)[None, :]
    linear = acc.to(dtype).to(tl.float32)  # the linear's output as the model dtype holds it
    out = _activation(linear, ACT).to(dtype)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, out, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _linear_activation_tma_kernel(
    x_desc, w_desc, out_desc, b_ptr,
    M, N, K,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    # The same product through TMA descriptors (Hopper+), persistent: NUM_PROGRAMS programs walk the
    # output tiles. TMA zero-fills loads past M/N/K and clips stores, so there are no masks.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    dtype = out_desc.dtype
    for tile in tl.range(
        tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _tile_position(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])  # [BLOCK_M, BLOCK_K]
            w = w_desc.load([off_n, k0])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(x, w.T, acc)
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        linear = acc.to(dtype).to(tl.float32)
        out_desc.store([off_m, off_n], _activation(linear, ACT).to(dtype))


@dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"


# Launch configs bench_encoder_kernels.py times (large-M GEMMs on Hopper); the first is the default
# of a direct call.
CANDIDATES = (
    LinearConfig(128, 256, 64, 8, 8, 3),
    LinearConfig(128, 128, 64, 8, 4, 4),
    LinearConfig(256, 128, 64, 8, 8, 3),
    LinearConfig(128, 256, 64, 8, 8, 4),
    LinearConfig(128, 128, 64, 8, 8, 4),
)


def _check_operands(k_dim: int, weight: torch.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if weight.shape[1] != k_dim or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, {k_dim}] matrix, got {tuple(weight.shape)}")


def linear_activation(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """x: [..., K] (unit stride along K, rows evenly strided), weight: [N, K] contiguous, bias: [N] or
    None -> act(x @ weight.T + bias): [..., N] in x's dtype."""
    *lead, k_dim = x.shape
    x2 = x.reshape(-1, k_dim)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    _check_operands(k_dim, weight, activation)
    n_dim = weight.shape[0]
    config = config or CANDIDATES[0]
    rows = x2.shape[0]
    out = torch.empty(rows, n_dim, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, config.block_m) * triton.cdiv(n_dim, config.block_n),)
    _linear_activation_kernel[grid](
        x2, weight, bias if bias is not None else weight, out,
        rows, n_dim, k_dim,
        x2.stride(0), weight.stride(0), out.stride(0),
        ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, EVEN_K=k_dim % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out.view(*lead, n_dim)


def linear_activation_tma(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    config: LinearConfig | None = None,
    *,
    num_programs: int | None = None,
    warp_specialize: bool = False,
) -> torch.Tensor:
    """`linear_activation` through TMA descriptors, persistent (`num_programs` programs, default one
    per SM). x: [M, K] contiguous."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    config = config or CANDIDATES[0]
    rows, k_dim = x.shape
    _check_operands(k_dim, weight, activation)
    n_dim = weight.shape[0]
    out = torch.empty(rows, n_dim, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(n_dim, config.block_n)
    if num_programs is None:
        num_programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    num_programs = min(num_programs, tiles)
    _linear_activation_tma_kernel[(num_programs,)](
        TensorDescriptor.from_tensor(x, [config.block_m, config.block_k]),
        TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k]),
        TensorDescriptor.from_tensor(out, [config.block_m, config.block_n]),
        bias if bias is not None else weight,
        rows, n_dim, k_dim,
        ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        NUM_PROGRAMS=num_programs, WARP_SPECIALIZE=warp_specialize,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
