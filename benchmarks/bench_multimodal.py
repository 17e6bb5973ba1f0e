"""Scenarios 3 and 5: one 336x336 image + ~48 text tokens through the real gRPC services and the SDK.

Starts `encoder_service` and `llm_service` as child processes on free loopback ports (as `vlm-demo`
does) and drives them with `client_sdk.Client` from `concurrency` threads (closed loop: each thread
sends its next request when the previous one finished), streaming, so the client-side time to first
token is when the first token arrived.

* Scenario 3 (`scenario3_multimodal.json/.png`): every request carries a DIFFERENT image (random
  pixels, so no encoder-cache or KV-prefix hit is possible), output 16 and 128 tokens (ignore_eos +
  min_tokens: fixed lengths), concurrency 1/8/32/64. TTFT p50/p90 and its split into the stages the
  returned timings allow (see `columns` in the JSON for how each is derived), output tok/s.
* Scenario 5 (`scenario5_repeat.json`): right after each scenario-3 point of the repeat output length,
  the very same requests (same image bytes, same text) are sent again at the same concurrency: TTFT
  with KV-prefix hits; `cached_prompt_tokens` proves them, and `requests_encoder_skipped` counts the
  requests the SDK sent straight to the LLM service by content id (it still held the embedding: the
  SDK's LLM-first shortcut, no encoder call at all); `encoder_cache_hits` counts encoder-cache hits of
  requests that did ask the encoder.

Every point is preceded by an untimed warm-up (its own distinct images, at least 4) at the same
concurrency.

`--embedding-transport` (auto, bytes, shared_memory; recorded in the JSON) is the SDK's
`embedding_transport`: unless it is `bytes` the encoder is started with `--shared-memory-mb`
(`--shared-memory-mb`, default 512, 16 with --tiny), so that the embedding goes encoder -> LLM service
through /dev/shm instead of twice through gRPC; `shared_memory_requests` counts the requests whose
Encode asked for it.
Timings of the encoder's `Encode` RPC (queue / decode / preprocess / model) are read from the
responses the SDK receives (its `_call` is wrapped per thread); the LLM service's from the final
stream message (`GenerateResult.timings`).

    python benchmarks/bench_multimodal.py --model /data/llava15-7b-random --out benchmarks/results   # GPU
    python benchmarks/bench_multimodal.py --tiny --out /tmp/bench                                    # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages importable
    sys.path.insert(0, str(REPO))

import client_sdk  # noqa: E402
from client_sdk.types import join_deltas  # noqa: E402
from vlm_demo.services import ServiceProcess, wait_until_serving  # noqa: E402

SHARED_MEMORY = 2  # vlm.v1.EMBEDDING_TRANSPORT_SHARED_MEMORY

SCENARIO3_FILE = "scenario3_multimodal.json"
SCENARIO5_FILE = "scenario5_repeat.json"
IMAGE_SIZE = 336
WORDS = ("the", "picture", "shows", "a", "small", "red", "house", "near", "green", "river", "under",
         "blue", "sky", "with", "white", "clouds", "and", "tall", "trees")

# How every per-request column is derived (written into both JSON files).
COLUMNS = {
    "ttft_ms": "client: GenerateResult.timings.time_to_first_token_ms, from the SDK's generate() call "
               "(iteration start) until the first streamed token arrived",
    "client_encode_ms": "client: timings.encode_ms, the SDK's encoder round trips before the LLM call "
                        "(LookupEmbeddings, and Encode on a miss)",
    "preprocess_ms": "encoder service: EncodeTimings.decode_ms + preprocess_ms of the Encode response "
                     "(image file decode + processor resize/normalize); 0 when no Encode call was made",
    "encode_ms": "encoder service: EncodeTimings.queue_ms + encode_ms (batcher queue + vision tower and "
                 "projector); 0 when no Encode call was made",
    "encoder_rpc_ms": "client_encode_ms - EncodeTimings.total_ms: look-up RPC, network, (de)serialization "
                      "of the embedding, SDK work",
    "transfer_ms": "ttft_ms - client_encode_ms - server_ttft_ms: LLM request build and send (content id, "
                   "a freshly encoded embedding whole, and any resend after NOT_FOUND: see "
                   "tensors_uploaded), the first token's trip back; clamped at 0",
    "server_ttft_ms": "LLM service: GenerateTimings.time_to_first_token_ms (request received -> first "
                      "token)",
    "queue_ms": "LLM service: GenerateTimings.queue_ms (arrival in the engine -> first scheduled)",
    "prefill_ms": "LLM service: GenerateTimings.prefill_ms (first scheduled -> first token: prefill "
                  "of the image + text prompt, chunked over steps shared with other requests)",
    "llm_other_ms": "server_ttft_ms - queue_ms - prefill_ms: tokenization, embedding resolution, "
                    "hand-off to the engine; clamped at 0",
    "llm_tokenize_ms": "part of llm_other_ms: GenerateTimings.tokenize_ms (template + tokenizer)",
    "llm_inputs_ms": "part of llm_other_ms: GenerateTimings.inputs_ms (checking and decoding the sent "
                     "embedding, its shared-memory read included when the engine runs in the service's "
                     "process (--engine-process reads it in the engine process: part of llm_other_ms, "
                     "not of this), or looking up its content id)",
    "note": "p50/p90 are taken per column, so the columns' percentiles need not add up to ttft's",
}
SPLIT = ("preprocess_ms", "encode_ms", "encoder_rpc_ms", "transfer_ms", "queue_ms", "prefill_ms", "llm_other_ms")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def make_image(seed: int) -> bytes:
    """A 336x336 PNG of random pixels: distinct content (and content id) per seed."""
    from PIL import Image

    pixels = random.Random(seed).randbytes(IMAGE_SIZE * IMAGE_SIZE * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (IMAGE_SIZE, IMAGE_SIZE), pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the client ---------------------------------------------------------------------------------


class Bench:
    """One SDK client shared by the worker threads, with the encoder's Encode timings captured per thread."""

    def __init__(self, encoder: str, llm: str, timeout_s: float, embedding_transport: str = "auto"):
        self.client = client_sdk.Client(encoder, llm, timeout_s=timeout_s, embedding_transport=embedding_transport)
        self.local = threading.local()
        original = self.client._call

        def call(which, method, request, deadline, metadata=()):
            response = original(which, method, request, deadline, metadata)
            if method == "Encode":
                self.local.encode_timings.append(response.timings)
                self.local.shared_memory |= request.output_transport == SHARED_MEMORY
            return response

        self.client._call = call

    def close(self) -> None:
        self.client.close()

    def text_tokens(self, question: str) -> int:
        """Text tokens of the rendered prompt (Tokenize RPC; image placeholders not counted)."""
        from vlm.v1 import llm_service_pb2

        response = self.client._llm_stub().Tokenize(
            llm_service_pb2.TokenizeRequest(
                prompt=question, prompt_format=llm_service_pb2.PROMPT_FORMAT_TRITON_ENSEMBLE
            ),
            timeout=30,
        )
        return len(response.token_ids) - response.num_image_placeholders

    def one(self, image: bytes, question: str, max_tokens: int) -> dict:
        self.local.encode_timings = []
        self.local.shared_memory = False
        deltas = list(self.client.generate(
            question, images=[image], stream=True, prompt_format="triton", max_tokens=max_tokens,
            min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
        ))
        result = join_deltas(deltas)
        if result.usage.completion_tokens != max_tokens:
            raise RuntimeError(f"{result.usage.completion_tokens} tokens, expected {max_tokens}: fixed lengths broken")
        t = result.timings
        enc = self.local.encode_timings
        enc_total = sum(e.total_ms for e in enc)
        return {
            "ttft_ms": t.time_to_first_token_ms,
            "total_ms": t.total_ms,
            "client_encode_ms": t.encode_ms,
            "preprocess_ms": sum(e.decode_ms + e.preprocess_ms for e in enc),
            "encode_ms": sum(e.queue_ms + e.encode_ms for e in enc),
            "encoder_rpc_ms": max(t.encode_ms - enc_total, 0.0),
            "transfer_ms": max(t.time_to_first_token_ms - t.encode_ms - t.server_time_to_first_token_ms, 0.0),
            "server_ttft_ms": t.server_time_to_first_token_ms,
            "queue_ms": t.queue_ms,
            "prefill_ms": t.prefill_ms,
            "llm_other_ms": max(t.server_time_to_first_token_ms - t.queue_ms - t.prefill_ms, 0.0),
            "llm_tokenize_ms": t.server_tokenize_ms,
            "llm_inputs_ms": t.server_inputs_ms,
            "time_per_output_token_ms": t.time_per_output_token_ms,
            "prompt_tokens": result.usage.prompt_tokens,
            "multimodal_prompt_tokens": result.usage.multimodal_prompt_tokens,
            "cached_prompt_tokens": result.usage.cached_prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "encoder_cache_hits": result.encoder_cache_hits,
            "encoder_skipped": result.encoder_skipped,
            "encode_calls": len(enc),
            "tensors_uploaded": result.tensors_uploaded,
            "shared_memory": self.local.shared_memory,
        }

    def run(self, images: list[bytes], question: str, max_tokens: int, concurrency: int) -> dict:
        """Closed loop over `images` with `concurrency` threads; per-request records and the wall time."""
        pending = list(enumerate(images))
        lock = threading.Lock()
        records: list[dict | None] = [None] * len(images)

        def worker() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    index, image = pending.pop(0)
                records[index] = self.one(image, question, max_tokens)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(min(concurrency, len(images)))]:
                future.result()
        elapsed = time.perf_counter() - start
        return {"elapsed_s": elapsed, "records": records}


