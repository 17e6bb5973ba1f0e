"""Scenario 4: the visual engine alone, LLaVA-1.5 shapes (CLIP ViT-L/14-336 + 2-layer MLP projector).

Random weights of the real architecture, bf16 on the GPU. Times the tower + projector on GPU-resident
pixels (eager and under torch.compile), and the whole `engine.encode()` call (host pixels in, host
embeddings out), at several batch sizes, against the FLOP ceiling of the card. Preprocessing is
excluded. Writes JSON + PNG and prints a table.

    python benchmarks/bench_encoder.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from encoder_service.engines import load_visual_engine
from encoder_service.engines.base import PreparedInput

REPO = Path(__file__).resolve().parents[1]


def make_llava15_vision_checkpoint(directory: Path, device: str) -> None:
    """Config of llava-1.5-7b-hf; weights for the vision tower and projector only (random)."""
    from transformers import CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from vlm_tiny import make_tiny_checkpoint

    tiny = make_tiny_checkpoint("llava", directory / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, directory / name)
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2)
    config.save_pretrained(directory)
    preprocessor = json.loads((tiny / "preprocessor_config.json").read_text())
    preprocessor.update(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with torch.device(device):
        tower = CLIPVisionModel(vision).to(torch.bfloat16)
        projector = LlavaMultiModalProjector(config).to(torch.bfloat16)
    tensors = {f"vision_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    tensors |= {f"multi_modal_projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    save_file({k: v.cpu() for k, v in tensors.items()}, directory / "model.safetensors")


def flops_per_image(tokens: int = 577, hidden: int = 1024, mlp: int = 4096, layers: int = 23) -> float:
    # vision_feature_layer -2: 23 of 24 layers run; projector 1024->4096->4096 on 576 rows
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * tokens * tokens * hidden
    return layers * per_layer + 2 * 576 * (1024 * 4096 + 4096 * 4096)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - start) / iters


def time_encode(engine, batch_size: int, iters: int) -> float:
    """The whole `encode()`: host pixels in, host embeddings out (what the service does)."""
    pixels = torch.randn(batch_size, 3, 336, 336)
    prepared = [PreparedInput("llava", "image", pixels, (1,) * batch_size, (None,) * batch_size)]
    return _timed(lambda: engine.encode(prepared), iters)


@torch.no_grad()
def time_model(engine, batch_size: int, iters: int) -> float:
    """Tower + projector only, pixels and features staying on the GPU."""
    pixels = torch.randn(batch_size, 3, 336, 336, device=engine.device, dtype=engine.dtype)
    return _timed(lambda: engine.compute(pixels), iters)


def measured_matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--batch-sizes", default="1,8,64,128")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run of the script")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        make_llava15_vision_checkpoint(ckpt, args.device)
        engine = load_visual_engine(ckpt, device=args.device, dtype=torch.bfloat16)
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        results = {"device": device_name, "dtype": "bfloat16", "eager": {}, "compiled": {}, "encode_call_eager": {}}
        for bs in batch_sizes:
            results["eager"][bs] = bs / time_model(engine, bs, args.iters)
            results["encode_call_eager"][bs] = bs / time_encode(engine, bs, args.iters)
        if args.device == "cuda":
            engine.compute = torch.compile(engine.compute)
            for bs in batch_sizes:
                results["compiled"][bs] = bs / time_model(engine, bs, args.iters)
    tflops = measured_matmul_tflops() if args.device == "cuda" else float("nan")
    results["measured_bf16_matmul_tflops"] = tflops
    results["flop_ceiling_images_per_s"] = tflops * 1e12 / flops_per_image()

    ceiling = results["flop_ceiling_images_per_s"]
    print(f"model = tower + projector on the GPU; encode() adds host<->device copies (ceiling {ceiling:.0f} img/s)")
    print(f"{'batch':>6} {'model eager':>12} {'model compiled':>15} {'encode() eager':>15}")
    for bs in batch_sizes:
        compiled = results["compiled"].get(bs, float("nan"))
        print(f"{bs:>6} {results['eager'][bs]:>12.1f} {compiled:>15.1f} {results['encode_call_eager'][bs]:>15.1f}")
    (args.out / "encoder_llava15.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in ("eager", "compiled", "encode_call_eager"):
            if results[mode]:
                ax.plot(batch_sizes, [results[mode][b] for b in batch_sizes], marker="o", label=mode)
        ax.axhline(results["flop_ceiling_images_per_s"], linestyle="--", color="grey", label="FLOP ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"CLIP ViT-L/14-336 + projector, bf16, {results['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "encoder_llava15.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
