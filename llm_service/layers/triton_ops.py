"""Fused elementwise kernels for the decoder layers on CUDA (Triton).

Why: a 7B decode step at batch 1 moves ~13 GB of weights in ~4.5 ms, but the eager layer also runs
about 25 tiny kernels (RMSNorm alone is six: cast, square, mean, rsqrt, multiply, cast) that each
cost a few microseconds of GPU time even inside a CUDA graph: ~3 ms per step over 32 layers. These
kernels do the same work in one launch each:

* `add_rms_norm`: residual add + RMSNorm (one row per program);
* `rotary_and_cache`: rotary embedding of q (in place) and k, and the k/v write into their cache
  slots (one token per program);
* `silu_and_mul`: SiLU(gate) * up from the fused gate/up projection.

Rounding follows the eager PyTorch ops step by step (each bf16 op rounds its result, on the bit
pattern: `_round_to_model_dtype`), so the rotary matches the eager path bit for bit and the norm and
SiLU to one bf16 ulp at worst (the fp32 reduction order of the norm and the exp implementation may
differ). Under `TRITON_INTERPRET=1` they run on CPU tensors, which is how CI checks them.

An fp8 (float8_e4m3fn) KV cache: `rotary_and_cache` rounds k and v (already rounded to the model dtype,
as the eager path has them) to the nearest e4m3 value in fp32 arithmetic, saturated to +-448, before
the store (`_round_to_e4m3`); the cast itself is then exact. So the cache holds what
`attention.write_kv` (torch's cast) writes, bit for bit, on every backend: the GPU's converter, and the
interpreter, whose fp8 downcast neither carries a rounded-up mantissa into the exponent nor saturates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x32 = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x32 += tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        x32 = _round_to_model_dtype(x32, out_ptr.dtype.element_ty)  # the sum rounds, as `a + b` does
        tl.store(res_out_ptr + row * stride_res_out + cols, x32.to(res_out_ptr.dtype.element_ty), mask=ok)
    variance = tl.sum(x32 * x32, axis=0) / hidden
    normed = _round_to_model_dtype(x32 * tl.rsqrt(variance + eps), out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = _round_to_model_dtype(normed * w.to(tl.float32), out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (RMSNorm(x + residual) * weight, x + residual); without a residual,
    (RMSNorm(x) * weight, x)."""
    num_rows, hidden = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    res_in = residual if residual is not None else x
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(num_rows,)](
        x, res_in, weight, out, res_out,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )
    return out, res_out


@triton.jit
def _round_to_model_dtype(x, dtype):
    """fp32 -> the nearest value of the model dtype (ties to even), still as fp32: what the eager op's
    rounded result holds. Done on the bit pattern, which no compiler rewrite can skip: with
    `.to(bf16).to(fp32)` round trips here, an fp8 cache on an H100 (Triton 3.6) held the other e4m3
    neighbour of the eager path's for ~0.4% of rotated keys, as an unrounded intermediate would
    (the cause stays unidentified: a lone round trip in a small kernel is kept). bf16 shares fp32's
    exponent range, so only the mantissa rounds; fp16 also has a subnormal step of 2**-24 (adding and
    subtracting 0.75, whose fp32 ulp is 2**-24, rounds to it) and overflows past 65504."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0xFFF + ((bits >> 13) & 1)) & -0x2000).to(tl.float32, bitcast=True)
        x = tl.where(tl.abs(x) < 6.103515625e-05, (x + 0.75) - 0.75, normal)
        x = tl.where(tl.abs(x) > 65504.0, x * float("inf"), x)
    return x


@triton.jit
def _round_to_e4m3(x):
    """fp32 -> the float8_e4m3fn value nearest to it (ties to even), saturated to +-448, still as fp32
    (so casting the result to fp8 is exact). Normal range (|x| >= 2**-6): round the fp32 mantissa to 3
    bits on the bit pattern (a carry moves into the exponent); below it the e4m3 step is a fixed 2**-9,
    and adding and subtracting 1.5 * 2**14 (whose fp32 ulp is 2**-9) rounds to that grid."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # ties to even on mantissa bit 20
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _to_cache(x, dtype, FP8: tl.constexpr):
    """x (fp32, holding a value of the model dtype) as the cache element type `dtype`."""
    if FP8:
        x = _round_to_e4m3(x)
    return x.to(dtype)


