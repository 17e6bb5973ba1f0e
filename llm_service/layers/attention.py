"""Self-attention over a paged KV cache.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`;
a sequence's tokens live in the blocks its block table lists, in order. Every step writes the new
tokens' K/V into their slots, then each sequence attends to its whole context.

This file holds the reference path (any device, exact, one SDPA call per sequence); GPU kernels
plug in behind the same `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to.

    The flattened token batch is `T = sum(query_lens)` long; sequence i owns tokens
    `query_start_loc[i]:query_start_loc[i + 1]`, which are its last `query_lens[i]` context positions.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int64 (rows padded with 0)
    query_start_loc: list[int]  # [B + 1] cumulative query lengths
    seq_lens: list[int]  # [B] context length after this step's tokens are added
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    # key/value: [T, Hkv, D]; caches: [N, bs, Hkv, D]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def paged_attention_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context. Returns [T, Hq, D]."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        num_queries, context_len = end - start, meta.seq_lens[i]
        num_blocks = -(-context_len // meta.block_size)
        blocks = meta.block_tables[i, :num_blocks]
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]  # [L, Hkv, D]
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        q = query[start:end].transpose(0, 1)  # [Hq, n, D]
        # query j sits at absolute position context_len - num_queries + j and sees keys <= it
        q_pos = torch.arange(context_len - num_queries, context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [n, L]
        attn = F.scaled_dot_product_attention(
            q, keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype), attn_mask=mask, scale=scale
        )
        out[start:end] = attn.transpose(0, 1)
    return out
