"""Tune the Triton skinny GEMM (llm_service/layers/triton_skinny.py) against cuBLAS on this GPU.

For the projection shapes of a LLaVA-1.5-7B / Llama-7B decoder (q/k/v, o, gate/up, down, lm_head)
and 1 and 16 input rows, times `F.linear` (cuBLAS) and every config of a small grid of the skinny
kernel over one pass through 32 distinct random weights of each shape (one lm_head), as a decode
step reads them: from HBM, back to back (the same timing as the engine's start-up calibration).
Reports the best configs per row class (geometric-mean speedup over the shapes), the weight read
bandwidth each reaches, and a read-only reference (`torch.sum` over the same weights).
Writes `skinny_gemm_tuning.json` and `.png` under `--out`, prints a table.

    python benchmarks/tune_skinny_gemm.py --out benchmarks/results        # GPU host
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_service.layers.triton_skinny import CANDIDATES, SkinnyConfig, pass_time_us, skinny_matmul

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008), "lm_head": (32064, 4096)}
GRID = {
    1: [SkinnyConfig(n, k, w, s) for n, k, w, s in itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8), (2, 3, 4))],
    16: [SkinnyConfig(n, k, w, s) for n, k, w, s in itertools.product((16, 32, 64), (128, 256), (4, 8), (3, 4, 5))],
}
GRID = {rows: list(dict.fromkeys([*grid, *CANDIDATES[rows]])) for rows, grid in GRID.items()}  # + the shipped ones
LAYERS = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cuda"), torch.bfloat16
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": "bfloat16",
                     "shapes": {k: list(v) for k, v in SHAPES.items()}, "points": [], "best": {}}
    weights = {
        name: [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(1 if name == "lm_head" else LAYERS)]
        for name, (n, k) in SHAPES.items()
    }
    for rows, configs in GRID.items():
        speedups: dict[SkinnyConfig, list[float]] = {c: [] for c in configs}
        for name, group in weights.items():
            w = group[0]
            x = torch.randn(rows, w.shape[1], device=device, dtype=dtype)
            ref = F.linear(x.float(), w.float())
            cublas = pass_time_us(lambda w, x=x: F.linear(x, w), group, args.passes)
            read = pass_time_us(lambda w: w.sum(), group, args.passes)
            point = {"rows": rows, "shape": name, "n": w.shape[0], "k": w.shape[1], "cublas_us": cublas,
                     "sum_us": read, "configs": []}
            for config in configs:
                try:
                    out = skinny_matmul(x, w, None, config)
                    err = float((out.float() - ref).abs().max() / ref.abs().max())
                    us = pass_time_us(lambda w, x=x, c=config: skinny_matmul(x, w, None, c), group, args.passes)
                except Exception as exc:  # a config the compiler rejects (registers, shared memory)
                    point["configs"].append({"config": config.__dict__, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                ok = err < 2e-2
                point["configs"].append({"config": config.__dict__, "us": us, "rel_err": err, "ok": ok})
                if ok:
                    speedups[config].append(cublas / us)
            valid = [c for c in point["configs"] if c.get("ok")]
            best = min(valid, key=lambda c: c["us"]) if valid else None
            gbs = w.numel() * w.element_size() / 1e3
            point["best"] = best
            point["cublas_gb_s"] = gbs / cublas
            point["sum_gb_s"] = gbs / read
            point["best_gb_s"] = gbs / best["us"] if best else None
            results["points"].append(point)
            print(f"rows {rows:2d} {name:8s} cuBLAS {cublas:7.1f} us ({gbs / cublas:6.0f} GB/s)  sum {read:7.1f} us "
                  f"({gbs / read:6.0f} GB/s)  best skinny {best['us'] if best else float('nan'):7.1f} us "
                  f"({point['best_gb_s'] or 0:6.0f} GB/s) {best['config'] if best else ''}", flush=True)
        full = {c: s for c, s in speedups.items() if len(s) == len(SHAPES)}
        if full:
            geo = {c: math.exp(sum(map(math.log, s)) / len(s)) for c, s in full.items()}
            top = sorted(geo, key=geo.get, reverse=True)[:5]
            results["best"][str(rows)] = {
                "top_configs": [{"config": c.__dict__, "geomean_speedup_vs_cublas": geo[c],
                                 "per_shape": dict(zip(SHAPES, full[c], strict=True))} for c in top],
                "candidates": [{"config": c.__dict__, "geomean_speedup_vs_cublas": geo.get(c)} for c in CANDIDATES[rows]],
            }
            for c in top:
                print(f"rows {rows:2d}: {c} geomean x{geo[c]:.3f} vs cuBLAS", flush=True)
            for c in CANDIDATES[rows]:
                print(f"rows {rows:2d}: candidate {c} x{geo.get(c, float('nan')):.3f}", flush=True)
    (args.out / "skinny_gemm_tuning.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / "skinny_gemm_tuning.png")
    return 0


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows in zip(axes, (1, 16), strict=True):
        points = [p for p in results["points"] if p["rows"] == rows]
        names = [p["shape"] for p in points]
        xs = range(len(points))
        for offset, (key, label) in enumerate((("cublas_gb_s", "cuBLAS"), ("best_gb_s", "skinny (best)"), ("sum_gb_s", "torch.sum"))):
            ax.bar([x + 0.27 * offset for x in xs], [p[key] or 0 for p in points], width=0.27, label=label)
        ax.set_xticks([x + 0.27 for x in xs], names)
        ax.set_title(f"{rows} row(s): weight read GB/s ({results['device']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
