"""Paged prefill attention as a Triton kernel: flash attention whose keys are read from the paged cache
in place, with no padded gather.

Why: the `batched` path gathers each prefill sequence's K/V into a padded copy per layer and runs SDPA
with an explicit boolean mask, which rules out the flash backends; for long prompts both the copy and
the masked math dominate. Here a program loads its keys straight from the cache blocks through the
block table and skips every key tile its queries cannot see.

Layout: one program per (query tile, KV head). A tile holds `block_q` consecutive queries of one
sequence; the `rep = Hq // Hkv` query heads that read the same KV head are folded into the tile's rows
(row r is query `r // rep`, head `r % rep`), so `block_m = block_q * rep` rows share every K/V load. The
host lists the tiles (`PrefillPlan.tiles`: sequence index, first query of the tile) so the grid has no
empty programs, heaviest tiles first. A program walks key tiles of `block_n` positions with an fp32
online softmax: first the keys every one of its queries sees (no mask), then the causal edge, ending at
its last query's position. Query j of a sequence with `query_len` new tokens and context `seq_len` sits
at position `seq_len - query_len + j` (a cached prefix comes first) and sees keys up to it.

Cache dtype: the query's, or float8_e4m3fn (an fp8 KV cache, see attention.py): each K/V tile is loaded
in the cache dtype and upcast to the query dtype (exact) before `tl.dot`; scores, softmax and the
output accumulate in fp32 as before. Triton handles fp8 on compute capability >= 8.9 only
(`check_kv_cache_dtype`).

Importing this module needs `triton`; under `TRITON_INTERPRET=1` the kernel runs on CPU tensors
(slowly, fp32 only: the interpreter's dot does not convert bf16), which is how CI checks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from llm_service.layers.sampler import to_device


@dataclass(frozen=True)
class PrefillKernelConfig:
    """Launch shape of the prefill kernel: `block_m` rows (queries x folded heads) per program,
    `block_n` keys per loop iteration, `num_stages` > 1 software-pipelines the key loads.

    The default won the H100 sweep (`bench_prefill_attention.py`, Vicuna-7B heads, bf16): fastest or
    within 11% of the fastest of six shapes on 1x623, 256x128, 8x2048, 4x512 after a 1536 prefix and
    1x4096 (results/prefill_attention.json)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps/num_stages: {self.num_warps}/{self.num_stages}")


# Chosen by the H100 sweep (see PrefillKernelConfig); 128-row tiles on 4 warps spill registers.
DEFAULT_CONFIG = PrefillKernelConfig()


