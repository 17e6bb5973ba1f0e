"""Where the LLM service's read of a shared-memory embedding goes: ms per read of a fresh slot
(LLaVA-1.5's 576 x 4096 bf16 prompt table, 4.7 MB), in four variants of the two costs a read can
pay besides the copy itself:

* `populate`: the reader maps the region with MAP_POPULATE (every page mapped once, at open) instead of
  faulting each 4 KiB page of a slot in on its first read;
* `huge_pages`: the private copy goes into an anonymous mapping advised to use transparent huge pages
  instead of a bytearray (whose fresh pages are zero-filled one 4 KiB fault at a time).

`reader` is `SharedMemoryReader.read` as shipped: since session 10 its private copy comes from
`vlm_protocol.host_buffers` (buffers faulted in ahead of time by a background thread). Each variant
reads `--reads` slots the ring has never handed to it (the writer advances through the region),
`--gap-ms` apart (untimed: the time between requests, in which the spares are refilled; 0 = back to
back), after torch and CUDA are initialised, as in the service process.

    python benchmarks/profile_shm_read.py --out /tmp/shm      # writes profile_shm_read.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from pathlib import Path

from vlm_protocol.host_buffers import fresh_buffer
from vlm_protocol.shared_memory import SharedMemoryReader, SharedMemoryRing


def _variant_ms(
    ring: SharedMemoryRing, payload: bytes, reads: int, gap_s: float, populate: bool, huge_pages: bool
) -> list[float]:
    fd = os.open(ring.path, os.O_RDONLY)
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    region = mmap.mmap(fd, ring.size_bytes, flags, mmap.PROT_READ)
    view, times, keep = memoryview(region), [], []
    try:
        for _ in range(reads):
            slice_ = ring.put(payload)
            time.sleep(gap_s)
            start = time.perf_counter()
            data = fresh_buffer(slice_.length) if huge_pages else bytearray(slice_.length)
            data[:] = view[slice_.offset : slice_.offset + slice_.length]
            times.append(1e3 * (time.perf_counter() - start))
            keep.append(data)  # held, as the embedding cache holds them: no reuse of freed pages
    finally:
        view.release()
        region.close()
        os.close(fd)
    return times


def _reader_ms(ring: SharedMemoryRing, payload: bytes, reads: int, gap_s: float) -> list[float]:
    reader, times, keep = SharedMemoryReader(), [], []
    try:
        reader.read(ring.put(payload))  # opens the mapping: once per region
        for _ in range(reads):
            slice_ = ring.put(payload)
            time.sleep(gap_s)
            start = time.perf_counter()
            keep.append(reader.read(slice_, expected_length=len(payload)))
            times.append(1e3 * (time.perf_counter() - start))
    finally:
        reader.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bytes", type=int, default=576 * 4096 * 2)
    parser.add_argument("--reads", type=int, default=40)
    parser.add_argument("--region-mb", type=int, default=512)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="untimed pause before each read")
    args = parser.parse_args(argv)
    try:
        import torch

        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")  # a process like the service's: CUDA context, large heap
    except ImportError:
        pass
    payload = os.urandom(args.bytes)
    gap_s = args.gap_ms / 1e3
    results: dict = {"bytes": args.bytes, "reads": args.reads, "region_mb": args.region_mb, "gap_ms": args.gap_ms,
                     "variants": {}}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    results["transparent_hugepage"] = thp.read_text().strip() if thp.exists() else None
    for name, populate, huge in (("neither", False, False), ("populate", True, False),
                                 ("huge_pages", False, True), ("both", True, True)):
        with SharedMemoryRing(args.region_mb << 20) as ring:
            started = time.perf_counter()
            times = _variant_ms(ring, payload, args.reads, gap_s, populate, huge)
            results["variants"][name] = {"median_ms": statistics.median(times), "max_ms": max(times),
                                         "wall_s": time.perf_counter() - started}
    with SharedMemoryRing(args.region_mb << 20) as ring:
        times = _reader_ms(ring, payload, args.reads, gap_s)
        results["variants"]["reader"] = {"median_ms": statistics.median(times), "max_ms": max(times)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_shm_read.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
