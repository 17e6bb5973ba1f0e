"""Cases for the Triton paged decode kernel against the per-sequence reference, shared by the CPU
interpreter test (tests/unit/test_triton_decode.py, in a subprocess with TRITON_INTERPRET=1) and the
GPU test (tests/gpu/test_triton_decode_gpu.py).

The cases run again over float8_e4m3fn caches (an fp8 KV cache; `run_all(kv_dtype=...)`): the kernels
load fp8 and upcast, which the interpreter does exactly.

Run directly: `TRITON_INTERPRET=1 python -m tests.unit.triton_decode_cases` (exits non-zero on a mismatch).
"""

from __future__ import annotations

import random
import sys

import torch

from llm_service.layers.attention import (
    AttentionMetadata,
    paged_attention,
    paged_attention_reference,
    to_cache_dtype,
)
from llm_service.layers.triton_decode import (
    DecodeKernelConfig,
    config_for,
    num_splits_for,
    paged_decode_attention,
)
from tests.unit.test_paged_attention import _layout

# launch shapes: the two the engine picks, small key blocks with deeper pipelines and more warps
CONFIGS = [
    config_for(256, 32),  # production: 128-key tiles, pipelined
    config_for(1, 32),  # production at batch 1: not pipelined
    DecodeKernelConfig(block_n=16, num_stages=2),
    DecodeKernelConfig(block_n=32, num_warps=8, num_stages=3),
]
# (num_heads, num_kv_heads, head_dim, decode_share): MHA, GQA, MQA, a head dim that is not a power of two
LAYOUTS = [(4, 4, 8, 1.0), (8, 2, 16, 1.0), (4, 1, 8, 0.5), (6, 3, 24, 0.5)]


def _relative_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return float((out.double() - truth).abs().max() / truth.abs().max())


def _check_layouts(
    device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, tolerance: float, seeds: range
) -> list[str]:
    """Random paged layouts (shared prefix blocks, out-of-order ids, stale cache values) through
    `paged_attention` with the triton backend, decode rows mixed with prefill chunks."""
    failures = []
    for seed in seeds:
        for num_heads, num_kv_heads, head_dim, decode_share in LAYOUTS:
            rng = random.Random(seed)
            torch.manual_seed(seed)
            block_size = rng.choice([4, 16])
            num_seqs = rng.randint(1, 6)
            num_blocks = 6 * num_seqs + 8
            query_lens, seq_lens, tables = _layout(rng, num_seqs, block_size, num_blocks, decode_share=decode_share)
            k_cache = to_cache_dtype(torch.randn(num_blocks, block_size, num_kv_heads, head_dim) * 3, kv_dtype)
            v_cache = to_cache_dtype(torch.randn(num_blocks, block_size, num_kv_heads, head_dim) * 3, kv_dtype)
            k_cache, v_cache = k_cache.to(device), v_cache.to(device)
            query = torch.randn(sum(query_lens), num_heads, head_dim).to(device, dtype)
            metas = {
                backend: AttentionMetadata.build(
                    query_lens=query_lens, seq_lens=seq_lens, block_tables=tables, block_size=block_size,
                    device=device, backend=backend,
                )[0]
                for backend in ("reference", "triton")
            }
            out = paged_attention(query, k_cache, v_cache, metas["triton"], 0.3)
            truth = paged_attention_reference(
                query.double(), k_cache.double(), v_cache.double(), metas["reference"], 0.3
            )
            err = _relative_error(out, truth)
            if not err <= tolerance:
                failures.append(f"seed {seed} heads {num_heads}/{num_kv_heads} d{head_dim}: rel err {err:.2e}")
    return failures


