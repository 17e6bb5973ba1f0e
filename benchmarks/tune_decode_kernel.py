"""Launch-shape sweep of the Triton paged decode kernel (`DecodeKernelConfig`) on decode layouts of
LLaVA-1.5-7B's decoder (32 heads, MHA, head dim 128, 16-token pages, bf16).

Every config is checked against the batched SDPA path, then timed as a CUDA graph of 10 calls
(launch overhead excluded, as in the engine's decode graphs); the effective bandwidth counts each
attended K/V byte once. "default" is the shape `config_for` picks for the layout. The default and the
fastest few shapes are timed again between decoder-sized GEMMs (`--beside-gemm`), as the engine's
decode graph runs the kernel. Writes `decode_kernel_tuning.json` and prints the best config per layout.
(`results/decode_kernel_tuning.json` also holds the retired CUDA-core kernel's 44 shapes: commit 1b68858.)

    python benchmarks/tune_decode_kernel.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from llm_service.layers.attention import AttentionMetadata, paged_attention
from llm_service.layers.triton_decode import (
    DecodeKernelConfig,
    config_for,
    num_splits_for,
    paged_decode_attention,
)

LAYOUTS = {  # name -> (batch, context)
    "b1_ctx1024": (1, 1024),
    "b1_ctx192": (1, 192),
    "b64_ctx512": (64, 512),
    "b256_ctx192": (256, 192),
    "b256_ctx1024": (256, 1024),
}


def _graph_ms(fn, calls: int = 10, repeats: int = 5) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def sweep_configs(kv_dtype: str = "bf16") -> list[DecodeKernelConfig]:
    """18 launch shapes: key tile, warps, pipeline depth; over an fp8 cache also 256-key tiles (the
    bytes per load of a bf16 128-key tile: benchmarks/README.md, session 11)."""
    tiles = (32, 64, 128, 256) if kv_dtype == "fp8" else (32, 64, 128)
    return [
        DecodeKernelConfig(block_n=b, num_warps=w, num_stages=s)
        for b, w, s in itertools.product(tiles, (4, 8), (1, 2, 3))
    ]


def _time_beside_gemm(rows: list[dict], default: dict, top: int, batch: int, inputs: tuple, kv_bytes: int, hidden: int) -> None:
    """Adds `beside_gemm_ms` to the default row and the `top` fastest rows: the kernel's
    time in a graph that alternates it with a decoder layer's four projections at this batch (minus the
    projections alone), which is how the engine's decode graph runs it."""
    device, dtype = inputs[0].device, inputs[0].dtype
    intermediate = 11008  # Vicuna-7B's MLP
    x = torch.randn(batch, hidden, device=device, dtype=dtype)
    h = torch.randn(batch, intermediate, device=device, dtype=dtype)
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.01 for n, k in
               ((3 * hidden, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate))]

    def gemms() -> None:
        for w in weights:
            torch.nn.functional.linear(x if w.shape[1] == hidden else h, w)

    base = _graph_ms(gemms)
    for row in {id(r): r for r in [default, *rows[:top]]}.values():
        config = DecodeKernelConfig(**row["config"])

        def step(config=config) -> None:
            gemms()
            paged_decode_attention(*inputs, config)

        row["beside_gemm_ms"] = max(_graph_ms(step) - base, 1e-6)
        row["beside_gemm_gb_s"] = kv_bytes / row["beside_gemm_ms"] / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                        help="the cache's element type (fp8: float8_e4m3fn, upcast in the kernel)")
    parser.add_argument("--cache-layouts", default="nhd",
                        help="nhd (the engine's [blocks, page, Hkv, D]) and/or hnd (each head's page contiguous)")
    parser.add_argument("--layouts", default="", help=f"comma-separated subset of {','.join(LAYOUTS)}")
    parser.add_argument("--beside-gemm", type=int, default=3, metavar="N",
                        help="also time the default and the N best configs between decoder-sized "
                             "GEMMs (as in a decode graph, where the GPU runs hot and the clocks lower)")
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    cache_dtype = {"bf16": dtype, "fp8": torch.float8_e4m3fn}[args.kv_dtype]
    configs = sweep_configs(args.kv_dtype)
    layouts = {name: LAYOUTS[name] for name in (args.layouts.split(",") if args.layouts else LAYOUTS)}
    results = {"device": torch.cuda.get_device_name(), "heads": args.heads, "kv_heads": args.kv_heads,
               "head_dim": args.head_dim, "page": args.page, "kv_dtype": args.kv_dtype, "layouts": {}}
    for name, (batch, context) in layouts.items():
        blocks_per_seq = -(-context // args.page)
        num_blocks = batch * blocks_per_seq + 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (num_blocks, args.page, args.kv_heads, args.head_dim)
        k_cache = torch.randn(shape, generator=gen).to(device, cache_dtype)
        v_cache = torch.randn(shape, generator=gen).to(device, cache_dtype)
        tables = torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks_per_seq].view(batch, -1)
        seq_lens = [context] * batch
        query = torch.randn(batch, args.heads, args.head_dim, generator=gen).to(device, dtype)
        meta = AttentionMetadata.build(
            query_lens=[1] * batch, seq_lens=seq_lens, block_tables=tables.tolist(), block_size=args.page,
            device=device, backend="batched",
        )[0]
        expected = paged_attention(query, k_cache, v_cache, meta, args.head_dim**-0.5).float()
        tables_dev, lens_dev = tables.to(device), torch.tensor(seq_lens, device=device)
        kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * k_cache.element_size()
        for cache_layout in args.cache_layouts.split(","):
            if cache_layout == "hnd":  # same values, each head's page contiguous: [blocks, Hkv, page, D] in memory
                caches = tuple(c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in (k_cache, v_cache))
            elif cache_layout == "nhd":
                caches = (k_cache, v_cache)
            else:
                raise SystemExit(f"unknown cache layout {cache_layout!r}: nhd or hnd")
            key = name if cache_layout == "nhd" else f"{name}_hnd"
            _tune_layout(args, results, key, batch, context, configs, query, caches, tables_dev, lens_dev,
                         expected, kv_bytes)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "decode_kernel_tuning.json" if args.kv_dtype == "bf16" else f"decode_kernel_tuning_{args.kv_dtype}.json"
    (args.out / name).write_text(json.dumps(results, indent=2))
    return 0


