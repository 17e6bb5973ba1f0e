"""Cases for the Triton paged prefill kernel against the per-sequence reference (float64), shared by the
CPU interpreter test (tests/unit/test_triton_prefill.py, in a subprocess with TRITON_INTERPRET=1) and
a GPU run (`run_all("cuda", torch.bfloat16)`; the interpreter's dot cannot take bf16, so CI checks fp32).

Layouts: one prompt, ragged prompts, chunked prefill after a cached prefix (shared prefix blocks),
lengths that are multiples of neither the block size nor the tile sizes, MHA and GQA (rep 4, and rep 3
which does not divide the tile height), head dims 64/80/96/128, key tiles smaller and larger than a
cache block, block tables drawn out of order from the pool, and stale values in every slot no sequence
owns (so reading past a context shows). Mixed decode + prefill steps go through `paged_attention`.

Every case runs again over float8_e4m3fn caches (an fp8 KV cache: the interpreter's fp8 loads and
upcasts are exact), against the reference over the same fp8 values.

Run directly: `TRITON_INTERPRET=1 python -m tests.unit.triton_prefill_cases` (exits non-zero on a mismatch).
"""

from __future__ import annotations

import random
import sys

import torch

from llm_service.layers.attention import (
    AttentionMetadata,
    padded_block_tables,
    paged_attention,
    paged_attention_reference,
    to_cache_dtype,
)
from llm_service.layers.triton_prefill import (
    DEFAULT_CONFIG,
    PrefillKernelConfig,
    PrefillPlan,
    paged_prefill_attention,
)

CONFIGS = [
    DEFAULT_CONFIG,
    PrefillKernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1),
    PrefillKernelConfig(block_m=32, block_n=64, num_warps=4, num_stages=3),
]
# name -> (query_lens, seq_lens): the new queries of each sequence come after seq_len - query_len cached keys
SHAPES = {
    "one_prompt": ([77], [77]),
    "ragged_prompts": ([5, 33, 64, 100], [5, 33, 64, 100]),
    "cached_prefix": ([40, 17, 2, 64], [131, 50, 90, 112]),
    "two_queries": ([2, 3], [2, 70]),
}
# (num_heads, num_kv_heads, head_dim, block_size)
LAYOUTS = [(2, 2, 64, 16), (4, 1, 128, 16), (3, 1, 80, 8), (4, 2, 96, 32)]
STALE = 1e3  # the value in every V slot no context covers: one stray read moves the output by ~STALE


def _relative_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return float((out.double() - truth).abs().max() / truth.abs().max())


