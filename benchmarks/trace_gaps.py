"""Where a profiled step leaves the GPU idle: GPU-idle gaps in a torch.profiler Chrome trace, each with
what the host was running at the time.

Reads a trace written by `torch.profiler.profile(...).export_chrome_trace` (e.g. `profile_prefill.py
--trace`) and reports: the traced window (first to last host event), GPU busy time (the union of
kernel, memcpy and memset intervals), the idle time before the first GPU event, after the last one,
and between them, and the longest idle gaps with the innermost host events (Python functions with
`with_stack=True`, else ATen ops) that cover the middle of each gap. A gap during which the host runs
engine code is host-bound time; a gap inside a synchronisation is the GPU waiting for work queued
after it.

    python benchmarks/trace_gaps.py /tmp/prof/trace_prefill_default_image.json --out gaps.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"python_function", "cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"}


def analyze(trace: dict, *, min_gap_us: float = 20.0, top: int = 15) -> dict:
    """The summary described in the module docstring, from a parsed Chrome trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in GPU_CATEGORIES)
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES]
    if not gpu or not host:
        raise ValueError("the trace has no GPU events or no host events")
    start = min(float(e["ts"]) for e in host)
    end = max(float(e["ts"]) + float(e["dur"]) for e in host)
    busy = 0.0
    gaps: list[tuple[float, float]] = []
    cursor = gpu[0][0]
    for begin, finish in gpu:
        if begin > cursor + min_gap_us:
            gaps.append((cursor, begin))
        busy += max(0.0, finish - max(begin, cursor))
        cursor = max(cursor, finish)
    last_gpu = cursor

    def host_context(t: float) -> list[str]:
        covering = [e for e in host if float(e["ts"]) <= t <= float(e["ts"]) + float(e["dur"])]
        covering.sort(key=lambda e: float(e["dur"]))  # innermost first
        return [f"{e['name'][:120]} ({float(e['dur']) / 1e3:.2f} ms)" for e in covering[:4]]

    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:top]
    return {
        "window_ms": (end - start) / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "idle_before_first_gpu_event_ms": (gpu[0][0] - start) / 1e3,
        "idle_after_last_gpu_event_ms": max(0.0, end - last_gpu) / 1e3,
        "idle_gaps_between_ms": sum(b - a for a, b in gaps) / 1e3,
        "gaps_counted": len(gaps),
        "min_gap_us": min_gap_us,
        "host_at_start": host_context(start + 1.0),
        "longest_gaps": [
            {"at_ms": (a - start) / 1e3, "ms": (b - a) / 1e3, "host": host_context((a + b) / 2)} for a, b in longest
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--out", type=Path, help="write the summary here (JSON) too")
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    args = parser.parse_args(argv)
    summary = analyze(json.loads(args.trace.read_text()), min_gap_us=args.min_gap_us)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
