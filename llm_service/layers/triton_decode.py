"""Paged decode attention as a Triton kernel: each query reads its sequence's K/V blocks in place.

Why: the `batched` path gathers every attended K/V into a padded copy per layer (written once, read
twice), which at batch 256 costs about three times the HBM traffic of the attention itself. Here a
program loads keys straight from the paged cache through the block table, so each cached byte is
read once per layer.

Layout: one program per (sequence, KV head, split); its rows are the query heads of that KV head's GQA
group, repeated to the 16 rows of the smallest `tl.dot` tile, so scores and weighted values run on
tensor cores (for an MHA model one head is computed 16 times over: spare MMA work in a kernel bound by
reading the cache). An earlier kernel that multiplied K/V tiles elementwise on the CUDA cores and summed
across threads was 8-22% slower at every layout measured on an H100 (results/decode_kernel_tuning.json,
throughput_ab_decode_kernel_h100.json: 10,243 vs 9,498 tok/s at 128/128 c256) and is gone (git
history: 1b68858). Splits cut a sequence's context into
`num_splits` equal ranges (rounded up to `block_n` keys), so short batches still fill the GPU;
`num_splits` depends only on the batch shape (a static grid, so a CUDA graph can capture it) while
each program derives its range from the sequence's real length on the device. Every split keeps an
online-softmax partial (running max, sum of exponentials, unnormalised output) in fp32; a second
kernel merges the partials. With a single split the first kernel writes the normalised output.

Cache dtype: the query's, or float8_e4m3fn (an fp8 KV cache, see attention.py): K/V tiles are loaded in
the cache dtype (an fp8 cache halves the bytes this kernel reads, which dominate a large decode batch)
and upcast exactly to the query dtype before the `tl.dot`s (exact products, fp32 accumulation; the
softmax weights are rounded to the query dtype for the second product, as flash attention does). The
softmax and the output accumulate in fp32. Triton stores and loads fp8 on compute capability >= 8.9 only (`check_kv_cache_dtype`).

Decode rows only (one query per sequence, the query sits at the last context position so no causal
mask is needed). Prefill chunks keep the SDPA path. Importing this module needs `triton`; under
`TRITON_INTERPRET=1` the kernels run on CPU tensors (slowly), which is how CI checks them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_SPLITS = 16


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch shape of the decode kernel: `block_n` keys per loop iteration (a power of two >= 16, a
    `tl.dot` operand); `num_stages` > 1 software-pipelines the loop's loads."""

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16 (a tl.dot operand), got {self.block_n}")


DEFAULT_CONFIG = DecodeKernelConfig()


def config_for(num_seqs: int, num_kv_heads: int) -> DecodeKernelConfig:
    """The launch shape measured best on an H100 (benchmarks/tune_decode_kernel.py, LLaVA-1.5-7B's
    32 heads x 128, bf16): 128-key tiles on 4 warps, within 1% of the fastest of 18 shapes at batch
    256, 64 and 1 (results/decode_kernel_tuning.json); the pipelined loop only once there are enough
    programs to hide its latency."""
    programs = num_seqs * num_kv_heads
    return DecodeKernelConfig(block_n=128, num_warps=4, num_stages=2 if programs >= 1024 else 1)


