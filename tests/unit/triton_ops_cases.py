"""Cases for the fused Triton elementwise kernels (llm_service/layers/triton_ops.py) against the eager
PyTorch ops they replace; shared by the CPU interpreter test (tests/unit/test_triton_ops.py, in a
subprocess with TRITON_INTERPRET=1) and the GPU test (tests/gpu/test_triton_decode_gpu.py). The rotary
+ KV write also runs into a float8_e4m3fn cache (an fp8 KV cache), against `write_kv`'s torch cast.

Run directly: `TRITON_INTERPRET=1 python -m tests.unit.triton_ops_cases` (exits non-zero on a mismatch).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llm_service.layers.attention import triton_fp8_supported, write_kv
from llm_service.layers.norm import RMSNorm
from llm_service.layers.rotary import apply_rotary
from llm_service.layers.triton_ops import _round_to_model_dtype, add_rms_norm, rotary_and_cache, silu_and_mul


def _max_ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference in units of the reference's dtype resolution at its magnitude."""
    eps = torch.finfo(ref.dtype).eps
    scale = ref.float().abs().clamp(min=1.0)  # inputs are O(1): cancellation near 0 is not an error
    return float(((out.float() - ref.float()).abs() / (scale * eps)).max())


def _check_norm(device, dtype, max_ulps: float) -> list[str]:
    failures = []
    for rows, hidden, with_residual in ((1, 64, False), (5, 96, True), (3, 4096, True)):
        torch.manual_seed(rows)
        norm = RMSNorm(hidden, 1e-5).to(device, dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(hidden) + 0.5)
        x = torch.randn(rows * 2, hidden, device=device, dtype=dtype)[::2]  # strided rows
        residual = torch.randn(rows, hidden, device=device, dtype=dtype) if with_residual else None
        out, res = add_rms_norm(x, residual, norm.weight, 1e-5)
        ref_res = x + residual if with_residual else x
        ref = norm(ref_res)
        if not torch.equal(res, ref_res):
            failures.append(f"add_rms_norm {rows}x{hidden}: residual sum differs")
        if (err := _max_ulps(out, ref)) > max_ulps:
            failures.append(f"add_rms_norm {rows}x{hidden}: {err:.1f} ulps")
    return failures


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(out_ptr + i, _round_to_model_dtype(x, DTYPE), mask=i < n)


def _check_model_dtype_rounding(device) -> list[str]:
    """`_round_to_model_dtype` (fp32 -> a bf16 / fp16 value, kept in fp32) equals torch's cast, value
    for value: exact ties of both formats (ties to even), just either side of them, fp16's subnormal
    range and overflow past 65504, and random magnitudes 1e-9 .. 1e6."""
    failures = []
    torch.manual_seed(0)
    rand = torch.randn(4000) * 10.0 ** (torch.rand(4000) * 15 - 9)
    base = torch.randn(2000).float()
    ties = torch.cat([  # value + half an ulp of the format, exactly, and one fp32 ulp either side
        (base.view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32),
        (base.view(torch.int32) & ~0x1FFF | 0x1000).view(torch.float32),
    ])
    near = torch.cat([ties, ties.nextafter(ties * 2), ties.nextafter(ties * 0)])
    edges = torch.tensor([65504.0, 65519.0, 65520.0, 7e4, 3e38, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 6.1e-5, 0.0])
    x = torch.cat([rand, near, edges, -edges]).to(device)
    for dtype, tl_dtype in ((torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)):
        out = torch.empty_like(x)
        _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), DTYPE=tl_dtype, BLOCK=1024)
        ref = x.to(dtype).float()
        bad = (out != ref).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            failures.append(f"round to {dtype}: {len(bad)} of {x.numel()} values differ from torch's cast, "
                            f"e.g. {x[i].item()!r} -> {out[i].item()!r} vs {ref[i].item()!r}")
    return failures