def summarize_point(run: dict, *, scenario: str, concurrency: int, max_tokens: int, keep_records: bool) -> dict:
    records = run["records"]
    tokens = sum(r["completion_tokens"] for r in records)
    point = {
        "scenario": scenario, "concurrency": concurrency, "output": max_tokens, "num_requests": len(records),
        "elapsed_s": run["elapsed_s"], "output_tokens": tokens, "output_tok_s": tokens / run["elapsed_s"],
        "req_s": len(records) / run["elapsed_s"],
    }
    for column in ("ttft_ms", "client_encode_ms", *SPLIT, "llm_tokenize_ms", "llm_inputs_ms", "server_ttft_ms",
                   "time_per_output_token_ms"):
        values = [r[column] for r in records]
        point[f"{column}_p50"] = percentile(values, 0.5)
        point[f"{column}_p90"] = percentile(values, 0.9)
    for column in ("prompt_tokens", "multimodal_prompt_tokens", "cached_prompt_tokens"):
        point[f"{column}_median"] = statistics.median(r[column] for r in records)
    point["cached_prompt_tokens_min"] = min(r["cached_prompt_tokens"] for r in records)
    point["encoder_cache_hits"] = sum(r["encoder_cache_hits"] for r in records)
    point["requests_with_encoder_cache_hit"] = sum(1 for r in records if r["encoder_cache_hits"] > 0)
    point["requests_encoder_skipped"] = sum(1 for r in records if r["encoder_skipped"])
    point["requests_with_cached_prompt_tokens"] = sum(1 for r in records if r["cached_prompt_tokens"] > 0)
    point["encode_calls"] = sum(r["encode_calls"] for r in records)
    point["tensors_uploaded"] = sum(r["tensors_uploaded"] for r in records)
    point["shared_memory_requests"] = sum(1 for r in records if r.get("shared_memory"))
    if keep_records:
        point["records"] = records
    return point