@dataclass
class PrefillPlan:
    """The kernel's per-step metadata, shared by every layer: which sequences it serves and where their
    queries and keys are. Device tensors are built once (`build`); the tile list depends on the tile
    height (`block_q`, set by the layer's GQA group), so it is built on first use and cached."""

    seq_ids: np.ndarray  # [P] int64 host: the batch's sequences this plan attends
    query_lens: np.ndarray  # [P] int64 host
    prefix_lens: np.ndarray  # [P] int64 host: cached context before the new queries
    query_start: torch.Tensor  # [B + 1] int32 device: first row of each sequence in the flat batch
    seq_lens: torch.Tensor  # [B] int32 device: context length including the new queries
    block_tables: torch.Tensor  # [B, nb] int device; nb * block_size >= every context length
    _tiles: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int] | np.ndarray | torch.Tensor,
        seq_lens: Sequence[int] | np.ndarray | torch.Tensor,
        block_tables: torch.Tensor,
        select: np.ndarray | torch.Tensor | None = None,
    ) -> PrefillPlan:
        """A plan for the sequences `select` (bool `[B]`, default all) of a batch whose block tables are
        already on the device. One host-to-device copy; the host arithmetic is numpy's (cheaper than
        torch's per op on arrays this small)."""
        q_lens = np.asarray(query_lens, dtype=np.int64)  # [B]
        ctx_lens = np.asarray(seq_lens, dtype=np.int64)  # [B]
        num_seqs = len(q_lens)
        assert num_seqs == len(ctx_lens) == block_tables.shape[0] and bool((q_lens <= ctx_lens).all())
        seq_ids = np.arange(num_seqs) if select is None else np.flatnonzero(np.asarray(select))
        packed = np.zeros(2 * num_seqs + 1, dtype=np.int32)  # [query_start (B + 1) | seq_lens (B)]
        packed[1 : num_seqs + 1] = np.cumsum(q_lens)
        packed[num_seqs + 1 :] = ctx_lens
        # pinned, non-blocking: no wait on the GPU queue
        packed_device = to_device(torch.from_numpy(packed), block_tables.device)
        return cls(
            seq_ids=seq_ids,
            query_lens=q_lens[seq_ids],
            prefix_lens=(ctx_lens - q_lens)[seq_ids],
            query_start=packed_device[: num_seqs + 1],
            seq_lens=packed_device[num_seqs + 1 :],
            block_tables=block_tables,
        )

    def tiles(self, block_q: int) -> torch.Tensor:
        """`[num_tiles, 2]` int32 (sequence index, first query of the tile) on the device: every query of
        the plan's sequences in exactly one tile, the tiles that read the most keys first (so the last
        programs to start are short ones)."""
        if block_q not in self._tiles:
            num_tiles = -(-self.query_lens // block_q)  # [P]
            seq = np.repeat(self.seq_ids, num_tiles)
            seq_first_tile = np.repeat(np.cumsum(num_tiles) - num_tiles, num_tiles)
            q0 = (np.arange(int(num_tiles.sum())) - seq_first_tile) * block_q
            keys_read = np.repeat(self.prefix_lens, num_tiles) + np.minimum(
                q0 + block_q, np.repeat(self.query_lens, num_tiles)
            )
            order = np.argsort(-keys_read, kind="stable")
            table = np.stack([seq, q0], axis=1)[order].astype(np.int32)
            self._tiles[block_q] = to_device(torch.from_numpy(table), self.block_tables.device)
        return self._tiles[block_q]


# Kernels: argument lists packed by role, as in triton_decode.py.
# fmt: off
@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """A [rows, HEAD_DIM_P2] load, masked only where needed (an unmasked load vectorises best)."""
    if MASK_ROWS and MASK_D:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_D:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attend_key_range(
    acc, l_i, m_i, q, q_pos,
    k_ptr, v_ptr, table_ptr,
    stride_kb, stride_kt, stride_vb, stride_vt,
    start, end, scale_log2, d, d_ok,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
):
    """Online softmax over keys [start, end). CAUSAL: the edge tiles, where row i sees keys <= q_pos[i]
    and keys past `end - 1` are not loaded; otherwise every row sees every key."""
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        pos = n0 + tl.arange(0, BLOCK_N)  # [N] key positions
        key_ok = pos < end
        if CAUSAL:
            block = tl.load(table_ptr + pos // PAGE, mask=key_ok, other=0)
        else:
            block = tl.load(table_ptr + pos // PAGE)
        block = block.to(tl.int64)
        offset = (pos % PAGE).to(tl.int64)
        k = _load_tile(k_ptr + (block * stride_kb + offset * stride_kt)[:, None] + d[None, :], key_ok, d_ok,
                       CAUSAL, MASK_D)  # [N, D], the cache dtype (fp8 or the query's)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2  # [M, N], log2 units
        if CAUSAL:
            qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # [M]; finite: every row sees its first key tile's first key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])  # [M, N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_ptr + (block * stride_vb + offset * stride_vt)[:, None] + d[None, :], key_ok, d_ok,
                       CAUSAL, MASK_D).to(q.dtype)  # [N, D]
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # [M, D]
        m_i = m_new
    return acc, l_i, m_i


# The block-table width changes from step to step: not specializing on it (== 1, % 16) keeps one
# compiled kernel per launch config instead of JIT compiles (~1 s each) in the middle of serving.
@triton.jit(do_not_specialize=["stride_ts"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, tiles_ptr, query_start_ptr, seq_lens_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_ts,
    REP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    MASK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    q0 = tl.load(tiles_ptr + 2 * tile + 1)  # first query of the tile, within its sequence
    row0 = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - row0
    prefix = tl.load(seq_lens_ptr + seq) - query_len  # position of the sequence's first query
    last = prefix + tl.minimum(q0 + BLOCK_Q, query_len) - 1  # position of the tile's last query

    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // REP  # [M] query of each row (within the sequence)
    head = kv_head * REP + r % REP  # [M] its query head
    row_ok = (r < BLOCK_Q * REP) & (qi < query_len)
    q_pos = tl.minimum(prefix + qi, last)  # [M]; padding rows borrow the last query's position
    rows = (row0 + qi).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_P2)
    d_ok = d < HEAD_DIM
    q = _load_tile(q_ptr + rows[:, None] * stride_qt + (head * stride_qh)[:, None] + d[None, :], row_ok, d_ok,
                   True, MASK_D)  # [M, D]

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    table_ptr = tables_ptr + seq.to(tl.int64) * stride_ts
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_vh
    # keys before the tile's first query are visible to all its rows: whole key tiles of them need no mask
    full_end = (prefix + q0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, q_pos, k_head_ptr, v_head_ptr, table_ptr, stride_kb, stride_kt, stride_vb, stride_vt,
        0, full_end, scale_log2, d, d_ok, PAGE, BLOCK_N, NUM_STAGES, PRECISION, False, MASK_D,
    )
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, q_pos, k_head_ptr, v_head_ptr, table_ptr, stride_kb, stride_kt, stride_vb, stride_vt,
        full_end, last + 1, scale_log2, d, d_ok, PAGE, BLOCK_N, NUM_STAGES, PRECISION, True, MASK_D,
    )
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + (head * stride_oh)[:, None] + d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
# fmt: on


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]: the batch's new queries, sequence by sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], the new tokens' keys already written
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    plan: PrefillPlan,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: PrefillKernelConfig | None = None,
) -> torch.Tensor:
    """Causal attention of the plan's sequences' queries over their cached contexts. Writes their rows
    of `out` (`[T, Hq, D]`, allocated when not given; other rows are left as they are) and returns it."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    assert k_cache.dtype in (query.dtype, torch.float8_e4m3fn), (k_cache.dtype, query.dtype)
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and query.stride(2) == 1
    assert plan.block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.stride(2) == 1
    config = config or DEFAULT_CONFIG
    rep = num_heads // num_kv_heads
    block_m = max(config.block_m, triton.next_power_of_2(rep))
    block_q = block_m // rep
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    tiles = plan.tiles(block_q)
    if len(tiles) == 0:
        return out
    # fmt: off
    _prefill_kernel[(len(tiles), num_kv_heads)](
        query, k_cache, v_cache, out, plan.block_tables, tiles, plan.query_start, plan.seq_lens,
        scale * math.log2(math.e),
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        plan.block_tables.stride(0),
        REP=rep, PAGE=page, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n, NUM_STAGES=config.num_stages,
        MASK_D=head_dim != head_dim_p2,
        # fp32 inputs: exact products (the default would round them to TF32 on the tensor cores)
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    # fmt: on
    return out
