"""Prefill attention micro-benchmark: the Triton paged prefill kernel against the batched SDPA path.

One attention layer over a paged KV cache (Vicuna-7B / LLaVA-1.5-7B shape by default: 32 heads, 32 KV
heads, head dim 128, 16-token blocks drawn at random from the pool, bf16), every sequence a prefill
chunk whose K/V are already in the cache. Shapes: one LLaVA image prompt (623 queries), 256 x 128,
8 x 2048, 4 chunks of 512 queries after a 1536-token cached prefix, 1 x 4096. Variants:

* `batched`      the `batched` backend: padded gather of K/V + SDPA with a boolean causal mask
* `triton`       the `triton` backend: `triton_prefill.paged_prefill_attention` reading blocks in place
* `varlen`       `torch.nn.attention.varlen.varlen_attn` with `block_table` (flash attention over the
                 paged cache), where the installed torch has it; otherwise recorded as unavailable
* `sdpa_causal`  `F.scaled_dot_product_attention(is_causal=True)` on contiguous K/V, sequences of one
                 length batched: a flash lower bound (shapes without a cached prefix only; the K/V
                 copy and the output layout change are not timed)

Each variant is first checked against `paged_attention_reference` in fp32 (max abs diff), then timed
per layer call with CUDA events (warm-up excluded, median of `--iters`), metadata built once outside
the timing as the engine does once per step (its host time is recorded separately). A small sweep of
`PrefillKernelConfig` launch shapes runs the kernel alone. Writes JSON to `--out` and a PNG next to it,
prints a table.

    python benchmarks/bench_prefill_attention.py                       # H100: about 2 minutes
    python benchmarks/bench_prefill_attention.py --device cpu --tiny --out /tmp/prefill.json  # smoke run
    TRITON_INTERPRET=1 python benchmarks/bench_prefill_attention.py --device cpu --tiny --out /tmp/p.json

On CPU the Triton variants are skipped unless TRITON_INTERPRET=1 (the interpreter: slow, fp32 only).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_service.layers.attention import (
    AttentionMetadata,
    padded_block_tables,
    paged_attention,
    paged_attention_reference,
)

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("batched", "triton", "varlen", "sdpa_causal")
# name -> (sequences, queries per sequence, cached prefix per sequence)
SHAPES = {
    "1x623": (1, 623, 0),
    "256x128": (256, 128, 0),
    "8x2048": (8, 2048, 0),
    "4x512_prefix1536": (4, 512, 1536),
    "1x4096": (1, 4096, 0),
}
TINY_SHAPES = {"1x37": (1, 37, 0), "3x16": (3, 16, 0), "2x20_prefix9": (2, 20, 9)}
# (block_m, block_n, num_warps, num_stages); the first is the kernel's default. None of these spills
# registers for head dim 128 in bf16 on sm_90 (ptxas; 128-row tiles on 4 warps do)
SWEEP = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)]


def _can_run_triton(device: torch.device) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "unavailable: triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "skipped: not on CUDA (set TRITON_INTERPRET=1 to run the interpreter)"
    return True, ""


def _config(sweep_entry: tuple[int, int, int, int]):
    from llm_service.layers.triton_prefill import PrefillKernelConfig

    block_m, block_n, num_warps, num_stages = sweep_entry
    return PrefillKernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def _label(sweep_entry: tuple[int, int, int, int]) -> str:
    return "m{}_n{}_w{}_s{}".format(*sweep_entry)


def _make_case(shape: tuple[int, int, int], args, device: torch.device, dtype: torch.dtype) -> dict:
    num_seqs, query_len, prefix_len = shape
    seq_len = prefix_len + query_len
    blocks_per_seq = -(-seq_len // args.block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    tables = (
        torch.randperm(num_blocks, generator=gen)[: num_seqs * blocks_per_seq].view(num_seqs, -1).tolist()
    )
    cache_shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    return {
        "query_lens": [query_len] * num_seqs,
        "seq_lens": [seq_len] * num_seqs,
        "tables": tables,
        "k_cache": torch.randn(cache_shape, generator=gen).to(device, dtype),
        "v_cache": torch.randn(cache_shape, generator=gen).to(device, dtype),
        "query": torch.randn(num_seqs * query_len, args.heads, args.head_dim, generator=gen).to(
            device, dtype
        ),
        "scale": args.head_dim**-0.5,
    }


def _build(case: dict, args, device: torch.device, backend: str) -> AttentionMetadata:
    return AttentionMetadata.build(
        query_lens=case["query_lens"],
        seq_lens=case["seq_lens"],
        block_tables=case["tables"],
        block_size=args.block_size,
        device=device,
        backend=backend,
    )[0]


def _varlen_variant(case: dict, args, device: torch.device) -> Callable | str:
    """`varlen_attn` over the paged cache, or why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"unavailable: torch {torch.__version__} has no torch.nn.attention.varlen"
    if "block_table" not in inspect.signature(varlen_attn).parameters:
        return f"unavailable: torch {torch.__version__} varlen_attn takes no block_table"
    if device.type != "cuda":
        return "unavailable: varlen_attn needs CUDA"
    q_lens = torch.tensor(case["query_lens"], dtype=torch.int32)
    seq_lens = torch.tensor(case["seq_lens"], dtype=torch.int32)
    cu_q = torch.nn.functional.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0)).to(device)
    cu_k = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0)).to(device)
    seqused_k = seq_lens.to(device)
    block_table = padded_block_tables(case["tables"]).to(device, torch.int32)
    max_q, max_k = max(case["query_lens"]), max(case["seq_lens"])
    query, k_cache, v_cache = case["query"], case["k_cache"], case["v_cache"]
    gqa = query.shape[1] != k_cache.shape[2]
    return lambda: varlen_attn(
        query,
        k_cache,
        v_cache,
        cu_q,
        cu_k,
        max_q,
        max_k,
        scale=case["scale"],
        window_size=(-1, 0),
        enable_gqa=gqa,
        seqused_k=seqused_k,
        block_table=block_table,
    )