# --- main ---------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _device_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"directory for {SCENARIO3_FILE} / {SCENARIO5_FILE}")
    parser.add_argument("--tiny", action="store_true", help="tiny llava checkpoint on CPU, small sizes (smoke run)")
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint directory to serve (see make_llava15_checkpoint.py); --tiny: a tiny one")
    parser.add_argument("--concurrency", default=None, help="default 1,8,32,64 (tiny: 1,2)")
    parser.add_argument("--outputs", default=None, help="output lengths (default 16,128; tiny 4,8)")
    parser.add_argument("--repeat-output", type=int, default=None,
                        help="output length of the scenario-5 replays (default: the first of --outputs)")
    parser.add_argument("--text-tokens", type=int, default=48, help="text tokens of the prompt (approximate)")
    parser.add_argument("--requests-per-concurrency", type=int, default=2,
                        help="requests per point = max(min-requests, this x concurrency)")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--llm-args", default=None,
                        help="extra llm_service flags, one string (default: none; tiny: --max-num-seqs 8)")
    parser.add_argument("--encoder-args", default=None,
                        help="extra encoder_service flags (default on a GPU host: --device cuda --dtype bfloat16 "
                             "--max-batch-size 64; CPU: none)")
    parser.add_argument("--embedding-transport", choices=("auto", "bytes", "shared_memory"), default="auto",
                        help="the SDK's embedding_transport (default auto: shared memory, as both services "
                             "run on this host); not bytes: the encoder gets --shared-memory-mb")
    parser.add_argument("--shared-memory-mb", type=int, default=None,
                        help="the encoder's shared-memory ring when the transport is not bytes "
                             "(default 512; tiny: 16)")
    parser.add_argument("--startup-timeout-s", type=float, default=900.0)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--log-dir", type=Path, default=None, help="service logs (default: a temporary directory)")
    parser.add_argument("--keep-records", action="store_true", help="store every request's record in the JSON")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="sample both services with py-spy (on PATH) during the timed concurrency-1 runs of "
                             "scenario 3; speedscope profiles go to DIR (where the service time goes that the "
                             "engine alone does not show)")
    args = parser.parse_args(argv)
    concurrencies = _ints(args.concurrency or ("1,2" if args.tiny else "1,8,32,64"))
    outputs = _ints(args.outputs or ("4,8" if args.tiny else "16,128"))
    repeat_output = args.repeat_output or outputs[0]
    gpu = not args.tiny and _cuda_available()
    llm_args = shlex.split(args.llm_args if args.llm_args is not None else ("--max-num-seqs 8" if args.tiny else ""))
    encoder_args = shlex.split(args.encoder_args if args.encoder_args is not None else
                               ("--device cuda --dtype bfloat16 --max-batch-size 64" if gpu else ""))
    if args.embedding_transport != "bytes" and not any(a.startswith("--shared-memory-mb") for a in encoder_args):
        ring_mb = args.shared_memory_mb if args.shared_memory_mb is not None else (16 if args.tiny else 512)
        encoder_args += ["--shared-memory-mb", str(ring_mb)]

    if args.model is None and not args.tiny:
        parser.error("--model DIR is required without --tiny (make one with make_llava15_checkpoint.py)")
    with tempfile.TemporaryDirectory(prefix="bench-mm-") as scratch:
        if args.model is not None:
            model_dir = args.model.expanduser().resolve()
        else:
            from vlm_tiny import make_tiny_checkpoint

            model_dir = make_tiny_checkpoint("llava", Path(scratch) / "llava")
        return run(args, model_dir, gpu, concurrencies, outputs, repeat_output, llm_args, encoder_args)


