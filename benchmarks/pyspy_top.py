"""Where a py-spy speedscope profile's busy time goes: per thread, the heaviest call-stack tails.

`bench_multimodal.py --py-spy DIR` writes one speedscope file per service; this reads one and prints,
for each thread (or those whose name contains `--thread`), the sampled seconds and the `--top` stack
tails (last `--depth` frames) that are not idle waits (`--idle` frames: an epoll wait, a CUDA event
wait, a blocking queue read).

    python benchmarks/pyspy_top.py DIR/llm_c1_out16.speedscope.json --thread engine
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

DEFAULT_IDLE = ("EpollSelector.select", "Event.synchronize", "AsyncLLMEngine._apply_commands", "_worker")


def top_stacks(
    profile_path: Path, thread: str = "", depth: int = 4, top: int = 12, idle: tuple[str, ...] = DEFAULT_IDLE
) -> list[dict]:
    """Per matching thread: {"thread", "seconds", "busy_seconds", "stacks": [("a > b > c", seconds), ...]}."""
    data = json.loads(profile_path.read_text())
    frames = data["shared"]["frames"]
    report = []
    for profile in data["profiles"]:
        if thread not in profile["name"]:
            continue
        tails: collections.Counter[str] = collections.Counter()
        busy = 0.0
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            names = [f"{frames[i]['name']}:{frames[i].get('line', '')}" for i in stack]
            if any(name.split(":")[0] in idle for name in names):
                continue
            busy += weight
            tails[" > ".join(names[-depth:])] += weight
        report.append({
            "thread": profile["name"],
            "seconds": sum(profile["weights"]),
            "busy_seconds": busy,
            "stacks": tails.most_common(top),
        })
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a speedscope JSON written by py-spy")
    parser.add_argument("--thread", default="", help="only threads whose name contains this")
    parser.add_argument("--depth", type=int, default=4, help="frames per stack tail")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    for entry in top_stacks(args.profile, args.thread, args.depth, args.top):
        print(f"== {entry['thread']}: {entry['seconds']:.2f} s sampled, {entry['busy_seconds']:.3f} s not idle")
        for stack, seconds in entry["stacks"]:
            print(f"  {seconds:7.3f} s  {stack}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
