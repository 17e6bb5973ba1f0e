"""How long a request with one LLaVA image embedding (576 x 4096 bf16, 4.7 MB) takes to reach the engine
process (`--engine-process`), through the pipe (`shared_memory_mb=0`) and through the frontend's
shared-memory ring (`llm_service/engine/staged_embeddings.py`).

A tiny random llava engine runs in the child, so the add is refused there (the embedding's width is not
the tiny model's): the time measured is `generate()` until that refusal arrives, i.e. pickling, the
transport, unstaging and the check, which is what the embedding adds to a real request's time to first
token. Runs on CPU (no GPU needed); `--ring-mb` lists the ring sizes to try.

    python benchmarks/profile_engine_process_transport.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llm_service.engine.engine_core import EngineConfig, GenerationInput
from llm_service.engine.engine_process import ProcessEngineClient
from llm_service.engine.model_runner import PROMPT_TABLE, MultimodalEmbedding
from vlm_protocol.errors import InvalidArgumentError


async def _time_adds(config: EngineConfig, ring_mb: int, features: torch.Tensor, requests: int) -> dict:
    engine = await asyncio.to_thread(lambda: ProcessEngineClient(config, shared_memory_mb=ring_mb))
    times = []
    try:
        for i in range(requests):
            embedding = MultimodalEmbedding(f"content-{ring_mb}-{i}", PROMPT_TABLE, features)
            inp = GenerationInput(request_id=f"r{ring_mb}-{i}", prompt="<image> hi", embeddings=(embedding,))
            start = time.perf_counter()
            try:
                async for _ in engine.generate(inp):
                    pass
                raise AssertionError("the tiny engine accepted a 4096-wide embedding")
            except InvalidArgumentError:
                times.append((time.perf_counter() - start) * 1e3)
        staged = 0 if engine._stager is None else engine._stager.staged
    finally:
        engine.shutdown()
    timed = times[3:]  # the first requests warm the child's paths
    return {"ring_mb": ring_mb, "median_ms": statistics.median(timed), "max_ms": max(timed),
            "requests": len(timed), "staged_tensors": staged}


async def _run(args: argparse.Namespace) -> dict:
    from vlm_tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint("llava", Path(args.workdir) / "tiny-llava")
    config = EngineConfig(model_dir=str(checkpoint), device="cpu", max_model_len=512)
    features = torch.randn(576, 4096).to(torch.bfloat16)
    points = [await _time_adds(config, mb, features, args.requests) for mb in args.ring_mb]
    for p in points:
        print(f"ring {p['ring_mb']:4d} MiB: {p['median_ms']:6.2f} ms median, {p['max_ms']:6.2f} max "
              f"({p['staged_tensors']} staged)", flush=True)
    return {"bytes": features.numel() * 2, "cpu_count": os.cpu_count(), "points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ring-mb", type=lambda s: [int(x) for x in s.split(",")], default=[0, 256, 32],
                        help="ring sizes in MiB (0: the pipe); default 0,256,32")
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)
    results = asyncio.run(_run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_process_transport.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