def _check_rotary(device, dtype, max_ulps: float) -> list[str]:
    failures = []
    for tokens, heads, kv_heads, head_dim in ((1, 4, 4, 8), (6, 8, 2, 16), (3, 32, 32, 128)):
        torch.manual_seed(tokens)
        width = (heads + 2 * kv_heads) * head_dim
        qkv = torch.randn(tokens, width, device=device, dtype=dtype)  # the fused projection's output
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
        angles = torch.rand(tokens, head_dim // 2, device=device) * 6
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        num_blocks, page = 5, 4
        caches = [torch.zeros(num_blocks, page, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(4)]
        slots = torch.randperm(num_blocks * page, device=device)[:tokens]
        ref_q, ref_k = apply_rotary(q, k, cos, sin)
        write_kv(ref_k, v, caches[0], caches[1], slots)
        out_q = rotary_and_cache(q.clone(), k, v, cos, sin, caches[2], caches[3], slots)
        name = f"rotary T{tokens} H{heads}/{kv_heads} D{head_dim}"
        # bf16 / fp16: each product and the sum round as the eager ops do: bit for bit. fp32: the
        # compiler may fuse a product into the add (one rounding fewer).
        allowed = max_ulps if dtype == torch.float32 else 0.0
        if (err := _max_ulps(out_q, ref_q)) > allowed:
            failures.append(f"{name}: q {err:.1f} ulps")
        if (err := _max_ulps(caches[2], caches[0])) > allowed:
            failures.append(f"{name}: k cache {err:.1f} ulps")
        if not torch.equal(caches[3], caches[1]):
            failures.append(f"{name}: v cache differs")
    return failures


def _e4m3_sweep() -> torch.Tensor:
    """fp32 values around every float8_e4m3fn value: the values themselves, the midpoints between
    neighbours (ties to even), just either side of each midpoint (round-ups that carry into the
    exponent among them), values past +-448, and random magnitudes 1e-5 .. 1e3."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted, -448 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    eps = mid.abs().clamp(min=2**-12) * 2**-12
    extra = torch.tensor([448.5, 463.9, 464.0, 465.0, 1e4, 3e38, 2**-10, 2**-11, 1e-30])
    rand = torch.randn(2000) * 10.0 ** (torch.rand(2000) * 8 - 5)
    return torch.cat([grid, mid, mid - eps, mid + eps, extra, -extra, rand])


def _check_rotary_fp8(device, dtype) -> list[str]:
    """An fp8 (float8_e4m3fn) cache: the kernel stores what `write_kv` (torch's saturating cast) stores
    for the same rotated k, value for value. Never a NaN or a value past 448.

    The reference k is the kernel's own rotary output (the same kernel into a model-dtype cache), so
    this checks the fp8 rounding alone (`_check_rotary` compares the rotary with the eager one; in
    fp32 they may differ by an ulp, and where k * cos and rotate(k) * sin nearly cancel an ulp is
    several e4m3 steps of the small result). The rotated k must be rounded to the model dtype before
    the e4m3 rounding, as the eager path has it: with `.to(bf16).to(fp32)` round trips in the kernel,
    ~0.4% of keys landed on the other e4m3 neighbour on an H100 (see `_round_to_model_dtype`). With an identity
    rotation (cos 1, sin 0) k and v are the inputs as they are, over `_e4m3_sweep`."""
    failures = []
    fp8 = torch.float8_e4m3fn
    sweep = _e4m3_sweep()
    for identity, (heads, kv_heads, head_dim) in ((True, (4, 2, 16)), (False, (4, 2, 16)), (False, (32, 8, 128))):
        torch.manual_seed(head_dim)
        per_token = kv_heads * head_dim
        tokens = -(-len(sweep) // per_token) if identity else 3
        k = (sweep if identity else torch.randn(tokens * per_token) * 10.0 ** (torch.rand(tokens * per_token) * 8 - 5))
        k = torch.cat([k, k.new_zeros(tokens * per_token - len(k))]).view(tokens, kv_heads, head_dim)
        v = k.flip(0) if identity else k * 3
        qkv = torch.cat([torch.randn(tokens, heads, head_dim), k, v], dim=1).to(device, dtype)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        angles = torch.zeros(tokens, head_dim // 2) if identity else torch.rand(tokens, head_dim // 2) * 6
        emb = torch.cat((angles, angles), dim=-1).to(device)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        num_blocks, page = -(-tokens // 4) + 1, 4
        caches = [torch.zeros(num_blocks, page, kv_heads, head_dim, device=device, dtype=fp8) for _ in range(4)]
        slots = torch.randperm(num_blocks * page, device=device)[:tokens]
        model_caches = [torch.zeros_like(caches[0], dtype=dtype) for _ in range(2)]
        rotary_and_cache(q.clone(), k, v, cos, sin, *model_caches, slots)
        rotated_k = model_caches[0].view(-1, kv_heads, head_dim)[slots]  # [T, Hkv, D], the model dtype
        write_kv(rotated_k, v, caches[0], caches[1], slots)
        rotary_and_cache(q.clone(), k, v, cos, sin, caches[2], caches[3], slots)
        name = f"rotary fp8 cache T{tokens} H{heads}/{kv_heads} D{head_dim}{' identity' if identity else ''}"
        for label, out, ref in (("k", caches[2], caches[0]), ("v", caches[3], caches[1])):
            out, ref = out.float(), ref.float()  # compared as values (-0.0 == 0.0)
            if not bool(torch.isfinite(out).all()) or float(out.abs().max()) > 448:
                failures.append(f"{name}: {label} cache holds NaN or values past 448")
                continue
            bad = (out != ref).nonzero()
            if len(bad):
                at = tuple(bad[0].tolist())
                failures.append(f"{name}: {label} cache differs from write_kv at {len(bad)} places, e.g. {at}: "
                                f"{out[at].item()} vs {ref[at].item()}")
        if identity and float(caches[3].float().abs().max()) != 448.0:
            failures.append(f"{name}: the out-of-range values did not saturate to 448")
    return failures


def _check_silu(device, dtype, max_ulps: float) -> list[str]:
    failures = []
    for rows, width in ((1, 8), (4, 1500), (2, 11008)):
        torch.manual_seed(width)
        gate_up = torch.randn(rows, 2 * width, device=device, dtype=dtype) * 4
        gate, up = gate_up.split(width, dim=-1)
        if (err := _max_ulps(silu_and_mul(gate_up), F.silu(gate) * up)) > max_ulps:
            failures.append(f"silu_and_mul {rows}x{width}: {err:.1f} ulps")
    return failures


def run_all(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    # fp32: only the reduction order and exp may differ (a few ulps); bf16: one rounding step at most
    # (the rotary must match bf16 exactly: see _check_rotary)
    max_ulps = 64.0 if dtype == torch.float32 else 1.0
    dev = torch.device(device)
    with torch.no_grad():
        return (
            _check_model_dtype_rounding(dev)
            + _check_norm(dev, dtype, max_ulps)
            + _check_rotary(dev, dtype, max_ulps)
            + (_check_rotary_fp8(dev, dtype) if triton_fp8_supported(dev) else [])  # CUDA: capability >= 8.9
            + _check_silu(dev, dtype, max_ulps)
        )


if __name__ == "__main__":
    problems = run_all()
    print("\n".join(problems) or "all fused-op cases match the eager ops")
    sys.exit(1 if problems else 0)