def _check_splits(
    device: torch.device,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    tolerance: float,
    configs=tuple(CONFIGS),
    num_kv_heads: int = 2,
    contexts=([1], [1100], [1, 37, 700, 64], [2000]),
) -> list[str]:
    """The split-KV merge: one long context (many splits), a 1-token context, a table wider than needed
    (the width a CUDA graph captures) and contexts of very different lengths in one batch; 4 query heads
    over `num_kv_heads`."""
    failures = []
    torch.manual_seed(0)
    page, num_blocks, num_heads, head_dim = 16, 160, 4, 32
    k_cache = to_cache_dtype(torch.randn(num_blocks, page, num_kv_heads, head_dim), kv_dtype).to(device)
    v_cache = to_cache_dtype(torch.randn(num_blocks, page, num_kv_heads, head_dim), kv_dtype).to(device)
    for (seq_lens, config) in [(lens, config) for lens in contexts for config in configs]:
        width = max(-(-n // page) for n in seq_lens) + 5  # wider than the longest context needs
        tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in seq_lens]).to(device)
        lens = torch.tensor(seq_lens, device=device)
        query = torch.randn(len(seq_lens), num_heads, head_dim).to(device, dtype)
        splits = num_splits_for(len(seq_lens), num_kv_heads, width * page, query.device, config)
        out = paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.2, config)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(0), block_tables=tables, query_start_loc=list(range(len(seq_lens) + 1)),
            seq_lens=seq_lens, block_size=page,
        )
        truth = paged_attention_reference(query.double(), k_cache.double(), v_cache.double(), meta, 0.2)
        err = _relative_error(out, truth)
        if not err <= tolerance:
            failures.append(
                f"seq_lens {seq_lens} heads {num_heads}/{num_kv_heads} ({splits} splits, {config}): rel err {err:.2e}"
            )
    return failures


def _check_query_magnitudes(
    device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, tolerance: float
) -> list[str]:
    """Queries far from 1 in magnitude (past fp16's largest finite value, and near its smallest normal),
    with the softmax scale bringing the scores back to the usual range: no product in the kernel may
    overflow or flush to zero."""
    failures = []
    torch.manual_seed(1)
    page, num_blocks, num_heads, num_kv_heads, head_dim = 16, 24, 4, 2, 32
    k_cache = to_cache_dtype(torch.randn(num_blocks, page, num_kv_heads, head_dim), kv_dtype).to(device)
    v_cache = to_cache_dtype(torch.randn(num_blocks, page, num_kv_heads, head_dim), kv_dtype).to(device)
    seq_lens = [1, 150, 300]
    tables = torch.stack([torch.randperm(num_blocks)[:20] for _ in seq_lens]).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0), block_tables=tables, query_start_loc=list(range(len(seq_lens) + 1)),
        seq_lens=seq_lens, block_size=page,
    )
    for magnitude in (3e5, 1e-4):
        # scale 1 / magnitude keeps the scores in the usual range: the logits' precision is under test
        query = (torch.randn(len(seq_lens), num_heads, head_dim) * magnitude).to(device, dtype)
        out = paged_decode_attention(query, k_cache, v_cache, tables, torch.tensor(seq_lens, device=device), 1 / magnitude)
        truth = paged_attention_reference(query.double(), k_cache.double(), v_cache.double(), meta, 1 / magnitude)
        err = _relative_error(out, truth)
        if not (torch.isfinite(out).all() and err <= tolerance):
            failures.append(f"queries of magnitude {magnitude:g}: rel err {err:.2e}")
    return failures


def run_all(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seeds: range = range(3),
    kv_dtype: torch.dtype | None = None,
    configs=tuple(CONFIGS),
) -> list[str]:
    """Queries in `dtype`, caches in `kv_dtype` (default `dtype`; or torch.float8_e4m3fn). The reference
    reads the same cache values in float64 (fp8 upcasts exactly), so an fp8 cache keeps the query
    dtype's tolerance: only the kernel's loads and upcasts are under test, not fp8's rounding."""
    tolerance = 2e-6 if dtype == torch.float32 else 2e-2
    dev = torch.device(device)
    kv_dtype = kv_dtype or dtype
    # the kernel's row tile repeats the GQA group: MHA and MQA too
    other_groups = [
        failure
        for num_kv_heads in (1, 4)
        for failure in _check_splits(dev, dtype, kv_dtype, tolerance, configs[:2], num_kv_heads, ([1, 37, 700, 64],))
    ]
    return _check_layouts(dev, dtype, kv_dtype, tolerance, seeds) + _check_splits(
        dev, dtype, kv_dtype, tolerance, configs
    ) + other_groups + _check_query_magnitudes(dev, dtype, kv_dtype, tolerance)


if __name__ == "__main__":
    problems = run_all()
    # an fp8 KV cache: the kernels load float8_e4m3fn and upcast (the interpreter's fp8 -> fp32 is exact)
    # (the two production launch shapes for the split cases: the interpreter is slow)
    fp8 = run_all(seeds=range(2), kv_dtype=torch.float8_e4m3fn, configs=CONFIGS[:2])
    problems += [f"fp8 cache: {p}" for p in fp8]
    print("\n".join(problems) or "all triton decode cases match the reference")
    sys.exit(1 if problems else 0)
