"""Paged-attention micro-benchmark: the reference loop against the batched path and its design variants.

One attention layer over a paged KV cache, for a few step layouts (decode-only, decode mixed with a
prefill chunk, prefill-only). Variants:

* `reference`      one SDPA call per sequence (Python loop)
* `batched`        the engine's default: decode rows and prefill rows in two padded SDPA calls
* `one_group`      every sequence in a single padded group ([B, Q_max, L_max] causal+length mask)
* `gqa_enable`     `batched`, but GQA through SDPA's `enable_gqa=True` instead of folding query heads
* `gqa_repeat`     `batched`, but K/V repeated per query head (what the reference does)

Median time per call; writes JSON under `--out` and prints a table. Runs on CPU or CUDA:

    python benchmarks/bench_attention.py --device cuda --out benchmarks/results
    python benchmarks/bench_attention.py --device cpu --out /tmp/attn   # what the design notes quote
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_service.layers.attention import (
    AttentionMetadata,
    PaddedGroup,
    _attend_group,
    _prefill_group,
    paged_attention,
)

REPO = Path(__file__).resolve().parents[1]

# name -> (query lens, context lens); contexts drawn around the given mean
LAYOUTS = {
    "decode_b32_L512": ([1] * 32, 512),
    "decode_b8_L2048": ([1] * 8, 2048),
    "mixed_31dec_1x256": ([1] * 31 + [256], 512),
    "prefill_4x128": ([128] * 4, 256),
}


def _layout(query_lens: list[int], mean_ctx: int, block_size: int, seed: int = 0):
    rng = random.Random(seed)
    seq_lens = [max(q, rng.randint(mean_ctx // 2, mean_ctx * 3 // 2)) for q in query_lens]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 8
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    return seq_lens, tables, num_blocks


def _sdpa_group_variant(query, k_cache, v_cache, group: PaddedGroup, scale: float, gqa: str) -> torch.Tensor:
    """`_attend_group` with GQA done by `enable_gqa` or by repeating K/V (for comparison only)."""
    num_seqs, num_queries = group.num_seqs, group.num_queries
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    q = query if group.query_index is None else query.index_select(0, group.query_index)
    q = q.view(num_seqs, num_queries, num_heads, head_dim).transpose(1, 2)  # [G, Hq, Q, D]
    blocks = group.block_tables.reshape(-1)
    k = k_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    if gqa == "repeat":
        rep = num_heads // num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(num_seqs * num_queries, num_heads, head_dim)


def _grouped(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, attend) -> torch.Tensor:
    out = torch.empty_like(query)
    for group in meta.groups:
        result = attend(query, k_cache, v_cache, group, scale)
        if group.out_src is not None:
            result = result.index_select(0, group.out_src)
        index = group.out_dst if group.out_dst is not None else group.query_index
        if index is None:
            return result
        out.index_copy_(0, index, result)
    return out


def _timed_interleaved(fns: dict, iters: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin so that noise hits all variants alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def run_layout(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    query_lens, mean_ctx = LAYOUTS[name]
    seq_lens, tables, num_blocks = _layout(query_lens, mean_ctx, args.block_size)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    query = torch.randn(sum(query_lens), args.heads, args.head_dim, generator=gen).to(device, dtype)
    scale = args.head_dim**-0.5

    def build(backend: str) -> AttentionMetadata:
        return AttentionMetadata.build(
            query_lens=query_lens, seq_lens=seq_lens, block_tables=tables, block_size=args.block_size,
            device=device, backend=backend,
        )[0]

    ref_meta, meta = build("reference"), build("batched")
    q_lens, ctx = torch.tensor(query_lens), torch.tensor(seq_lens)
    q_start = torch.cumsum(q_lens, 0) - q_lens
    padded_tables = torch.tensor([t + [0] * (max(map(len, tables)) - len(t)) for t in tables])
    one_group = _prefill_group(padded_tables, ctx, q_lens, q_start, args.block_size, device)
    one_meta = AttentionMetadata(meta.slot_mapping, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                 args.block_size, "batched", groups=[one_group])
    variants = {
        "reference": lambda: paged_attention(query, k_cache, v_cache, ref_meta, scale),
        "batched": lambda: paged_attention(query, k_cache, v_cache, meta, scale),
        "one_group": lambda: _grouped(query, k_cache, v_cache, one_meta, scale, _attend_group),
        "gqa_enable": lambda: _grouped(
            query, k_cache, v_cache, meta, scale, lambda *a: _sdpa_group_variant(*a, gqa="enable")
        ),
        "gqa_repeat": lambda: _grouped(
            query, k_cache, v_cache, meta, scale, lambda *a: _sdpa_group_variant(*a, gqa="repeat")
        ),
    }
    if device.type == "cuda":  # the paged Triton decode kernel (prefill chunks stay on batched SDPA)
        triton_meta = build("triton")
        variants["triton"] = lambda: paged_attention(query, k_cache, v_cache, triton_meta, scale)
    expected = variants["reference"]().float()
    result: dict = {"num_seqs": len(query_lens), "num_tokens": sum(query_lens), "mean_context": mean_ctx}
    times = _timed_interleaved(variants, args.iters, device)
    for variant, fn in variants.items():
        err = ((fn().float() - expected).norm() / expected.norm()).item()
        result[variant] = {
            "ms": statistics.median(times[variant]) * 1e3,
            "min_ms": min(times[variant]) * 1e3,
            "rel_err_vs_reference": err,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": args.block_size,
        "layouts": {},
    }
    for name in args.layouts.split(","):
        results["layouts"][name] = run_layout(name, args, device, dtype)
    names = list(next(iter(results["layouts"].values())).keys() - {"num_seqs", "num_tokens", "mean_context"})
    names.sort(key=["reference", "batched", "triton", "one_group", "gqa_enable", "gqa_repeat"].index)
    print(f"{results['device']} {results['dtype']}  Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim}  "
          "ms/call, median (min)")
    print(f"{'layout':<20}" + "".join(f"{n:>17}" for n in names))
    for name, row in results["layouts"].items():
        print(f"{name:<20}" + "".join(f"{row[n]['ms']:>8.2f} ({row[n]['min_ms']:.2f})" for n in names))
    (args.out / "attention_micro.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
