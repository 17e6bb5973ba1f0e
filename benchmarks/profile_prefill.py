"""Where the LLM side of an image request's time to first token goes, engine only (no gRPC).

Loads a checkpoint directory through the service's own path (`EngineCore(EngineConfig(model_dir))`,
e.g. the LLaVA-1.5-7B-shaped one `make_llava15_checkpoint.py` writes) and, for each case, times
`add_request` (tokenize + embedding upload) and the `engine.step()` calls up to the first token:

* `image`: a prompt with one image (a fresh random `[576, hidden]` prompt table each time) + text;
* `image_repeat`: the same prompt and content id again (prefix-cache hit: only the tail is computed);
* `text`: a text-only prompt of the same length.

It also records one `image` prefill under torch.profiler (kernels by GPU time, and GPU busy time
against the wall time of the step) so host overhead and GPU work can be told apart.

    python benchmarks/profile_prefill.py --model /tmp/llava15-7b --out /tmp/prof
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
import uuid
from pathlib import Path

import torch

from llm_service.engine.engine_core import EngineConfig, EngineCore, GenerationInput
from llm_service.engine.model_runner import PROMPT_TABLE, MultimodalEmbedding
from llm_service.engine.sampling_params import SamplingParams

QUESTION = (
    "the picture shows a small red house near green river under blue sky with white clouds and tall trees"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_token(engine: EngineCore, inp: GenerationInput, device: torch.device) -> dict:
    """Add one request, step until its first token; returns the phase timings (ms)."""
    _sync(device)
    t0 = time.perf_counter()
    request = engine.add_request(inp)
    t1 = time.perf_counter()
    steps = []
    while True:
        s0 = time.perf_counter()
        outputs = engine.step()
        steps.append(1e3 * (time.perf_counter() - s0))
        if any(o.request_id == inp.request_id and o.new_token_ids for o in outputs):
            break
    t2 = time.perf_counter()
    engine.abort(inp.request_id)
    while engine.has_unfinished_requests():
        engine.step()
    _sync(device)
    return {
        "add_request_ms": 1e3 * (t1 - t0),
        "steps_ms": steps,
        "to_first_token_ms": 1e3 * (t2 - t0),
        "prompt_tokens": len(request.prompt_token_ids),
        "cached_tokens": request.num_cached_prompt_tokens,
    }


def _image_input(engine: EngineCore, content_id: str, features: torch.Tensor) -> GenerationInput:
    embedding = MultimodalEmbedding(content_id, PROMPT_TABLE, features)
    return GenerationInput(
        f"img-{uuid.uuid4().hex[:8]}",
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        embeddings=(embedding,),
        sampling=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    )


def _summary(runs: list[dict]) -> dict:
    return {
        "to_first_token_ms_p50": statistics.median(r["to_first_token_ms"] for r in runs),
        "add_request_ms_p50": statistics.median(r["add_request_ms"] for r in runs),
        "steps": [len(r["steps_ms"]) for r in runs],
        "step_ms_p50": [
            statistics.median(r["steps_ms"][i] for r in runs)
            for i in range(min(len(r["steps_ms"]) for r in runs))
        ],
        "prompt_tokens": runs[0]["prompt_tokens"],
        "cached_tokens": runs[0]["cached_tokens"],
    }


def _profile_image(
    engine: EngineCore, features: torch.Tensor, device: torch.device, out: Path, tag: str,
    content_id: str | None = None, trace: bool = False,
) -> dict:
    """One image prompt's first token under torch.profiler (`content_id` of an earlier request: the
    repeat). `trace` also writes the Chrome trace, for the host timeline against the kernels."""
    inp = _image_input(engine, content_id or f"prof-{uuid.uuid4().hex}", features)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    with torch.profiler.profile(activities=activities, with_stack=trace) as prof:
        t0 = time.perf_counter()
        timing = _first_token(engine, inp, device)
        wall = 1e3 * (time.perf_counter() - t0)
    if trace:
        prof.export_chrome_trace(str(out / f"trace_prefill_{tag}.json"))
    events = prof.key_averages()
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out / f"profile_prefill_{tag}_kernels.txt").write_text(
        events.table(sort_by=sort_key, row_limit=40, max_name_column_width=80)
    )
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"wall_ms_profiled": wall, "gpu_kernel_ms": gpu_us / 1e3, "kernels": kernels, "timing": timing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (make_llava15_checkpoint.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--image-rows", type=int, default=576)
    parser.add_argument(
        "--variants", default="default", help="comma list: default, eager (enforce_eager), batched, cublas (no skinny GEMM)"
    )
    parser.add_argument("--trace", action="store_true", help="also write Chrome traces (with Python stacks) of an "
                        "image and a repeat prefill, and cProfiles of both")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "variants": {},
    }
    for variant in args.variants.split(","):
        extra = {
            "default": {},
            "eager": {"enforce_eager": True},
            "batched": {"attention_backend": "batched"},
            "cublas": {"skinny_gemm": False},
        }[variant]
        engine = EngineCore(
            EngineConfig(model_dir=args.model, device=args.device, num_kv_blocks=4096, **extra)
        )

        def make(rows=args.image_rows, hidden=engine.hidden_size, dtype=engine.config.torch_dtype):
            return torch.randn(rows, hidden, dtype=dtype) * 0.02  # a host tensor, as the service gets it

        # warm-up: every path once
        for _ in range(2):
            feats = make()
            inp = _image_input(engine, f"warm-{uuid.uuid4().hex}", feats)
            _first_token(engine, inp, device)
            _first_token(engine, _image_input(engine, inp.embeddings[0].content_id, feats), device)
        image, repeat, text = [], [], []
        for _ in range(args.runs):
            feats = make()
            cid = f"img-{uuid.uuid4().hex}"
            image.append(_first_token(engine, _image_input(engine, cid, feats), device))
            repeat.append(_first_token(engine, _image_input(engine, cid, feats), device))
            n = image[-1]["prompt_tokens"]
            ids = torch.randint(10, engine.vocab_size - 1, (n,)).tolist()
            text.append(
                _first_token(
                    engine,
                    GenerationInput(
                        f"txt-{uuid.uuid4().hex[:8]}",
                        prompt_token_ids=ids,
                        sampling=SamplingParams(max_tokens=16, ignore_eos=True),
                    ),
                    device,
                )
            )
        point = {
            "image": _summary(image),
            "image_repeat": _summary(repeat),
            "text": _summary(text),
            "attention_backend": engine.runner.attention_backend,
            "cuda_graphs": engine.config.use_cuda_graphs,
        }
        point["profile_image"] = _profile_image(engine, make(), device, args.out, variant)
        if args.trace:
            feats, cid = make(), f"trace-{uuid.uuid4().hex}"
            point["trace_image"] = _profile_image(engine, feats, device, args.out, f"{variant}_image", cid, True)
            point["trace_repeat"] = _profile_image(engine, feats, device, args.out, f"{variant}_repeat", cid, True)
            for tag, content_id, rows in (("repeat", cid, feats), ("image", f"host-{uuid.uuid4().hex}", make())):
                host = cProfile.Profile()
                host.enable()
                _first_token(engine, _image_input(engine, content_id, rows), device)
                host.disable()
                text = io.StringIO()
                pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(50)
                (args.out / f"profile_prefill_{variant}_{tag}_host.txt").write_text(text.getvalue())
        results["variants"][variant] = point
        print(variant, json.dumps({k: v for k, v in point.items() if k != "profile_image"}), flush=True)
        print(
            variant,
            "profiled image prefill:",
            {k: v for k, v in point["profile_image"].items() if k != "timing"},
            flush=True,
        )
        del engine
        torch.cuda.empty_cache() if device.type == "cuda" else None
    (args.out / "profile_prefill.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
