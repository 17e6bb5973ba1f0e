"""Where a decode step's time goes: whole `engine.step()` vs the CUDA-graph replay alone (GPU time),
the host-side Python that is left (cProfile), and the kernels of one eager step (torch.profiler).

For each batch size, `B` requests with `--context`-token random prompts are brought into decode, then:

* `step_ms`: mean wall time of back-to-back `engine.step()` calls (schedule + inputs + graph replay +
  sampling + update, less whatever pipelined decode overlaps);
* `replay_ms`: median time of replaying the same step's CUDA graph alone (device-synchronized);
* `host_ms` = step - replay: the CPU work the GPU waits for (near 0 where pipelining hides it);
* `profile_b<B>_host.txt`: cProfile of the graph steps, top functions by cumulative time;
* `profile_b<B>_kernels.txt`: torch.profiler of one eager decode step, kernels by GPU time, and the
  number of kernel launches per step.

    python benchmarks/profile_decode_step.py --out /tmp/prof                  # GPU, LLaVA-1.5-7B shapes
    python benchmarks/profile_decode_step.py --tiny --out /tmp/prof --batches 1,4
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from llm_setup import build_engine, build_models, environment, random_prompts, release, sync

from llm_service.engine.engine_core import GenerationInput
from llm_service.engine.sampling_params import SamplingParams


def _into_decode(engine, batch: int, context: int, vocab: int) -> list[str]:
    params = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    ids = []
    for i, prompt in enumerate(random_prompts(batch, context, vocab, seed=batch)):
        rid = f"prof-{batch}-{i}"
        engine.add_request(GenerationInput(rid, prompt_token_ids=prompt, sampling=params))
        ids.append(rid)
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    return ids


def _timed_steps(engine, steps: int, device) -> float:
    """Mean ms per `engine.step()` over `steps` back-to-back calls. No sync between calls: with
    pipelined decode a step is queued behind the running one, and a sync would drain that queue."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / steps


def _replay_ms(engine, batch: int, device, iters: int) -> float | None:
    graphs = engine.runner.decode_graphs
    if graphs is None or not graphs.capture:
        return None
    seq_lens = [r.num_tokens for r in engine.scheduler.requests.values()]
    key = graphs.bucket_for(batch, max(seq_lens))
    if key is None:
        return None
    graph = graphs.graphs[key]
    graph.replay()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        graph.replay()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _graph_kernel_profile(engine, batch: int, device, replays: int = 5) -> tuple[str, dict] | None:
    """Kernels of the decode CUDA graph itself (what a graph step runs), by GPU time: kernel count
    and summed kernel time per replay against the replay's wall time (the gaps between kernels)."""
    graphs = engine.runner.decode_graphs
    if graphs is None or not graphs.capture:
        return None
    key = graphs.bucket_for(batch, max(r.num_tokens for r in engine.scheduler.requests.values()))
    if key is None:
        return None
    graph = graphs.graphs[key]
    graph.replay()
    sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        sync(device)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    summary = {
        "kernels_per_replay": sum(e.count for e in events) / replays,
        "kernel_ms_per_replay": sum(e.self_device_time_total for e in events) / 1e3 / replays,
    }
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    return table, summary