def run(args, model_dir: Path, gpu: bool, concurrencies: list[int], outputs: list[int], repeat_output: int,
        llm_args: list[str], encoder_args: list[str]) -> int:
    started = time.perf_counter()
    config = json.loads((model_dir / "config.json").read_text())
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-mm-logs-"))
    print(f"service logs: {log_dir}", flush=True)
    services = [
        ServiceProcess("encoder", "encoder_service", model_dir, log_dir / "encoder.log", extra_args=encoder_args),
        ServiceProcess("llm", "llm_service", model_dir, log_dir / "llm.log", extra_args=llm_args),
    ]
    for service in services:
        service.start()
    common = {
        "device": _device_name(gpu),
        "model": "tiny llava (smoke run)" if args.tiny and args.model is None else str(model_dir),
        "model_type": config.get("model_type"),
        "text_config": {k: config.get("text_config", {}).get(k) for k in
                        ("hidden_size", "num_hidden_layers", "vocab_size")},
        "image": f"{IMAGE_SIZE}x{IMAGE_SIZE} PNG of random pixels",
        "llm_args": llm_args, "encoder_args": encoder_args,
        # the service's default: the engine in its own process on CUDA (llm_service --engine-process)
        "llm_engine_process": "--no-engine-process" not in llm_args and (gpu or "--engine-process" in llm_args),
        "embedding_transport": args.embedding_transport,
        "client": "client_sdk.Client, streaming, one client shared by `concurrency` threads (closed loop)",
        "columns": COLUMNS,
    }
    scenario3 = {"scenario": "scenario3_multimodal", **common, "points": []}
    scenario5 = {"scenario": "scenario5_repeat", **common, "points": []}
    seed = iter(range(1_000_000))
    try:
        wait_until_serving(services, args.startup_timeout_s)
        bench = Bench(services[0].address, services[1].address, args.request_timeout_s, args.embedding_transport)
        try:
            # a question of ~text_tokens tokens; the triton template adds "USER: <image>\n ... ASSISTANT:"
            words, counts = [WORDS[0]], [bench.text_tokens(WORDS[0])]
            while counts[-1] < args.text_tokens:
                words.append(WORDS[len(words) % len(WORDS)])
                counts.append(bench.text_tokens(" ".join(words)))
            if len(words) > 1 and args.text_tokens - counts[-2] < counts[-1] - args.text_tokens:
                words.pop()  # the closer of the two word counts around the target
            question = " ".join(words)
            common_extra = {"question": question, "text_tokens": bench.text_tokens(question)}
            scenario3.update(common_extra)
            scenario5.update(common_extra)
            for max_tokens in outputs:
                for concurrency in concurrencies:
                    num = max(args.min_requests, args.requests_per_concurrency * concurrency)
                    # at least 4 warm-up requests: at c=1 one may leave first-request costs in the
                    # timed run (on an H100 the first point, c=1 out 16, gave 78 ms TTFT; c=1 out 128
                    # later in the same run 59 ms)
                    warm = [make_image(next(seed)) for _ in range(max(4, min(concurrency, num)))]
                    images = [make_image(next(seed)) for _ in range(num)]
                    bench.run(warm, question, min(max_tokens, 4), concurrency)  # warm-up, untimed
                    sampling = args.py_spy is not None and concurrency == 1
                    with py_spy(services, args.py_spy, f"c1_out{max_tokens}") if sampling else contextlib.nullcontext():
                        run = bench.run(images, question, max_tokens, concurrency)
                    point = summarize_point(run, scenario="distinct images", concurrency=concurrency,
                                            max_tokens=max_tokens, keep_records=args.keep_records)
                    if sampling:
                        point["py_spy"] = str(args.py_spy)
                    scenario3["points"].append(point)
                    _print_point("s3", point)
                    _write(args.out / SCENARIO3_FILE, scenario3)
                    if max_tokens == repeat_output:  # scenario 5: the same requests again
                        run = bench.run(images, question, max_tokens, concurrency)
                        point = summarize_point(run, scenario="same image and text again",
                                                concurrency=concurrency, max_tokens=max_tokens,
                                                keep_records=args.keep_records)
                        scenario5["points"].append(point)
                        _print_point("s5", point)
                        _write(args.out / SCENARIO5_FILE, scenario5)
        finally:
            bench.close()
    finally:
        for service in services:
            service.stop()

    first3 = _find(scenario3["points"], 1, outputs[0])
    first5 = _find(scenario5["points"], 1, repeat_output)
    scenario3["headline"] = {
        "shape": f"1 image + {scenario3.get('text_tokens')} text tokens, output {outputs[0]}, concurrency 1",
        "image_ttft_ms_c1": first3["ttft_ms_p50"] if first3 else None,
    }
    scenario5["headline"] = {
        "shape": f"same image + text again, output {repeat_output}, concurrency 1",
        "image_ttft_repeat_ms_c1": first5["ttft_ms_p50"] if first5 else None,
        "cached_prompt_tokens_c1": first5["cached_prompt_tokens_median"] if first5 else None,
        "encoder_cache_hits_c1": first5["encoder_cache_hits"] if first5 else None,
        "requests_encoder_skipped_c1": first5["requests_encoder_skipped"] if first5 else None,
    }
    wall = time.perf_counter() - started
    scenario3["wall_s"] = scenario5["wall_s"] = wall
    _write(args.out / SCENARIO3_FILE, scenario3)
    _write(args.out / SCENARIO5_FILE, scenario5)
    print_table(scenario3, scenario5)
    _save_plot(args.out / "scenario3_multimodal.png", scenario3, scenario5)
    return 0