@triton.jit
def _rotary_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, HEADS_P2: tl.constexpr, KV_HEADS_P2: tl.constexpr, FP8: tl.constexpr,
):
    tok = tl.program_id(0)
    d = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + tok * stride_cos + d).to(tl.float32)
    c2 = tl.load(cos_ptr + tok * stride_cos + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + tok * stride_sin + d).to(tl.float32)
    s2 = tl.load(sin_ptr + tok * stride_sin + HALF + d).to(tl.float32)
    dtype = q_ptr.dtype.element_ty

    # x * cos + rotate_half(x) * sin, rounding each product and the sum as the eager ops do
    h = tl.arange(0, HEADS_P2)[:, None]
    h_ok = h < num_heads
    q_row = q_ptr + tok * stride_qt + h * stride_qh
    q1 = tl.load(q_row + d[None, :], mask=h_ok, other=0.0).to(tl.float32)  # [Hq, D/2]
    q2 = tl.load(q_row + HALF + d[None, :], mask=h_ok, other=0.0).to(tl.float32)
    out1 = _round_to_model_dtype(q1 * c1[None, :], dtype) + _round_to_model_dtype(-q2 * s1[None, :], dtype)
    out2 = _round_to_model_dtype(q2 * c2[None, :], dtype) + _round_to_model_dtype(q1 * s2[None, :], dtype)
    # stores cast values already rounded: the interpreter's fp32 -> bf16 cast does not round to nearest
    tl.store(q_row + d[None, :], _round_to_model_dtype(out1, dtype).to(dtype), mask=h_ok)
    tl.store(q_row + HALF + d[None, :], _round_to_model_dtype(out2, dtype).to(dtype), mask=h_ok)

    g = tl.arange(0, KV_HEADS_P2)[:, None]
    g_ok = g < num_kv_heads
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    k_row = k_ptr + tok * stride_kt + g * stride_kh
    k1 = tl.load(k_row + d[None, :], mask=g_ok, other=0.0).to(tl.float32)  # [Hkv, D/2]
    k2 = tl.load(k_row + HALF + d[None, :], mask=g_ok, other=0.0).to(tl.float32)
    kout1 = _round_to_model_dtype(k1 * c1[None, :], dtype) + _round_to_model_dtype(-k2 * s1[None, :], dtype)
    kout2 = _round_to_model_dtype(k2 * c2[None, :], dtype) + _round_to_model_dtype(k1 * s2[None, :], dtype)
    kc_row = k_cache_ptr + slot * stride_kc_slot + g * stride_kc_h
    cache_dtype = k_cache_ptr.dtype.element_ty
    # k rounds to the model dtype first (the eager path's rotary output), then to the cache dtype
    kout1, kout2 = _round_to_model_dtype(kout1, dtype), _round_to_model_dtype(kout2, dtype)
    tl.store(kc_row + d[None, :], _to_cache(kout1, cache_dtype, FP8), mask=g_ok)
    tl.store(kc_row + HALF + d[None, :], _to_cache(kout2, cache_dtype, FP8), mask=g_ok)
    v_row = v_ptr + tok * stride_vt + g * stride_vh
    vc_row = v_cache_ptr + slot * stride_vc_slot + g * stride_vc_h
    v1 = tl.load(v_row + d[None, :], mask=g_ok).to(tl.float32)
    v2 = tl.load(v_row + HALF + d[None, :], mask=g_ok).to(tl.float32)
    tl.store(vc_row + d[None, :], _to_cache(v1, cache_dtype, FP8), mask=g_ok)
    tl.store(vc_row + HALF + d[None, :], _to_cache(v2, cache_dtype, FP8), mask=g_ok)


def rotary_and_cache(
    q: torch.Tensor,  # [T, Hq, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,  # [T, D]
    k_cache: torch.Tensor,  # [num_blocks, page, Hkv, D], the model dtype or float8_e4m3fn
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [T] block_id * page + offset
) -> torch.Tensor:
    """Rotary embedding of q (in place; returned) and k, with k and v written to their cache slots
    (an fp8 cache gets the saturating round-to-nearest-even cast of `_round_to_e4m3`)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    assert k_cache.dtype in (q.dtype, torch.float8_e4m3fn), (k_cache.dtype, q.dtype)
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim, "head_dim must be a power of 2"
    assert q.stride(2) == k.stride(2) == v.stride(2) == cos.stride(1) == sin.stride(1) == 1
    for cache in (k_cache, v_cache):  # slot arithmetic needs contiguous blocks
        assert cache.stride(3) == 1 and cache.stride(0) == cache.shape[1] * cache.stride(1)
    _rotary_and_cache_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        num_heads, num_kv_heads,
        HALF=head_dim // 2, HEADS_P2=triton.next_power_of_2(num_heads),
        KV_HEADS_P2=triton.next_power_of_2(num_kv_heads), FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
    )
    return q


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = _round_to_model_dtype(gate / (1.0 + tl.exp(-gate)), dtype)  # SiLU rounds, then the product does
    tl.store(out_ptr + row * stride_out + cols, _round_to_model_dtype(act * up, dtype).to(dtype), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate columns first) -> SiLU(gate) * up: [T, I]."""
    num_rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(1) == 1
    out = torch.empty(num_rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(num_rows, triton.cdiv(width, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block, num_warps=4
    )
    return out
