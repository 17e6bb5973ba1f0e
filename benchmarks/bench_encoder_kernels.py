"""The visual engine's kernels alone, at CLIP ViT-L/14-336 shapes (LLaVA-1.5): what each candidate fast
path saves before it goes into the tower.

Parts (each checked against the path it would replace, then timed; CUDA events, median of --iters
calls after warm-up):
  mlp_fc1     `act(x @ W1.T + b1)` for x [B * 577, 1024], W1 [4096, 1024], QuickGELU: cuBLAS linear +
              Inductor's activation kernel (torch.compile of the pair, what the compiled tower runs),
              cuBLAS alone (the GEMM's floor), and the fused Triton kernel
              (benchmarks/triton_linear_experiment.py) with each candidate config
  patch       the 14x14/14 patch convolution (cuDNN) against `PatchLinear` (unfold + one GEMM), eager
              and compiled, on bf16 pixels [B, 3, 336, 336]
  attention   SDPA over the fused q/k/v layout ([B, 577, 3, 16, 64] views) with each backend

    python benchmarks/bench_encoder_kernels.py --out /tmp/out --batch-sizes 64,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_encoder import time_calls  # noqa: E402
from triton_linear_experiment import (  # noqa: E402
    CANDIDATES,
    LinearConfig,
    linear_activation,
    linear_activation_tma,
)

from encoder_service.engines.patch_embedding import PatchLinear  # noqa: E402

TOKENS, HIDDEN, INTERMEDIATE, HEADS, PATCH, IMAGE = 577, 1024, 4096, 16, 14, 336


def time_ms(fn, iters: int) -> float:
    return statistics.median(time_calls(fn, iters, torch.device("cuda")))


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float()).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "ref_max_abs": float(ref.float().abs().max()),
    }


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def bench_mlp_fc1(batch: int, iters: int) -> dict:
    rows = batch * TOKENS
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) / 32
    b = torch.randn(INTERMEDIATE, device="cuda", dtype=torch.bfloat16) / 8
    compiled = torch.compile(lambda t: quick_gelu(F.linear(t, w, b)), dynamic=False)
    reference = compiled(x)
    flops = 2 * rows * HIDDEN * INTERMEDIATE
    result = {"rows": rows, "gflop": flops / 1e9}
    result["cublas_plus_compiled_act_ms"] = time_ms(lambda: compiled(x), iters)
    result["cublas_linear_only_ms"] = time_ms(lambda: F.linear(x, w, b), iters)
    act_in = F.linear(x, w, b)
    act_only = torch.compile(quick_gelu, dynamic=False)
    result["compiled_act_only_ms"] = time_ms(lambda: act_only(act_in), iters)
    triton_results = {}
    for config in CANDIDATES:
        try:
            out = linear_activation(x, w, b, "quick_gelu", config)
            ms = time_ms(lambda c=config: linear_activation(x, w, b, "quick_gelu", c), iters)
            triton_results[config.label()] = {"ms": ms, "tflops": flops / ms / 1e9, **compare(out, reference)}
        except Exception as exc:  # a config that does not fit this GPU's shared memory
            triton_results[config.label()] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result["triton_fused"] = triton_results
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tma_results = {}
    configs = (*CANDIDATES, LinearConfig(128, 128, 128, 8, 8, 3), LinearConfig(128, 256, 64, 4, 8, 4))
    for config in configs:
        tiles = triton_cdiv(rows, config.block_m) * triton_cdiv(INTERMEDIATE, config.block_n)
        for mode, kwargs in (
            ("persistent", {"num_programs": sms}),
            ("persistent_ws", {"num_programs": sms, "warp_specialize": True}),
            ("one_tile_per_program", {"num_programs": tiles}),
        ):
            label = f"{config.label()} {mode}"
            try:
                out = linear_activation_tma(x, w, b, "quick_gelu", config, **kwargs)
                ms = time_ms(
                    lambda c=config, k=kwargs: linear_activation_tma(x, w, b, "quick_gelu", c, **k), iters
                )
                tma_results[label] = {"ms": ms, "tflops": flops / ms / 1e9, **compare(out, reference)}
            except Exception as exc:
                tma_results[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(label, tma_results[label].get("ms"), tma_results[label].get("tflops"), flush=True)
    result["triton_tma_fused"] = tma_results
    timed = [(v["ms"], k) for k, v in tma_results.items() if "ms" in v and v["max_abs_diff"] <= 0.0625]
    if timed:
        best_ms, best = min(timed)
        result["best_tma"] = {"variant": best, "ms": best_ms}
    result["cublas_tflops"] = flops / result["cublas_linear_only_ms"] / 1e9
    return result


def bench_patch(batch: int, iters: int) -> dict:
    conv = nn.Conv2d(3, HIDDEN, PATCH, PATCH, bias=False).cuda().to(torch.bfloat16).eval()
    linear = PatchLinear(conv)
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, device="cuda", dtype=torch.bfloat16)
    result = {}
    with torch.no_grad():
        reference = conv(pixels)
        result["conv_eager_ms"] = time_ms(lambda: conv(pixels), iters)
        result["patch_linear_eager_ms"] = time_ms(lambda: linear(pixels), iters)
        result["patch_linear_eager_check"] = compare(linear(pixels), reference)
        # as the tower uses it: followed by flatten + transpose into [B, patches, hidden]
        conv_c = torch.compile(lambda p: conv(p).flatten(2).transpose(1, 2).contiguous(), dynamic=False)
        lin_c = torch.compile(lambda p: linear(p).flatten(2).transpose(1, 2).contiguous(), dynamic=False)
        result["conv_compiled_ms"] = time_ms(lambda: conv_c(pixels), iters)
        result["patch_linear_compiled_ms"] = time_ms(lambda: lin_c(pixels), iters)
        result["patch_linear_compiled_check"] = compare(lin_c(pixels), conv_c(pixels))
    return result


def bench_attention(batch: int, iters: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    head_dim = HIDDEN // HEADS
    qkv = torch.randn(batch, TOKENS, 3, HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, tokens, head_dim], strided
    flops = 4 * batch * HEADS * TOKENS * TOKENS * head_dim
    result = {"gflop": flops / 1e9}
    reference = None
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), iters)
            reference = out if reference is None else reference
            result[name] = {"ms": ms, "tflops": flops / ms / 1e9, **compare(out, reference)}
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="64,8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--parts", default="mlp_fc1,patch,attention")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "shapes": "CLIP ViT-L/14-336: 577 tokens, hidden 1024, MLP 4096, 16 heads of 64",
    }
    parts = {"mlp_fc1": bench_mlp_fc1, "patch": bench_patch, "attention": bench_attention}
    for part in args.parts.split(","):
        results[part] = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            results[part][str(batch)] = parts[part](batch, args.iters)
            print(part, batch, json.dumps(results[part][str(batch)], indent=1), flush=True)
    results["elapsed_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder_kernels.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