# Table width and split count vary between eager steps: one compiled kernel for all of them (see
# triton_prefill.py).
@triton.jit(do_not_specialize=["stride_ts", "num_heads", "num_splits"])
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
    scale,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ts,
    stride_os, stride_oh,
    num_heads, num_splits,
    GQA_GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One split's partial for one (sequence, KV head): `ROWS` (>= 16) rows, row r being query head
    `kv_head * GQA_GROUP + r % GQA_GROUP`, so no row is padding; the first GQA_GROUP rows are stored."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, ROWS)
    heads = kv_head * GQA_GROUP + r % GQA_GROUP  # [R] query heads, repeated to fill the tile
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK) * BLOCK
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    d = tl.arange(0, HEAD_DIM_P2)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=d_ok[None, :], other=0.0)  # [R, D]

    m_i = tl.zeros([ROWS], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_P2], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK, num_stages=NUM_STAGES):
        pos = n0 + tl.arange(0, BLOCK)  # [N] context positions
        valid = pos < end
        block = tl.load(tables_ptr + seq * stride_ts + pos // PAGE, mask=valid, other=0).to(tl.int64)
        offset = (pos % PAGE).to(tl.int64)
        kv_mask = valid[:, None] & d_ok[None, :]
        k_at = block * stride_kb + offset * stride_kt + kv_head * stride_kh  # [N]
        k = tl.load(k_ptr + k_at[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]; fp8 exact
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [R, N] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [R]
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [R, N]
        v_at = block * stride_vb + offset * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + v_at[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)  # [R, D]
        m_i = m_new

    first = r < GQA_GROUP  # the other rows repeat these
    if DIRECT:
        out = acc / l_i[:, None]
        out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=first[:, None] & d_ok[None, :])
    else:
        part = (seq * num_heads + heads) * num_splits + split  # [R]
        tl.store(acc_ptr + part[:, None] * HEAD_DIM_P2 + d[None, :], acc, mask=first[:, None])
        tl.store(max_ptr + part, m_i, mask=first)
        tl.store(sum_ptr + part, l_i, mask=first)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    out_ptr, acc_ptr, max_ptr, sum_ptr,
    stride_os, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < num_splits
    m = tl.load(max_ptr + first + s, mask=s_ok, other=float("-inf"))  # [S]; empty splits hold -inf
    m_all = tl.max(m, axis=0)  # finite: split 0 always holds the first key
    w = tl.where(s_ok, tl.exp(m - m_all), 0.0)  # [S]
    total = tl.sum(w * tl.load(sum_ptr + first + s, mask=s_ok, other=0.0), axis=0)
    d = tl.arange(0, HEAD_DIM_P2)
    acc = tl.load(acc_ptr + (first + s)[:, None] * HEAD_DIM_P2 + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / total  # [D]
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 132  # interpreter runs (CPU): the split count only changes the work partition
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def num_splits_for(
    num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device, config: DecodeKernelConfig = DEFAULT_CONFIG
) -> int:
    """Splits per sequence: enough programs (one per sequence, KV head and split) to give every SM
    about two, never a split under `block_n` keys of the widest context, at most `MAX_SPLITS`. Depends
    on shapes only (graph-capturable)."""
    programs = num_seqs * num_kv_heads
    want = -(-2 * _num_sms(device.index) // programs)
    return max(1, min(want, MAX_SPLITS, -(-max_context // config.block_n)))


def paged_decode_attention(
    query: torch.Tensor,  # [B, Hq, D], one query per sequence at its last context position
    k_cache: torch.Tensor,  # [num_blocks, page, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, page, Hkv, D]
    block_tables: torch.Tensor,  # [B, nb] int; nb * page >= every context length
    seq_lens: torch.Tensor,  # [B] int: context length including this step's token (>= 1)
    scale: float,
    config: DecodeKernelConfig | None = None,
) -> torch.Tensor:
    """Attention of each sequence's single new query over its whole cached context. Returns [B, Hq, D]."""
    num_seqs, num_heads, head_dim = query.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert query.stride(2) == 1 and block_tables.stride(1) == 1
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    assert k_cache.dtype in (query.dtype, torch.float8_e4m3fn), (k_cache.dtype, query.dtype)
    config = config or config_for(num_seqs, num_kv_heads)
    out = torch.empty_like(query)
    splits = num_splits_for(num_seqs, num_kv_heads, block_tables.shape[1] * page, query.device, config)
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))  # 16: the smallest tl.dot operand
    if splits > 1:
        acc = torch.empty(num_seqs, num_heads, splits, head_dim_p2, dtype=torch.float32, device=query.device)
        row_max = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=query.device)
        row_sum = torch.empty_like(row_max)
    else:
        acc = row_max = row_sum = out  # unused: the kernel writes `out` directly
    group = num_heads // num_kv_heads
    _decode_partial_kernel[(num_seqs, num_kv_heads, splits)](
        query, k_cache, v_cache, block_tables, seq_lens, out, acc, row_max, row_sum,
        scale,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_heads, splits,
        GQA_GROUP=group, PAGE=page, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        ROWS=max(16, triton.next_power_of_2(group)), BLOCK=config.block_n, NUM_STAGES=config.num_stages,
        DIRECT=splits == 1,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 models keep fp32 products
        num_warps=config.num_warps,
    )
    if splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            out, acc, row_max, row_sum,
            out.stride(0), out.stride(1),
            splits,
            HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, SPLITS_P2=triton.next_power_of_2(splits),
            num_warps=1,
        )
    return out
