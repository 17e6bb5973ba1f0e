"""Gather the headline figures of the performance issue into `summary.json`, from whatever result
files exist. A figure whose file or entry is missing is null, with the reason; every figure names the
file and entry it came from and the device it was measured on. Nothing is computed that a result file
does not hold.

    python benchmarks/summary.py                        # reads and writes benchmarks/results/
    python benchmarks/summary.py --results /tmp/bench   # e.g. after a smoke run
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# key -> (target as text, comparison, target value) from the issue; all on one H100 80GB, bf16
TARGETS: dict[str, tuple[str, str, float]] = {
    "decode_bs1_ms_per_token": ("<= 5.5 ms/token", "<=", 5.5),
    "throughput_128_128_c256_tok_s": (">= 12000 output tok/s", ">=", 12000.0),
    "image_ttft_ms_c1": ("<= 35 ms", "<=", 35.0),
    "image_ttft_repeat_ms_c1": ("<= 12 ms", "<=", 12.0),
    "encoder_images_per_s_bs64": (">= 1400 images/s", ">=", 1400.0),
    "grpc_overhead_pct_c64": ("<= 5 %", "<=", 5.0),
}


class Missing(Exception):
    """A figure is not in the results; the message says why."""


def _load(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise Missing(f"no {name} in {results}")
    return json.loads(path.read_text())


def _headline(name: str, key: str, script: str) -> Callable[[Path], tuple[float, str, str]]:
    def get(results: Path):
        try:
            data = _load(results, name)
        except Missing as exc:
            raise Missing(f"{exc}; it is written by {script}") from None
        value = data.get("headline", {}).get(key)
        if value is None:
            raise Missing(f"{name} has no headline.{key}")
        return value, f"{name}: headline.{key} ({data.get('headline', {}).get('shape', '')})".replace(" ()", ""), \
            data.get("device", "?")

    return get


def _throughput(system: str) -> Callable[[Path], tuple[float, str, str]]:
    def get(results: Path):
        data = _load(results, "throughput.json")
        match = [p for p in data.get("points", [])
                 if (p["system"], p["scenario"], p["concurrency"]) == (system, "128/128", 256)]
        if not match:
            raise Missing(f"throughput.json has no {system} point at 128/128, concurrency 256")
        point = match[0]
        if point.get("output_tok_s") is None:
            raise Missing(f"throughput.json {system} 128/128 c256: {point.get('reason', 'no value')}")
        detail = f"throughput.json: {system}, 128/128, concurrency 256, {point['num_requests']} requests"
        return point["output_tok_s"], detail, point.get("device", data.get("device", "?"))

    return get


def _encoder(results: Path):
    data = _load(results, "encoder_llava15.json")
    replay = data.get("variants", {}).get("compiled_cudagraph", {}).get("results", {}).get("64", {})
    if replay.get("images_per_s") is not None:  # the service's path: compiled buckets replayed as CUDA graphs
        detail = "encoder_llava15.json: variants.compiled_cudagraph['64'] (tower + projector, the service's path)"
        return replay["images_per_s"], detail, data.get("device", "?")
    for mode in ("compiled", "eager"):  # the tower + projector on GPU-resident pixels, best mode first
        value = data.get(mode, {}).get("64")
        if value is not None:
            call = data.get("encode_call_eager", {}).get("64")
            detail = f"encoder_llava15.json: {mode}['64'] (tower + projector)"
            if call is not None:
                detail += f"; the whole encode() call (host copies included, eager) gives {call:.1f}"
            return value, detail, data.get("device", "?")
    raise Missing("encoder_llava15.json has no batch-64 figure")


def _grpc_overhead(results: Path):
    try:
        data = _load(results, "grpc_overhead.json")
    except Missing as exc:
        raise Missing(f"{exc}; it is written by bench_grpc_overhead.py") from None
    headline = data.get("headline", {})
    value = headline.get("grpc_overhead_pct_c64")
    if value is None:
        raise Missing("grpc_overhead.json has no headline.grpc_overhead_pct_c64")
    if headline.get("concurrency") != 64:
        raise Missing(f"grpc_overhead.json was measured at concurrency {headline.get('concurrency')}, not 64")
    detail = (f"grpc_overhead.json ({headline.get('shape', '')}): "
              f"{headline['grpc_stream_tok_s']:.1f} output tok/s through GenerateStream with the engine in the "
              f"service's process vs {headline['in_process_tok_s']:.1f} in-process ({value:.2f} %)")
    process_value = headline.get("grpc_engine_process_overhead_pct")
    if process_value is not None:  # the service's default on CUDA (--engine-process): that is what it costs
        detail = (f"{detail}; with the engine in its own process (--engine-process, the default on CUDA): "
                  f"{headline['grpc_engine_process_tok_s']:.1f} output tok/s, headline.grpc_engine_process_"
                  f"overhead_pct, the figure reported")
        value = process_value
    return value, detail, data.get("device", "?")


EXTRACTORS: dict[str, Callable[[Path], tuple[float, str, str]]] = {
    "decode_bs1_ms_per_token": _headline("decode_bs1.json", "decode_bs1_ms_per_token", "bench_decode.py"),
    "hbm_floor_ms_per_token": _headline("decode_bs1.json", "hbm_floor_ms_per_token", "bench_decode.py"),
    "throughput_128_128_c256_tok_s": _throughput("engine"),
    "hf_cb_throughput_128_128_c256_tok_s": _throughput("hf_cb"),
    "image_ttft_ms_c1": _headline("scenario3_multimodal.json", "image_ttft_ms_c1", "bench_multimodal.py"),
    "image_ttft_repeat_ms_c1": _headline("scenario5_repeat.json", "image_ttft_repeat_ms_c1", "bench_multimodal.py"),
    "encoder_images_per_s_bs64": _encoder,
    "grpc_overhead_pct_c64": _grpc_overhead,
}


def summarize(results: Path) -> dict:
    figures: dict[str, float | None] = {}
    sources: dict[str, dict] = {}
    devices: set[str] = set()
    for key, extract in EXTRACTORS.items():
        try:
            value, detail, device = extract(results)
        except Missing as exc:
            figures[key] = None
            sources[key] = {"reason": str(exc)}
            continue
        figures[key] = value
        sources[key] = {"from": detail, "device": device}
        devices.add(device)
    targets = {}
    for key, (text, op, bound) in TARGETS.items():
        value = figures[key]
        on_h100 = "H100" in sources[key].get("device", "")  # the targets are for one H100 80GB
        met = None if value is None or not on_h100 else (value <= bound if op == "<=" else value >= bound)
        targets[key] = {"target": f"{text} on one H100 80GB, bf16", "measured": value, "met": met}
    device = devices.pop() if len(devices) == 1 else (None if not devices else "mixed: " + ", ".join(sorted(devices)))
    return {"device": device, **figures, "targets": targets, "sources": sources}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/summary.json")
    args = parser.parse_args(argv)
    summary = summarize(args.results)
    out = args.out or args.results / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"device: {summary['device']}")
    for key in EXTRACTORS:
        value = summary[key]
        target = summary["targets"].get(key)
        shown = f"{value:.2f}" if value is not None else "null"
        verdict = {True: "met", False: "missed", None: "-"}[target["met"]] if target else ""
        extra = f"  target {target['target']}: {verdict}" if target else ""
        reason = "" if value is not None else f"  ({summary['sources'][key]['reason']})"
        print(f"{key:<38}{shown:>12}{extra}{reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