@contextlib.contextmanager
def py_spy(services, out: Path, tag: str):
    """Sample every service process with `py-spy record` (all threads, idle included, without pausing
    the process) while the block runs; one speedscope file per service under `out`. The timings of
    that run still carry the sampling's cost: the JSON says which points were sampled."""
    binary = shutil.which("py-spy")
    if binary is None:
        raise SystemExit("--py-spy: no py-spy on PATH (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    recorders = [
        subprocess.Popen(
            [binary, "record", "--pid", str(s.process.pid), "--rate", "1000", "--idle", "--threads", "--nonblocking",
             "--format", "speedscope", "--output", str(out / f"{s.name}_{tag}.speedscope.json")],
            stdout=subprocess.DEVNULL, stderr=open(out / f"{s.name}_{tag}.py-spy.log", "w"),  # noqa: SIM115
        )
        for s in services
    ]
    time.sleep(1.0)  # attached before the timed requests start
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for recorder in recorders:
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()


def _find(points: list[dict], concurrency: int, output: int) -> dict | None:
    return next((p for p in points if (p["concurrency"], p["output"]) == (concurrency, output)), None)


def _print_point(tag: str, p: dict) -> None:
    print(f"{tag} out={p['output']:<4} c={p['concurrency']:<3} TTFT p50 {p['ttft_ms_p50']:.1f} ms  "
          f"{p['output_tok_s']:.1f} tok/s  cached {p['cached_prompt_tokens_median']:.0f}  "
          f"encoder hits {p['encoder_cache_hits']}  encoder skipped {p['requests_encoder_skipped']}", flush=True)