def _paged_case(rng: random.Random, query_lens, seq_lens, num_kv_heads: int, head_dim: int, block_size: int):
    """Block tables drawn out of order from a pool with gaps (later sequences share their predecessor's
    full prefix blocks where both have them), and caches whose unowned slots hold stale values."""
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 6
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables: list[list[int]] = []
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        table: list[int] = []
        if i > 0 and rng.random() < 0.5:
            shared = min((seq_lens[i - 1] - query_lens[i - 1]) // block_size, (seq_len - q_len) // block_size)
            table = tables[-1][:shared]
        while len(table) < need[i]:
            table.append(pool.pop())
        tables.append(table)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for table, seq_len in zip(tables, seq_lens, strict=True):
        pos = torch.arange(seq_len)
        owned[torch.tensor(table)[pos // block_size] * block_size + pos % block_size] = True
    v_cache.view(-1, num_kv_heads, head_dim)[~owned] = STALE
    return tables, k_cache, v_cache


def _reference(query, k_cache, v_cache, query_lens, seq_lens, tables, block_size, scale) -> torch.Tensor:
    meta = AttentionMetadata.build(
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=tables,
        block_size=block_size,
        device=torch.device("cpu"),
        backend="reference",
    )[0]
    return paged_attention_reference(query.double(), k_cache.double(), v_cache.double(), meta, scale)


def _cache_values(cache: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    """What a cache of `kv_dtype` holds for these values, back in fp32 (exact): the reference reads this."""
    return to_cache_dtype(cache, kv_dtype).float()


def _check_kernel(
    device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, tolerance: float
) -> list[str]:
    """`paged_prefill_attention` on its own, every shape x layout, the launch configs in turn."""
    failures = []
    for case, ((name, (query_lens, seq_lens)), layout) in enumerate(
        (shape, layout) for shape in SHAPES.items() for layout in LAYOUTS
    ):
        num_heads, num_kv_heads, head_dim, block_size = layout
        config = CONFIGS[case % len(CONFIGS)]
        rng = random.Random(case)
        torch.manual_seed(case)
        tables, k_cache, v_cache = _paged_case(rng, query_lens, seq_lens, num_kv_heads, head_dim, block_size)
        k_cache, v_cache = _cache_values(k_cache, kv_dtype), _cache_values(v_cache, kv_dtype)
        query = torch.randn(sum(query_lens), num_heads, head_dim)
        scale = head_dim**-0.5
        truth = _reference(query, k_cache, v_cache, query_lens, seq_lens, tables, block_size, scale)
        plan = PrefillPlan.build(query_lens, seq_lens, padded_block_tables(tables).to(device))
        out = paged_prefill_attention(
            query.to(device, dtype),
            k_cache.to(device, kv_dtype),
            v_cache.to(device, kv_dtype),
            plan,
            scale,
            config=config,
        )
        err = _relative_error(out.cpu(), truth)
        if not (out.dtype == dtype and err <= tolerance):
            failures.append(
                f"{name} heads {num_heads}/{num_kv_heads} d{head_dim} page {block_size} {config}: "
                f"rel err {err:.2e}"
            )
    return failures


def _check_mixed_steps(
    device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, tolerance: float
) -> list[str]:
    """Decode rows (Triton decode kernel) and prefill chunks (this kernel) in one step through
    `paged_attention` with the triton backend, sequences interleaved; and a prefill-only step."""
    failures = []
    steps = {
        "mixed": ([1, 40, 1, 1, 23, 1], [57, 100, 1, 33, 23, 129]),
        "prefill_only": ([9, 30], [9, 75]),
    }
    for seed, (name, (query_lens, seq_lens)) in enumerate(steps.items()):
        rng = random.Random(100 + seed)
        torch.manual_seed(100 + seed)
        num_heads, num_kv_heads, head_dim, block_size = (8, 2, 64, 16)
        tables, k_cache, v_cache = _paged_case(rng, query_lens, seq_lens, num_kv_heads, head_dim, block_size)
        k_cache, v_cache = _cache_values(k_cache, kv_dtype), _cache_values(v_cache, kv_dtype)
        query = torch.randn(sum(query_lens), num_heads, head_dim)
        truth = _reference(query, k_cache, v_cache, query_lens, seq_lens, tables, block_size, 0.3)
        meta = AttentionMetadata.build(
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=tables,
            block_size=block_size,
            device=device,
            backend="triton",
        )[0]
        assert meta.prefill is not None and all(g.num_queries == 1 for g in meta.groups)
        out = paged_attention(
            query.to(device, dtype), k_cache.to(device, kv_dtype), v_cache.to(device, kv_dtype), meta, 0.3
        )
        err = _relative_error(out.cpu(), truth)
        if not err <= tolerance:
            failures.append(f"{name} step through paged_attention: rel err {err:.2e}")
    return failures


def _check_out_rows(device: torch.device, dtype: torch.dtype, tolerance: float) -> list[str]:
    """With `out` given, the kernel writes its sequences' rows and nothing else."""
    query_lens, seq_lens, block_size = [3, 1, 4], [10, 6, 4], 4
    tables = [[2, 0, 5], [1, 3], [4]]
    k_cache = torch.randn(6, block_size, 1, 64).to(device, dtype)
    v_cache = torch.randn(6, block_size, 1, 64).to(device, dtype)
    query = torch.randn(8, 2, 64).to(device, dtype)
    meta = AttentionMetadata.build(
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=tables,
        block_size=block_size,
        device=device,
        backend="reference",
    )[0]
    plan = PrefillPlan.build(
        query_lens, seq_lens, meta.block_tables, select=torch.tensor([True, False, True])
    )
    out = torch.full_like(query, 7.0)
    paged_prefill_attention(query, k_cache, v_cache, plan, 0.125, out=out)
    truth = paged_attention_reference(query.double(), k_cache.double(), v_cache.double(), meta, 0.125)
    failures = []
    if not bool((out[3] == 7.0).all()):
        failures.append("out: the unselected decode row was written")
    rows = [0, 1, 2, 4, 5, 6, 7]
    if not _relative_error(out[rows].cpu(), truth[rows]) <= tolerance:
        failures.append("out: selected rows do not match the reference")
    return failures


def run_all(
    device: str = "cpu", dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None
) -> list[str]:
    """Queries in `dtype`, caches in `kv_dtype` (default `dtype`; or torch.float8_e4m3fn). The reference
    reads the same cache values (fp8 upcasts exactly), so an fp8 cache keeps the query dtype's tolerance."""
    # fp32: logits of size ~10 lose ~1e-6 relative to rounding before exp (the fp32 SDPA reference too)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    dev = torch.device(device)
    kv_dtype = kv_dtype or dtype
    checks = [
        _check_kernel(dev, dtype, kv_dtype, tolerance),
        _check_mixed_steps(dev, dtype, kv_dtype, tolerance),
    ]
    if kv_dtype == dtype:
        checks.append(_check_out_rows(dev, dtype, tolerance))  # (the row selection, whatever the cache dtype)
    return [failure for failures in checks for failure in failures]


if __name__ == "__main__":
    problems = run_all()
    # an fp8 KV cache: the kernel loads float8_e4m3fn and upcasts to the query dtype before tl.dot
    problems += [f"fp8 cache: {p}" for p in run_all(kv_dtype=torch.float8_e4m3fn)]
    print("\n".join(problems) or "all triton prefill cases match the reference")
    sys.exit(1 if problems else 0)
