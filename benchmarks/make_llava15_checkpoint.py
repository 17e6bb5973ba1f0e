"""Write a random-weight checkpoint of LLaVA-1.5-7B's shapes, loadable by both services (no network).

CLIP ViT-L/14-336 vision tower (24 layers, 1024 wide, 576 image tokens), 2-layer GELU projector and a
Vicuna-7B decoder (32 layers, hidden 4096, 32 heads, intermediate 11008, vocab 32064), bf16, in the
Hugging Face `llava-hf/llava-1.5-7b-hf` layout (`save_pretrained`, sharded safetensors). The weights
are created on `--device` (a GPU host: ~14 GB of GPU memory for a moment, ~14 GB on disk). The
tokenizer, chat template and processor files are the tiny llava checkpoint's (`vlm_tiny`, built
locally), with the image processor set to 336 px and patch 14, and the special-token ids taken from
that tokenizer; its 768 ids all lie inside the 32064-row embedding. Text is therefore tokenized into
made-up words, which is all a benchmark with random weights needs.

    python benchmarks/make_llava15_checkpoint.py --out /tmp/llava15-7b-random            # GPU host
    python benchmarks/bench_multimodal.py --model /tmp/llava15-7b-random --out benchmarks/results
    python benchmarks/make_llava15_checkpoint.py --out /tmp/l1 --device cpu --num-layers 1   # quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_checkpoint(out: Path, *, device: str, num_layers: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlm_tiny import make_tiny_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llava15-tiny-") as scratch:
        tiny = make_tiny_checkpoint("llava", Path(scratch) / "llava", seed=seed)
        config = _write_config_files(tiny, out, num_layers)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16 on the device
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    (out / "RANDOM_WEIGHTS.md").write_text(
        "Random bf16 weights of LLaVA-1.5-7B's shapes (benchmarks/make_llava15_checkpoint.py); tiny tokenizer.\n"
    )
    return out


def _write_config_files(tiny: Path, out: Path, num_layers: int):
    """Tokenizer / processor files of the tiny llava, resized for 336 px; config.json of LLaVA-1.5-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tiny_config = json.loads((tiny / "config.json").read_text())
    tiny_text = tiny_config["text_config"]
    for name in COPIED:
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    preprocessor = json.loads((tiny / "preprocessor_config.json").read_text())
    preprocessor.update(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = json.loads((tiny / "processor_config.json").read_text())
    processor.update(patch_size=14)
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")

    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=tiny_text["bos_token_id"], eos_token_id=tiny_text["eos_token_id"],
        pad_token_id=tiny_text["pad_token_id"], tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=tiny_config["image_token_index"], image_seq_length=576, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2, multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.save_pretrained(out)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--device", default=None, help="where the weights are created (default: cuda if any)")
    parser.add_argument("--num-layers", type=int, default=32, help="decoder layers (32 = Vicuna-7B)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    out = make_checkpoint(args.out, device=device, num_layers=args.num_layers, seed=args.seed)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e9:.2f} GB of safetensors) in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