def print_table(scenario3: dict, scenario5: dict) -> None:
    print(f"{scenario3['device']}  {scenario3['model']}  prompt: 1 image + {scenario3.get('text_tokens')} text tokens")
    head = ["scn", "out", "conc", "TTFT50", "TTFT90", *(c.removesuffix("_ms")[:8] for c in SPLIT), "tok/s",
            "cached", "enc-hit"]
    print("".join(f"{h:>9}" for h in head))
    for tag, data in (("3", scenario3), ("5", scenario5)):
        for p in data["points"]:
            cells = [tag, p["output"], p["concurrency"], f"{p['ttft_ms_p50']:.1f}", f"{p['ttft_ms_p90']:.1f}",
                     *(f"{p[f'{c}_p50']:.1f}" for c in SPLIT), f"{p['output_tok_s']:.1f}",
                     f"{p['cached_prompt_tokens_median']:.0f}", p["requests_with_encoder_cache_hit"]]
            print("".join(f"{c:>9}" for c in cells))
    print("split columns are p50 ms; see `columns` in the JSON for their derivation")


def _save_plot(path: Path, scenario3: dict, scenario5: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [("s3", p) for p in scenario3["points"]] + [("s5", p) for p in scenario5["points"]]
    labels = [f"{tag} o{p['output']} c{p['concurrency']}" for tag, p in rows]
    bottom = [0.0] * len(rows)
    for column in SPLIT:
        values = [p[f"{column}_p50"] or 0.0 for _, p in rows]
        left.bar(range(len(rows)), values, bottom=bottom, label=column.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.plot(range(len(rows)), [p["ttft_ms_p50"] for _, p in rows], "k_", markersize=14, label="TTFT p50")
    left.set_xticks(range(len(rows)))
    left.set_xticklabels(labels, rotation=60, fontsize=7)
    left.set_ylabel("ms (p50 per stage)")
    left.set_title("time to first token, split", fontsize=9)
    left.legend(fontsize=7)
    for output in dict.fromkeys(p["output"] for p in scenario3["points"]):
        pts = [p for p in scenario3["points"] if p["output"] == output]
        right.plot([p["concurrency"] for p in pts], [p["output_tok_s"] for p in pts], "o-", label=f"output {output}")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrency")
    right.set_ylabel("output tok/s")
    right.set_title(f"distinct images, {scenario3['device']}", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
