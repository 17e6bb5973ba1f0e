"""Self-attention over a paged KV cache.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`;
a sequence's tokens live in the blocks its block table lists, in order. Every step writes the new
tokens' K/V into their slots, then each sequence attends to its whole context.

Three implementations behind the same `AttentionMetadata` (chosen by `metadata.backend`):

* `batched` (the default): decode sequences (one query each) and prefill sequences (several queries
  each) go to separate groups. Each group is one SDPA call over its sequences' K/V gathered through
  the block table into a padded `[G, L_max, Hkv, D]` layout, with a length (and, for prefill, causal)
  mask. Keeping decode rows apart stops them being padded to the longest prefill chunk. A group's
  gather is capped at `max_gather_tokens` key positions (G * L_max): past that, sequences are sorted
  by length and split into several groups of similar lengths, bounding the transient memory and the
  padding. The query heads that share a KV head are folded into the query axis, so K/V are never
  repeated for GQA. Index tensors and masks are built once per step (`AttentionMetadata.build`) and
  shared by all layers; the attention itself runs no per-sequence Python.

  The padded gather costs a copy of every attended K/V per layer (written once, read twice), and the
  explicit mask rules out SDPA's flash kernels; the `triton` backend reads the blocks in place instead.
* `triton`: no gather, no mask: Triton kernels read each sequence's K/V blocks in place through the
  block table. Decode rows (one query each) go to a split-KV kernel (`triton_decode.py`), prefill
  chunks (several queries each, after any cached prefix) to a flash-attention kernel over the paged
  cache (`triton_prefill.py`), each as one launch whatever the lengths (no gather budget); a mixed
  step writes both into one output. The prefill kernel's metadata (`PrefillPlan`) is built once per
  step like the groups. CUDA only (or `TRITON_INTERPRET=1`).
* `reference`: one SDPA call per sequence (exact, slow: a Python loop over the batch); kept to check
  the batched path against.

Cache dtype (`kv_cache_dtype`, see `resolve_kv_cache_dtype`): the model dtype by default, or
`float8_e4m3fn` (`fp8_e4m3`: half the bytes, so twice the blocks in the same memory and half the K/V
traffic of a decode step). FP8 uses one per-tensor scale of 1.0: a K/V value is stored as the nearest
e4m3 value (3 mantissa bits, ties to even), saturated to +-448 (never NaN; `write_kv` and the Triton
write kernel both clamp before the cast). Every reader upcasts what it loads to the query dtype and
accumulates in fp32 as before. Calibrated (per-layer or per-head) scales are future work.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from llm_service.layers.sampler import to_device

if TYPE_CHECKING:
    from llm_service.layers.triton_prefill import PrefillPlan

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "reference", "batched", "triton")
# --kv-cache-dtype choices: auto = the model dtype
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn: stored K/V saturate here
# Most key positions one SDPA call gathers (G * L_max): 128k positions of Llama-7B-shaped K+V are
# 2 GiB of transient memory per layer.
DEFAULT_MAX_GATHER_TOKENS = 128 * 1024


def resolve_attention_backend(name: str, device_type: str = "cpu") -> str:
    """`auto` -> `triton` on CUDA (`batched`, with a warning, where triton is not installed), `batched`
    elsewhere. `triton` needs a CUDA device (or `TRITON_INTERPRET=1`, as the CPU interpreter tests
    use) and the triton package. Unknown names and unmet needs are a ValueError."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        if device_type != "cuda":
            return "batched"
        if not has_triton:
            logger.warning("attention_backend auto: triton is not installed, decode attention uses 'batched'")
        return "triton" if has_triton else "batched"
    if name == "triton":
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"attention_backend 'triton' needs a CUDA device, got {device_type!r}; use 'batched'"
            )
        if not has_triton:
            raise ValueError("attention_backend 'triton' needs the triton package (pip install triton)")
    return name


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`auto` -> the model dtype, `fp8_e4m3` -> `torch.float8_e4m3fn` (scale 1.0, saturating cast).
    Other names are a ValueError."""
    if name == "auto":
        return model_dtype
    if name == "fp8_e4m3":
        return torch.float8_e4m3fn
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


def triton_fp8_supported(device: torch.device | str) -> bool:
    """Whether Triton kernels may load and store float8_e4m3fn on `device`: CUDA compute capability
    >= 8.9 (Ada, Hopper and later), or CPU tensors (the Triton interpreter, `TRITON_INTERPRET=1`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    return _cuda_capability(device.index) >= (8, 9)


@functools.cache
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def check_kv_cache_dtype(kv_cache_dtype: torch.dtype, backend: str, device: torch.device | str) -> None:
    """Raise a ValueError where a cache of `kv_cache_dtype` cannot serve `backend` (resolved) on `device`:
    fp8 needs a CPU or CUDA device, and the triton backend's kernels need compute capability >= 8.9.
    (On older GPUs the SDPA backends still take an fp8 cache: they upcast with torch ops, and the K/V
    write falls back from the fused Triton kernel to `write_kv`.)"""
    if not is_fp8(kv_cache_dtype):
        return
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"kv_cache_dtype fp8_e4m3 needs a CPU or CUDA device, got {device.type!r}")
    if backend == "triton" and device.type == "cuda" and not triton_fp8_supported(device):
        major, minor = _cuda_capability(device.index)
        raise ValueError(
            f"kv_cache_dtype fp8_e4m3 with attention_backend 'triton' needs a GPU of compute capability >= 8.9 "
            f"(Ada/Hopper); {torch.cuda.get_device_name(device)} is {major}.{minor}. Use kv_cache_dtype auto, "
            "or attention_backend batched"
        )


