"""Scenario 1: batch-1 decode latency, ms/token against the HBM floor, LLaVA-1.5-7B decoder shapes.

Our engine (CUDA-graph decode and eager) and Hugging Face `generate` (dynamic and static cache) on
the same random bf16 weights, created on the GPU, in one run. Inputs 128 and 1024 tokens, outputs
128 and 512, ignore_eos. Decode ms/token excludes the first token: for our engine it is the median
time between a request's tokens after the first; for HF it is (t(N tokens) - t(1 token)) / (N - 1).
The floor is the decoder weight bytes one step reads over the measured device copy bandwidth.
Writes `decode_bs1.json` and `decode_bs1.png` under `--out`, prints a table.

    python benchmarks/bench_decode.py --out benchmarks/results                      # GPU host
    python benchmarks/bench_decode.py --tiny --out /tmp/bench                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from llm_setup import (
    build_engine,
    build_models,
    copy_bandwidth_bytes_per_s,
    decode_weight_bytes,
    environment,
    hf_generate,
    random_prompts,
    release,
    run_engine,
    save_plot,
    write_json,
)

# system name -> (enforce_eager, skinny_gemm); engine_graphs_cublas: every projection on cuBLAS (the
# Triton skinny GEMM off), for the A/B of layers/triton_skinny.py
ENGINE_MODES = {"engine_graphs": (False, True), "engine_eager": (True, True), "engine_graphs_cublas": (False, False)}
# HF's static cache without its automatic torch.compile: with it, our H100 saw a 40 s first call and
# then 280 ms/token from recompiles (performance_anchors.md); the eager static cache measured 39.6 ms.
HF_MODES = {"hf_dynamic": {}, "hf_static": {"cache_implementation": "static", "disable_compile": True}}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def bench_engine(models, mode: str, shapes, repeats: int, block_size: int, attention_backend: str) -> list[dict]:
    max_len = max(i + o for i, o in shapes)
    engine = build_engine(
        models,
        block_size=block_size,
        num_kv_blocks=-(-max_len // block_size) + 8,
        max_num_seqs=1,
        max_num_batched_tokens=max(i for i, _ in shapes),  # the prompt in one prefill step
        enforce_eager=ENGINE_MODES[mode][0],
        skinny_gemm=ENGINE_MODES[mode][1],
        attention_backend=attention_backend,
    )
    rows = []
    vocab = models.config.vocab_size
    try:
        for n, (num_in, num_out) in enumerate(shapes):
            run_engine(engine, random_prompts(1, num_in, vocab, seed=1000 + n), min(num_out, 16), 1)  # warm-up
            runs = [
                run_engine(engine, random_prompts(1, num_in, vocab, seed=2000 + 100 * n + r), num_out, 1)
                for r in range(repeats)
            ]
            rows.append(_row(mode, num_in, num_out, [r["ttft_ms_median"] for r in runs],
                             [r["tpot_ms_median"] for r in runs]))
    finally:
        release(engine)
    return rows


def bench_hf(models, mode: str, shapes, repeats: int) -> list[dict]:
    kwargs = HF_MODES[mode]
    rows = []
    vocab = models.config.vocab_size
    for n, (num_in, num_out) in enumerate(shapes):
        hf_generate(models, random_prompts(1, num_in, vocab, seed=1000 + n), 4, **kwargs)  # warm-up
        ttft, per_token = [], []
        for r in range(repeats):
            prompt = random_prompts(1, num_in, vocab, seed=2000 + 100 * n + r)
            t_one = hf_generate(models, prompt, 1, **kwargs)
            t_all = hf_generate(models, prompt, num_out, **kwargs)
            ttft.append(1e3 * t_one)
            per_token.append(1e3 * (t_all - t_one) / (num_out - 1))
        rows.append(_row(mode, num_in, num_out, ttft, per_token))
    return rows


def _row(system: str, num_in: int, num_out: int, ttft_ms: list[float], ms_per_token: list[float]) -> dict:
    decode = statistics.median(ms_per_token)
    return {
        "system": system, "input": num_in, "output": num_out,
        "ttft_ms": statistics.median(ttft_ms), "decode_ms_per_token": decode, "decode_tok_s": 1e3 / decode,
        "repeats_ms_per_token": ms_per_token,
    }


def write_plot(results: dict, shapes: list[tuple[int, int]], path: Path) -> None:
    rows, floor_ms = results["results"], results["hbm_floor_ms_per_token"]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(dict.fromkeys(r["system"] for r in rows))
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            values = [next((r["decode_ms_per_token"] for r in rows if r["system"] == name
                            and (r["input"], r["output"]) == shape), float("nan")) for shape in shapes]
            ax.bar([x + k * width for x in range(len(shapes))], values, width, label=name)
        ax.axhline(floor_ms, linestyle="--", color="grey", label="HBM floor")
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(shapes))])
        ax.set_xticklabels([f"{i}/{o}" for i, o in shapes])
        ax.set_xlabel("input / output tokens")
        ax.set_ylabel("ms / token (batch 1)")
        ax.set_yscale("log")
        ax.set_title(f"decode latency, {results['model']}, {results['device']}", fontsize=9)
        ax.legend(fontsize=8)
        return fig

    save_plot(path, draw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for decode_bs1.json / .png")
    parser.add_argument("--tiny", action="store_true", help="2-layer model and tiny sizes (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--inputs", default=None, help="prompt lengths (default 128,1024; tiny 16,64)")
    parser.add_argument("--outputs", default=None, help="output lengths (default 128,512; tiny 8,16)")
    parser.add_argument("--systems", default=",".join(["engine_graphs", "engine_eager", *HF_MODES]))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per shape of our engine")
    parser.add_argument("--hf-repeats", type=int, default=1, help="timed runs per shape of each HF mode")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--attention-backend", default="auto", help="our engine's: auto | batched | triton | reference")
    parser.add_argument("--headline", default=None, help="input/output of the summary figure (default: the first)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    inputs = _ints(args.inputs or ("16,64" if args.tiny else "128,1024"))
    outputs = _ints(args.outputs or ("8,16" if args.tiny else "128,512"))
    shapes = [(i, o) for i in inputs for o in outputs]
    systems = [s for s in args.systems.split(",") if s]

    started = time.perf_counter()
    models = build_models(tiny=args.tiny, device=args.device, dtype=dtype)
    bandwidth = copy_bandwidth_bytes_per_s(device, num_bytes=(64 << 20) if args.tiny else (1 << 30))
    weight_bytes = decode_weight_bytes(models.ours)
    floor_ms = 1e3 * weight_bytes / bandwidth
    rows: list[dict] = []
    notes: list[str] = []
    for system in systems:
        if system in ENGINE_MODES:
            if not ENGINE_MODES[system][0] and device.type != "cuda":
                notes.append(f"{system}: skipped, CUDA graphs need a CUDA device")
                continue
            rows += bench_engine(models, system, shapes, args.repeats, args.block_size, args.attention_backend)
        elif system in HF_MODES:
            rows += bench_hf(models, system, shapes, args.hf_repeats)
        else:
            parser.error(f"unknown system {system!r}; choose from {[*ENGINE_MODES, *HF_MODES]}")

    headline_in, headline_out = _ints(args.headline.replace("/", ",")) if args.headline else shapes[0]
    engine_rows = [r for r in rows if r["system"].startswith("engine") and (r["input"], r["output"]) ==
                   (headline_in, headline_out)]
    best = min(engine_rows, key=lambda r: r["decode_ms_per_token"]) if engine_rows else None
    results = {
        "scenario": "decode_bs1",
        **environment(device),
        "model": "tiny 2-layer Llama (smoke run)" if args.tiny else "LLaVA-1.5-7B decoder (Vicuna-7B shapes)",
        "weights": "random, created on the device; HF and our engine share the same tensors",
        "dtype": str(dtype).removeprefix("torch."),
        "attention_backend": args.attention_backend,
        "hf_generate_kwargs": HF_MODES,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "decode_weight_bytes": weight_bytes,
        "hbm_floor_ms_per_token": floor_ms,
        "headline": {
            "shape": f"{headline_in}/{headline_out}",
            "system": best["system"] if best else None,
            "decode_bs1_ms_per_token": best["decode_ms_per_token"] if best else None,
            "hbm_floor_ms_per_token": floor_ms,
        },
        "results": rows,
        "notes": notes,
        "wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "decode_bs1.json", results)

    print(f"{results['device']}  {results['dtype']}  floor {floor_ms:.2f} ms/token "
          f"({weight_bytes / 1e9:.2f} GB at {bandwidth / 1e9:.0f} GB/s copy)")
    print(f"{'system':<15}{'in':>6}{'out':>6}{'TTFT ms':>10}{'ms/token':>10}{'x floor':>9}")
    for r in rows:
        print(f"{r['system']:<15}{r['input']:>6}{r['output']:>6}{r['ttft_ms']:>10.2f}"
              f"{r['decode_ms_per_token']:>10.2f}{r['decode_ms_per_token'] / floor_ms:>9.2f}")
    for note in notes:
        print("note:", note)

    write_plot(results, shapes, args.out / "decode_bs1.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