def _sdpa_variant(case: dict, args) -> tuple[Callable, Callable] | str:
    """(timed call, its output as [T, Hq, D]) for SDPA's causal kernel on contiguous K/V, or why not."""
    if any(q != s for q, s in zip(case["query_lens"], case["seq_lens"], strict=True)):
        return "n/a: a cached prefix (is_causal aligns the mask top-left)"
    if len(set(case["query_lens"])) != 1:
        return "n/a: ragged lengths"
    num_seqs, length = len(case["query_lens"]), case["query_lens"][0]
    num_heads, num_kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    blocks = torch.tensor(case["tables"], device=case["k_cache"].device).reshape(-1)

    def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, L, D]
        keys = cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)[:, :length]
        return keys.transpose(1, 2).contiguous()

    k, v = contiguous(case["k_cache"]), contiguous(case["v_cache"])
    q = (
        case["query"].view(num_seqs, length, num_heads, head_dim).transpose(1, 2).contiguous()
    )  # [B, Hq, L, D]
    gqa = num_heads != num_kv_heads

    def call() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=case["scale"], enable_gqa=gqa)

    def as_rows() -> torch.Tensor:
        return call().transpose(1, 2).reshape(num_seqs * length, num_heads, head_dim)

    return call, as_rows


def _time_ms(fn: Callable, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _host_ms(fn: Callable, device: torch.device, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _measure(
    fn: Callable, check: Callable, truth: torch.Tensor, flops: float, tolerance: float, args, device
) -> dict:
    try:
        diff = float((check().float() - truth).abs().max())
    except Exception as exc:  # a backend that rejects this shape: record it, go on
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    times = _time_ms(fn, device, args.warmup, args.iters)
    ms = statistics.median(times)
    return {
        "status": "ok" if diff <= tolerance else "mismatch",
        "max_abs_diff": diff,
        "ms": ms,
        "min_ms": min(times),
        "tflops": flops / (ms * 1e-3) / 1e12,
    }


def run_shape(name: str, shape: tuple[int, int, int], args, device: torch.device, dtype: torch.dtype) -> dict:
    case = _make_case(shape, args, device, dtype)
    num_seqs, query_len, prefix_len = shape
    query, k_cache, v_cache, scale = case["query"], case["k_cache"], case["v_cache"], case["scale"]
    # query j of a sequence sees prefix + j + 1 keys; 2 FLOPs per multiply-add, QK^T and PV
    pairs = num_seqs * (query_len * prefix_len + query_len * (query_len + 1) // 2)
    flops = 4.0 * pairs * args.heads * args.head_dim
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    ref_meta = _build(case, args, device, "reference")
    truth = paged_attention_reference(query.float(), k_cache.float(), v_cache.float(), ref_meta, scale)
    row: dict = {
        "num_seqs": num_seqs,
        "query_len": query_len,
        "prefix_len": prefix_len,
        "num_tokens": len(query),
        "attended_pairs": pairs,
        "variants": {},
        "metadata_host_ms": {},
    }
    variants = row["variants"]

    batched_meta = _build(case, args, device, "batched")
    row["metadata_host_ms"]["batched"] = _host_ms(lambda: _build(case, args, device, "batched"), device)
    batched = lambda: paged_attention(query, k_cache, v_cache, batched_meta, scale)  # noqa: E731
    variants["batched"] = _measure(batched, batched, truth, flops, tolerance, args, device)

    can_triton, why_not = _can_run_triton(device)
    if can_triton:
        from llm_service.layers.triton_prefill import DEFAULT_CONFIG, paged_prefill_attention

        assert _config(SWEEP[0]) == DEFAULT_CONFIG, "SWEEP[0] is the default the triton variant runs"

        triton_meta = _build(case, args, device, "triton")
        block_q = _config(SWEEP[0]).block_m // (args.heads // args.kv_heads)
        row["metadata_host_ms"]["triton"] = _host_ms(
            lambda: _build(case, args, device, "triton").prefill.tiles(block_q), device
        )
        fn = lambda: paged_attention(query, k_cache, v_cache, triton_meta, scale)  # noqa: E731
        variants["triton"] = _measure(fn, fn, truth, flops, tolerance, args, device)
        row["sweep"] = {}
        out = torch.empty_like(query)
        for entry in SWEEP if args.sweep else SWEEP[:1]:
            config = _config(entry)
            fn = lambda config=config: paged_prefill_attention(  # noqa: E731
                query, k_cache, v_cache, triton_meta.prefill, scale, out=out, config=config
            )
            row["sweep"][_label(entry)] = _measure(fn, fn, truth, flops, tolerance, args, device)
        timed = {label: r["ms"] for label, r in row["sweep"].items() if r["status"] == "ok"}
        row["best_config"] = min(timed, key=timed.get) if timed else None
    else:
        variants["triton"] = {"status": why_not.split(":")[0], "reason": why_not}

    varlen = _varlen_variant(case, args, device)
    if isinstance(varlen, str):
        variants["varlen"] = {"status": varlen.split(":")[0], "reason": varlen}
    else:
        variants["varlen"] = _measure(varlen, varlen, truth, flops, tolerance, args, device)

    sdpa = _sdpa_variant(case, args)
    if isinstance(sdpa, str):
        variants["sdpa_causal"] = {"status": sdpa.split(":")[0], "reason": sdpa}
    else:
        variants["sdpa_causal"] = _measure(sdpa[0], sdpa[1], truth, flops, tolerance, args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def write_plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return False
    shapes = list(results["shapes"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(VARIANTS)
    for k, variant in enumerate(VARIANTS):
        values = [results["shapes"][s]["variants"][variant].get("ms", float("nan")) for s in shapes]
        ax.bar([x + k * width for x in range(len(shapes))], values, width, label=variant)
    ax.set_xticks([x + width * (len(VARIANTS) - 1) / 2 for x in range(len(shapes))])
    ax.set_xticklabels(shapes, fontsize=8)
    ax.set_xlabel("sequences x queries (cached prefix)")
    ax.set_ylabel("ms per layer call (median)")
    ax.set_yscale("log")
    ax.set_title(
        f"prefill attention, Hq={results['heads']} Hkv={results['kv_heads']} D={results['head_dim']} "
        f"page {results['block_size']} {results['dtype']}, {results['device']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_table(results: dict) -> None:
    print(
        f"{results['device']} {results['dtype']}  Hq={results['heads']} Hkv={results['kv_heads']} "
        f"D={results['head_dim']} page {results['block_size']}  ms per layer call, median (TFLOP/s)"
    )
    print(f"{'shape':<18}" + "".join(f"{v:>20}" for v in VARIANTS) + f"{'best config (ms)':>26}")
    for name, row in results["shapes"].items():
        cells = []
        for variant in VARIANTS:
            r = row["variants"][variant]
            mark = "" if r["status"] == "ok" else "!"
            cells.append(f"{r['ms']:>9.3f}{mark} ({r['tflops']:6.1f})" if "ms" in r else f"{r['status']:>20}")
        best = row.get("best_config")
        best_cell = f"{best} {row['sweep'][best]['ms']:.3f}" if best else "-"  # the kernel alone
        print(f"{name:<18}" + "".join(f"{c:>20}" for c in cells) + f"{best_cell:>26}")
    notes: dict[str, str] = {}  # one line per distinct reason a variant has no timing or a mismatch
    for name, row in results["shapes"].items():
        for variant, r in [*row["variants"].items(), *row.get("sweep", {}).items()]:
            if r["status"] == "mismatch":
                notes[f"{name} {variant}"] = (
                    f"{name} {variant}: MISMATCH, max abs diff {r['max_abs_diff']:.3g}"
                )
            elif r["status"] != "ok":
                notes.setdefault(f"{variant} {r['reason']}", f"{variant}: {r['reason']}")
    for note in notes.values():
        print(f"  {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "prefill_attention.json",
        help="JSON path; the PNG goes next to it",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and heads (CPU smoke run)")
    parser.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default 32; tiny 4)")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 32; tiny 2)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128; tiny 64")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--iters", type=int, default=None, help="timed calls per variant (default 30; tiny 2)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; tiny 1)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="time the default config only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = {name: {**SHAPES, **TINY_SHAPES}[name] for name in args.shapes.split(",")}
    args.heads = args.heads or (4 if args.tiny else 32)
    args.kv_heads = args.kv_heads or (2 if args.tiny else 32)
    args.head_dim = args.head_dim or (64 if args.tiny else 128)
    args.iters = args.iters or (2 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "dtype": str(dtype).removeprefix("torch."),
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "sweep_configs": [_label(entry) for entry in (SWEEP if args.sweep else SWEEP[:1])],
        "default_config": _label(SWEEP[0]),
        "shapes": {},
    }
    with torch.inference_mode():
        for name, shape in shapes.items():
            results["shapes"][name] = run_shape(name, shape, args, device, dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    write_plot(results, args.out.with_suffix(".png"))
    print_table(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