def _tune_layout(args, results: dict, name: str, batch: int, context: int, configs, query, caches, tables_dev, lens_dev,
                 expected, kv_bytes: int) -> None:
    """Sweeps `configs` on one decode layout and cache layout; adds the rows to `results`."""
    device = query.device
    k_cache, v_cache = caches
    rows = []
    inputs = (query, k_cache, v_cache, tables_dev, lens_dev, args.head_dim**-0.5)
    for config in configs:
        def call(config=config, inputs=inputs):
            return paged_decode_attention(*inputs, config)

        err = float((call().float() - expected).abs().max())
        ms = _graph_ms(call)
        rows.append({"config": config.__dict__, "ms": ms, "gb_s": kv_bytes / ms / 1e6, "max_abs_err": err,
                     "splits": num_splits_for(batch, args.kv_heads, context, device, config)})
    rows.sort(key=lambda r: r["ms"])
    chosen = config_for(batch, args.kv_heads).__dict__  # what the engine launches for this layout
    default = next((r for r in rows if r["config"] == chosen), rows[0])
    if args.beside_gemm:
        _time_beside_gemm(rows, default, args.beside_gemm, batch, inputs, kv_bytes, args.heads * args.head_dim)
    results["layouts"][name] = {"batch": batch, "context": context, "kv_bytes": kv_bytes,
                                "default": default, "best": rows[0], "all": rows}
    print(f"{name:<14} default {default['ms'] * 1e3:8.1f} us ({default['gb_s']:6.0f} GB/s)   best "
          f"{rows[0]['ms'] * 1e3:8.1f} us ({rows[0]['gb_s']:6.0f} GB/s) {rows[0]['config']} "
          f"err {rows[0]['max_abs_err']:.1e}", flush=True)
    for row in rows:
        if "beside_gemm_ms" in row:
            print(f"    beside GEMMs {row['beside_gemm_ms'] * 1e3:8.1f} us ({row['beside_gemm_gb_s']:6.0f} GB/s) "
                  f"alone {row['ms'] * 1e3:8.1f} us  {row['config']}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