def _host_profile(engine, steps: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(35)
    return text.getvalue()


def _kernel_profile(engine, device) -> tuple[str, int]:
    graphs, engine.runner.decode_graphs = engine.runner.decode_graphs, None  # one eager step
    try:
        engine.step()  # warm-up of the eager path
        sync(device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            engine.step()
            sync(device)
    finally:
        engine.runner.decode_graphs = graphs
    events = prof.key_averages()
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return events.table(sort_by=sort_key, row_limit=40, max_name_column_width=70), kernels


def _prefill_wave(engine, requests: int, context: int, vocab: int, device, seed: int, profile: str | None = None) -> dict:
    """The closed loop's prefill wave: `requests` prompts of `context` tokens (new ones: `seed` must
    differ between waves, or the prefix cache serves them) arrive at an idle engine together. Wall ms
    of each step, synchronized, until every request has its first token. `profile` profiles the first
    (full-budget) step instead, whose time then includes the profiler's: "kernels" (torch.profiler,
    by GPU time and by CPU time) or "host" (cProfile; on a GPU the wait for the kernels shows up as
    the sampler's synchronize)."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    ids = [f"wave-{seed}-{i}" for i in range(requests)]
    for rid, prompt in zip(ids, random_prompts(requests, context, vocab, seed=seed), strict=True):
        engine.add_request(GenerationInput(rid, prompt_token_ids=prompt, sampling=params))
    started: set[str] = set()
    step_ms, report = [], ""
    while len(started) < requests:
        sync(device)
        t0 = time.perf_counter()
        if profile == "kernels" and not step_ms:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                outputs = engine.step()
                sync(device)
            events = prof.key_averages()
            report = "\n\n".join(
                f"sorted by {key}:\n" + events.table(sort_by=key, row_limit=30, max_name_column_width=70)
                for key in (("self_device_time_total",) if device.type == "cuda" else ()) + ("self_cpu_time_total",)
            )
        elif profile == "host" and not step_ms:
            host = cProfile.Profile()
            host.enable()
            outputs = engine.step()
            sync(device)
            host.disable()
            text = io.StringIO()
            pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(40)
            report = text.getvalue()
        else:
            outputs = engine.step()
        sync(device)
        step_ms.append(1e3 * (time.perf_counter() - t0))
        started.update(o.request_id for o in outputs if o.new_token_ids)
    while engine.has_unfinished_requests():
        engine.step()
    return {"requests": requests, "context": context, "step_ms": step_ms, "total_ms": sum(step_ms),
            "report": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--context", type=int, default=192, help="prompt tokens of every request")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--prefill-wave", default=None, metavar="NxC",
                        help="also time a wave of N prompts of C tokens arriving together (e.g. 256x128)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--no-skinny-gemm", action="store_true", help="every projection on cuBLAS")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    wave_requests, wave_context = (int(x) for x in (args.prefill_wave or "0x0").lower().split("x"))
    models = build_models(tiny=args.tiny, device=args.device, dtype=dtype)
    engine = build_engine(
        models, max_num_seqs=max(batches + [wave_requests]), max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
        max_model_len=2048, skinny_gemm=not args.no_skinny_gemm,
    )
    results = {**environment(device), "dtype": str(dtype).removeprefix("torch."), "context": args.context, "attention_backend": engine.config.attention_backend,
               "cuda_graphs": engine.config.use_cuda_graphs, "points": [],
               "skinny_gemm": engine.runner.skinny_gemm.report if engine.runner.skinny_gemm else None}
    try:
        if wave_requests:
            n, c = wave_requests, wave_context
            vocab = models.config.vocab_size
            _prefill_wave(engine, n, c, vocab, device, seed=1)  # warm-up (lazy inits, autotune)
            wave = _prefill_wave(engine, n, c, vocab, device, seed=2)
            for seed, kind in ((3, "kernels"), (4, "host")):
                report = _prefill_wave(engine, n, c, vocab, device, seed=seed, profile=kind)["report"]
                (args.out / f"profile_wave_{n}x{c}_{kind}.txt").write_text(report)
            del wave["report"]
            results["prefill_wave"] = {**wave, "max_num_batched_tokens": args.max_num_batched_tokens}
            print(json.dumps(results["prefill_wave"]), flush=True)
        for batch in batches:
            ids = _into_decode(engine, batch, args.context, models.config.vocab_size)
            _timed_steps(engine, 3, device)  # warm-up
            step_ms = _timed_steps(engine, args.steps, device)
            replay = _replay_ms(engine, batch, device, args.steps)
            graph_profile = _graph_kernel_profile(engine, batch, device)
            host = _host_profile(engine, args.steps)
            kernels_text, kernels = _kernel_profile(engine, device)
            (args.out / f"profile_b{batch}_host.txt").write_text(host)
            (args.out / f"profile_b{batch}_kernels.txt").write_text(f"kernels per eager step: {kernels}\n{kernels_text}")
            point = {"batch": batch, "step_ms": step_ms, "replay_ms": replay,
                     "host_ms": None if replay is None else step_ms - replay,
                     "tok_s": 1e3 * batch / step_ms, "kernels_per_eager_step": kernels}
            if graph_profile is not None:
                (args.out / f"profile_b{batch}_graph_kernels.txt").write_text(graph_profile[0])
                point["graph"] = graph_profile[1]
            results["points"].append(point)
            print(json.dumps(point), flush=True)
            for rid in ids:
                engine.abort(rid)
    finally:
        release(engine)
    (args.out / "profile_decode_step.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
