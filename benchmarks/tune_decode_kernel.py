"""Launch-shape sweep of the Triton paged decode kernel (`DecodeKernelConfig`) on decode layouts of
LLaVA-1.5-7B's decoder (32 heads, MHA, head dim 128, 16-token pages, bf16).

Every config is checked against the batched SDPA path, then timed as a CUDA graph of 10 calls
(launch overhead excluded, as in the engine's decode graphs); the effective bandwidth counts each
attended K/V byte once. "default" is the shape `config_for` picks for the layout. Writes `decode_kernel_tuning.json` and prints the best config per layout.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page", type=int, default=16)
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    configs = [
        DecodeKernelConfig(block_n=b, heads_per_program=h, num_warps=w, num_stages=s)
        for b, h, w, s in itertools.product((16, 32, 64), (1, 2, 4, 8), (4, 8), (1, 2))
        if b * h <= 256
    ]
    results = {"device": torch.cuda.get_device_name(), "heads": args.heads, "kv_heads": args.kv_heads,
               "head_dim": args.head_dim, "page": args.page, "layouts": {}}
    for name, (batch, context) in LAYOUTS.items():
        blocks_per_seq = -(-context // args.page)
        num_blocks = batch * blocks_per_seq + 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (num_blocks, args.page, args.kv_heads, args.head_dim)
        k_cache = torch.randn(shape, generator=gen).to(device, dtype)
        v_cache = torch.randn(shape, generator=gen).to(device, dtype)
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
        rows = []
        inputs = (query, k_cache, v_cache, tables_dev, lens_dev, args.head_dim**-0.5)
        for config in configs:
            def call(config=config, inputs=inputs):
                return paged_decode_attention(*inputs, config)

            err = float((call().float() - expected).abs().max())
            ms = _graph_ms(call)
            rows.append({"config": config.__dict__, "ms": ms, "gb_s": kv_bytes / ms / 1e6, "max_abs_err": err,
                         "splits": num_splits_for(batch, args.heads, context, device, config)})
        rows.sort(key=lambda r: r["ms"])
        chosen = config_for(batch, args.heads).__dict__  # what the engine launches for this layout
        default = next(r for r in rows if r["config"] == chosen)
        results["layouts"][name] = {"batch": batch, "context": context, "kv_bytes": kv_bytes,
                                    "default": default, "best": rows[0], "all": rows}
        print(f"{name:<14} default {default['ms'] * 1e3:8.1f} us ({default['gb_s']:6.0f} GB/s)   best "
              f"{rows[0]['ms'] * 1e3:8.1f} us ({rows[0]['gb_s']:6.0f} GB/s) {rows[0]['config']} "
              f"err {rows[0]['max_abs_err']:.1e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_kernel_tuning.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
