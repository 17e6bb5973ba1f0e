"""Host-side cost of uploading one LLaVA image embedding (576 x 4096 bf16, 4.7 MB) to the GPU, by path.

Each variant times the host call only (median and worst of 18 after 2 warm-ups; the GPU queue is drained
before every call): `to_device` (pin_memory() + non-blocking copy) of a malloc'd tensor and of the
shared-memory reader's private buffers, pin_memory() alone, a pageable `.to()`, a copy into a pinned
buffer kept across calls (what `llm_service.engine.pinned_upload` does), the same after a read in
another thread, and with one torch thread. Also the shared-memory write + read itself.

    python benchmarks/profile_host_upload.py --out benchmarks/results     # ~10 s, needs CUDA
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from llm_service.layers.sampler import to_device
from vlm_protocol.shared_memory import SharedMemoryReader, SharedMemoryRing

ROWS, HIDDEN = 576, 4096


def _timed(fn, calls: int = 20) -> dict[str, float]:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return {"median_ms": statistics.median(times[2:]), "max_ms": max(times[2:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    nbytes = ROWS * HIDDEN * 2
    results: dict = {"device": torch.cuda.get_device_name(), "bytes": nbytes, "torch_threads": torch.get_num_threads()}

    host = torch.randn(ROWS, HIDDEN).to(torch.bfloat16)
    results["randn_to_device"] = _timed(lambda: to_device(host, device))
    results["randn_pin_only"] = _timed(lambda: host.pin_memory())
    results["randn_pageable_to"] = _timed(lambda: host.to(device))

    ring = SharedMemoryRing(512 << 20)
    reader = SharedMemoryReader()
    payload = np.random.randint(0, 255, nbytes, dtype=np.uint8).tobytes()

    def fresh() -> torch.Tensor:  # the LLM service's path: encoder writes a slot, the service reads it
        buffer = reader.read(ring.put(payload), expected_length=nbytes)
        return torch.frombuffer(buffer, dtype=torch.bfloat16).view(ROWS, HIDDEN)

    def many(count: int = 25) -> iter:
        return iter([fresh() for _ in range(count)])

    results["shm_write_and_read"] = _timed(fresh)
    results["shm_read_plus_to_device"] = _timed(lambda: to_device(fresh(), device))
    tables = many()
    results["frombuffer_to_device"] = _timed(lambda: to_device(next(tables), device))
    tables = many()
    results["frombuffer_pin_only"] = _timed(lambda: next(tables).pin_memory())
    tables = many()
    results["frombuffer_clone_then_to_device"] = _timed(lambda: to_device(next(tables).clone(), device))
    tables = many()
    staging = torch.empty(ROWS, HIDDEN, dtype=torch.bfloat16, pin_memory=True)

    def staged() -> None:
        staging.copy_(next(tables))
        staging.to(device, non_blocking=True)

    results["frombuffer_into_pinned_staging"] = _timed(staged)
    read_elsewhere: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: read_elsewhere.extend(fresh() for _ in range(25)))
    worker.start()
    worker.join()
    tables = iter(read_elsewhere)
    results["other_thread_read_then_to_device"] = _timed(lambda: to_device(next(tables), device))
    torch.set_num_threads(1)
    tables = many()
    results["frombuffer_to_device_1thread"] = _timed(lambda: to_device(next(tables), device))
    ring.close()
    reader.close()

    for name, value in results.items():
        if isinstance(value, dict):
            print(f"{name:<36} median {value['median_ms']:7.3f} ms   max {value['max_ms']:7.3f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_host_upload.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