@dataclass
class PaddedGroup:
    """Sequences attended in one SDPA call: `G` sequences, each padded to `num_queries` queries and to
    `block_tables.shape[1]` blocks of keys.

    Padding queries repeat a real query row of the same sequence (so no mask row is empty); only the
    real rows are written back. Padding keys are masked out.
    """

    block_tables: torch.Tensor  # [G, nb] int64 block ids; nb * block_size >= every context length
    # [G, 1, Q, nb * block_size] bool: query may see key (causal, inside the context); None for a decode
    # group the Triton kernel serves (it reads `seq_lens` instead)
    mask: torch.Tensor | None
    num_queries: int  # Q
    query_index: torch.Tensor | None  # [G * Q] rows of the flat batch; None: rows 0..G-1 (decode-only step)
    out_src: torch.Tensor | None = None  # [n] real rows of the padded [G * Q] output; None: all of them
    out_dst: torch.Tensor | None = None  # [n] their rows in the flat batch; None: `query_index`
    seq_lens: torch.Tensor | None = None  # [G] context lengths (decode groups)
    _folded_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    def folded_mask(self, rep: int) -> torch.Tensor:
        """The mask for queries folded as `[G, Hkv, Q * rep, D]`: each row repeated `rep` times.
        Built once per step and group, then shared by every layer."""
        if rep == 1 or self.num_queries == 1:
            return self.mask
        if rep not in self._folded_masks:
            self._folded_masks[rep] = self.mask.repeat_interleave(rep, dim=2)  # [G, 1, Q * rep, L]
        return self._folded_masks[rep]


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
    backend: str = "reference"  # "reference" | "batched" | "triton" (already resolved)
    # batched backend: one SDPA call per group; decode groups (one query per sequence) come first.
    # triton backend: the decode group only (served by the Triton decode kernel)
    groups: list[PaddedGroup] = field(default_factory=list)
    # triton backend: the prefill sequences (query_len > 1) for the Triton prefill kernel; None if none
    prefill: PrefillPlan | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @classmethod
    def build(
        cls,
        *,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device,
        backend: str = "batched",
        max_gather_tokens: int = DEFAULT_MAX_GATHER_TOKENS,
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata for one step, and the position of every new token (`[T]` int64, on `device`).

        Sequence i computes its positions `[seq_lens[i] - query_lens[i], seq_lens[i])`, whose K/V go to
        the blocks of `block_tables[i]`. Index arithmetic runs as array ops on the host (no per-token
        Python); slots, positions and block tables reach `device` in one copy.
        """
        num_seqs = len(query_lens)
        assert num_seqs == len(seq_lens) == len(block_tables) > 0
        # Index arithmetic in numpy: a step's host work, and numpy's per-op cost on these small arrays
        # is a fraction of torch's (a 607-token prompt: 0.5 -> 0.2 ms on the 2-core CI VM).
        q_lens_np = np.asarray(query_lens, dtype=np.int64)  # [B]
        ctx_lens_np = np.asarray(seq_lens, dtype=np.int64)  # [B]
        assert bool((q_lens_np >= 1).all()) and bool((q_lens_np <= ctx_lens_np).all())
        q_start_np = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens_np, out=q_start_np[1:])  # [B + 1]
        num_tokens = int(q_start_np[-1])
        tables = padded_block_tables(block_tables)  # [B, max_blocks] host (a view of a numpy array)
        tables_np = tables.numpy()

        # token t of sequence s sits at position (seq_len - query_len)[s] + (t - q_start[s])
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens_np)  # [T]
        positions = np.arange(num_tokens) + (ctx_lens_np - q_lens_np - q_start_np[:-1])[seq_of_token]  # [T]
        slots = tables_np[seq_of_token, positions // block_size] * block_size + positions % block_size  # [T]
        # One host-to-device copy for the three: [slots (T) | positions (T) | block tables (B * nb)]
        packed = to_device(torch.from_numpy(np.concatenate([slots, positions, tables_np.reshape(-1)])), device)

        meta = cls(
            slot_mapping=packed[:num_tokens],
            block_tables=packed[2 * num_tokens :].view(tables.shape),
            query_start_loc=q_start_np.tolist(),
            seq_lens=list(seq_lens),
            block_size=block_size,
            backend=backend,
        )
        q_lens, ctx_lens, q_start = (torch.from_numpy(a) for a in (q_lens_np, ctx_lens_np, q_start_np))
        if backend in ("batched", "triton"):
            is_decode_np = q_lens_np == 1
            is_decode = torch.from_numpy(is_decode_np)
            # [B] key positions each sequence gathers
            num_keys = torch.from_numpy(-(-ctx_lens_np // block_size) * block_size)
            decode_seqs = torch.from_numpy(np.flatnonzero(is_decode_np))
            if backend == "triton":  # reads blocks in place: one group, no gather budget
                decode_groups = [decode_seqs] if len(decode_seqs) else []
            else:
                decode_groups = _split_by_gather(decode_seqs, num_keys, max_gather_tokens)
            for seqs in decode_groups:
                in_order = len(seqs) == num_seqs  # a decode-only step in one group: rows 0..B-1 as they are
                meta.groups.append(
                    decode_group(
                        tables[seqs, : int(num_keys[seqs].max()) // block_size].to(device),
                        ctx_lens[seqs].to(device),
                        block_size,
                        query_index=None if in_order else q_start[seqs].to(device),
                        with_mask=backend == "batched",
                    )
                )
            if backend == "triton":
                if not is_decode_np.all():
                    from llm_service.layers.triton_prefill import PrefillPlan  # needs triton: imported on use

                    meta.prefill = PrefillPlan.build(q_lens_np, ctx_lens_np, meta.block_tables, select=~is_decode_np)
            else:
                for seqs in _split_by_gather((~is_decode).nonzero().flatten(), num_keys, max_gather_tokens):
                    meta.groups.append(
                        _prefill_group(
                            tables[seqs], ctx_lens[seqs], q_lens[seqs], q_start[seqs], block_size, device
                        )
                    )
        return meta, packed[num_tokens : 2 * num_tokens]


def padded_block_tables(
    rows: Sequence[Sequence[int]], width: int | None = None, fill: int = 0
) -> torch.Tensor:
    """`[len(rows), width]` int64 (host) block table, rows cut or padded with `fill`; width defaults to the
    longest row. Built through numpy: ~10x faster than `torch.tensor` on nested lists (0.5 vs 4.4 ms
    for 256 rows of ~40 blocks)."""
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    if width is None:
        width = int(lens.max())
    elif int(lens.max()) > width:
        rows = [row[:width] for row in rows]
        lens = np.minimum(lens, width)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
    table = np.full((len(rows), width), fill, dtype=np.int64)
    table[np.arange(width)[None, :] < lens[:, None]] = flat
    return torch.from_numpy(table)


def _split_by_gather(
    seqs: torch.Tensor, num_keys: torch.Tensor, max_gather_tokens: int
) -> list[torch.Tensor]:
    """Sequence indices in groups whose padded gather (size * longest key count) stays within the budget.

    Within budget: one group in the given order. Otherwise longest first, in runs of similar length
    (a sequence longer than the budget on its own still gets a group).
    """
    if len(seqs) == 0:
        return []
    keys = num_keys[seqs]
    if len(seqs) * int(keys.max()) <= max_gather_tokens:
        return [seqs]
    order = torch.argsort(keys, descending=True, stable=True)
    seqs, keys = seqs[order], keys[order]
    groups, start = [], 0
    while start < len(seqs):
        size = max(1, max_gather_tokens // int(keys[start]))
        groups.append(seqs[start : start + size])
        start += size
    return groups


def decode_group(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    *,
    query_index: torch.Tensor | None = None,
    with_mask: bool = True,
) -> PaddedGroup:
    """The decode group from device tensors alone: block_tables `[G, >= nb]`, seq_lens `[G]`.

    `with_mask` (the batched path): keys are gathered for `block_tables.shape[1]` blocks, so pass a
    table already cut to the blocks the longest sequence needs. Without it the Triton kernel reads
    `seq_lens` and any table width works. Only tensor ops, so a CUDA graph can capture it over static
    buffers.
    """
    mask = None
    if with_mask:
        num_keys = block_tables.shape[1] * block_size
        key_pos = torch.arange(num_keys, device=seq_lens.device)
        mask = (key_pos[None, :] < seq_lens[:, None]).view(-1, 1, 1, num_keys)  # [G, 1, 1, L]
    return PaddedGroup(
        block_tables=block_tables, mask=mask, num_queries=1, query_index=query_index, seq_lens=seq_lens
    )


def _prefill_group(
    tables: torch.Tensor,  # [G, max_blocks] host
    ctx_lens: torch.Tensor,  # [G]
    q_lens: torch.Tensor,  # [G]
    q_start: torch.Tensor,  # [G] first row of each sequence in the flat batch
    block_size: int,
    device: torch.device,
) -> PaddedGroup:
    num_queries = int(q_lens.max())
    num_blocks = -(-int(ctx_lens.max()) // block_size)
    j = torch.arange(num_queries)[None, :]  # [1, Q]
    j_real = torch.minimum(j, q_lens[:, None] - 1)  # [G, Q]: padding repeats the last real query
    query_index = (q_start[:, None] + j_real).reshape(-1)  # [G * Q]
    q_pos = (ctx_lens - q_lens)[:, None] + j_real  # [G, Q] absolute position of each query
    is_real = (j < q_lens[:, None]).reshape(-1)  # [G * Q]
    out_src = is_real.nonzero().flatten()
    q_pos = q_pos.to(device)
    key_pos = torch.arange(num_blocks * block_size, device=device)
    mask = (key_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)  # [G, 1, Q, L]
    return PaddedGroup(
        block_tables=tables[:, :num_blocks].to(device),
        mask=mask,
        num_queries=num_queries,
        query_index=query_index.to(device),
        out_src=out_src.to(device),
        out_dst=query_index[out_src].to(device),
    )


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """`x` as the cache stores it: for fp8, clamped to +-448 first (older torch versions turn a finite
    overflow into NaN instead of saturating), then rounded to the nearest e4m3 value (ties to even)."""
    if is_fp8(cache_dtype):
        x = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.to(cache_dtype)


def _as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """A one-byte float cache viewed as uint8 (copies and gathers of it are byte moves, and torch lacks
    some fp8 kernels: `index_copy_` on CPU); other caches as they are."""
    return cache.view(torch.uint8) if is_fp8(cache.dtype) else cache


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`cache[blocks]` for a `[N, bs, Hkv, D]` cache and a flat block id tensor, in the cache dtype."""
    return _as_bytes(cache).index_select(0, blocks).view(cache.dtype)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    # key/value: [T, Hkv, D]; caches: [N, bs, Hkv, D]; one scatter per cache, no per-token work
    for x, cache in ((key, k_cache), (value, v_cache)):
        flat = _as_bytes(cache).view(-1, *cache.shape[2:])  # [N * bs, Hkv, D]
        flat.index_copy_(0, slots, _as_bytes(to_cache_dtype(x, cache.dtype)))


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context. Returns [T, Hq, D]."""
    if meta.backend == "reference":
        return paged_attention_reference(query, k_cache, v_cache, meta, scale)
    assert meta.backend in ("batched", "triton"), meta.backend
    groups = meta.groups
    if len(groups) == 1 and groups[0].query_index is None:
        return _attend_group(query, k_cache, v_cache, groups[0], scale)  # decode-only step: no scatter
    out = torch.empty_like(query)
    for group in groups:
        result = _attend_group(query, k_cache, v_cache, group, scale)  # [G * Q, Hq, D]
        if group.out_src is not None:
            result = result.index_select(0, group.out_src)
        out.index_copy_(0, group.out_dst if group.out_dst is not None else group.query_index, result)
    if meta.prefill is not None:
        from llm_service.layers.triton_prefill import paged_prefill_attention  # needs triton: imported on use

        paged_prefill_attention(query, k_cache, v_cache, meta.prefill, scale, out=out)  # its rows, in place
    return out


def _attend_group(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: PaddedGroup, scale: float
) -> torch.Tensor:
    """One SDPA call (or the Triton decode kernel) for a padded group.
    query: [T, Hq, D] -> [G * Q, Hq, D] (padded rows included)."""
    if group.mask is None:  # a decode group for the Triton kernel
        from llm_service.layers.triton_decode import paged_decode_attention  # needs triton: imported on use

        q = query if group.query_index is None else query.index_select(0, group.query_index)  # [G, Hq, D]
        return paged_decode_attention(q, k_cache, v_cache, group.block_tables, group.seq_lens, scale)
    num_seqs, num_queries = group.num_seqs, group.num_queries
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    rep = num_heads // num_kv_heads
    q = query if group.query_index is None else query.index_select(0, group.query_index)  # [G * Q, Hq, D]
    blocks = group.block_tables.reshape(-1)
    # [G * nb, bs, Hkv, D] -> [G, Hkv, L, D] (in the cache dtype: an fp8 cache is upcast below)
    k = gather_blocks(k_cache, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = gather_blocks(v_cache, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    # Query heads h*rep .. h*rep+rep-1 read KV head h (repeat_interleave order): fold them into the
    # query axis, [G, Q, Hkv, rep, D] -> [G, Hkv, Q * rep, D]; for Q == 1 this is a view.
    q = q.view(num_seqs, num_queries, num_kv_heads, rep, head_dim).transpose(1, 2)
    q = q.reshape(num_seqs, num_kv_heads, num_queries * rep, head_dim)
    out = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=group.folded_mask(rep), scale=scale
    )
    # [G, Hkv, Q * rep, D] -> [G * Q, Hq, D]
    out = out.reshape(num_seqs, num_kv_heads, num_queries, rep, head_dim).transpose(1, 2)
    return out.reshape(num_seqs * num_queries, num_heads, head_dim)


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
        # [L, Hkv, D], upcast to the query dtype (a no-op unless the cache is fp8)
        keys = gather_blocks(k_cache, blocks).reshape(-1, num_kv_heads, head_dim)[:context_len]
        values = gather_blocks(v_cache, blocks).reshape(-1, num_kv_heads, head_dim)[:context_len]
        keys, values = keys.to(query.dtype), values.to(query.dtype)
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        q = query[start:end].transpose(0, 1)  # [Hq, n, D]
        # query j sits at absolute position context_len - num_queries + j and sees keys <= it
        q_pos = torch.arange(context_len - num_queries, context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [n, L]
        attn = F.scaled_dot_product_attention(
            q,
            keys.transpose(0, 1).to(q.dtype),
            values.transpose(0, 1).to(q.dtype),
            attn_mask=mask,
            scale=scale,
        )
        out[start:end] = attn.transpose(0, 1)
    return out
