"""Scenario 2: output tok/s at fixed lengths (128/128, 128/512, 2048/128) and concurrency 1..256.

Systems, on the same random bf16 weights (LLaVA-1.5-7B decoder shapes) in one process:
* `engine`       our EngineCore, driven in-process through its public API (closed loop: `concurrency`
                 requests in flight until all are served)
* `hf_static`    Hugging Face `generate`, static batching: batches of `concurrency` prompts
* `hf_cb`        Hugging Face continuous batching, `generate_batch` / `continuous_batching_context_manager`
                 with `max_requests_per_batch = concurrency` (recorded as null with the reason where the
                 installed transformers has no such API)
Every point is preceded by an untimed warm-up of the same shape. Points whose KV would not fit, or
that fail, are recorded with `output_tok_s: null` and a reason. The JSON is rewritten after every
point, so a run cut short keeps what it measured; `--merge` adds to an existing file (replacing the
same system/scenario/concurrency), so a sweep can be split over several calls; `--time-budget-s`
stops starting new points after that long. Every point records its KV cache dtype; `--kv-cache-dtype
fp8_e4m3` runs our engine with an fp8 cache, recorded as its own variant (`engine_fp8kv`, with its
block count in `num_kv_blocks`).

    python benchmarks/bench_throughput.py --out benchmarks/results --scenarios 128/128 --merge
    python benchmarks/bench_throughput.py --tiny --out /tmp/bench          # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from pathlib import Path

import torch
from llm_setup import (
    build_engine,
    build_models,
    environment,
    hf_generate,
    kv_bytes_per_token,
    random_prompts,
    release,
    run_engine,
    save_plot,
    sync,
    write_json,
)

SYSTEMS = ("engine", "hf_static", "hf_cb")
RESULT_FILE = "throughput.json"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _scenarios(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("/")) for s in text.split(",") if s]  # type: ignore[misc]


def _free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


# --- HF continuous batching ---------------------------------------------------------------------


def hf_cb_api(model) -> str | None:
    """Which continuous-batching entry point the installed transformers offers (None: none)."""
    if hasattr(model, "continuous_batching_context_manager"):
        return "continuous_batching_context_manager"
    if hasattr(model, "generate_batch"):
        return "generate_batch"
    return None


def _cb_configs(models, max_tokens: int, concurrency: int):
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:  # older API: the knobs live on the generation config
        gen.max_requests_per_batch = concurrency
        return gen, None
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    wanted = {"max_requests_per_batch": concurrency}
    return gen, ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in fields})


def _workload_hints(prompts: list[list[int]], max_tokens: int):
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    return WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max_tokens,
                         num_requests=len(prompts))


def _collect(manager, ids: list[str]) -> dict[str, int]:
    done: dict[str, int] = {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=60)
        if result is None:
            raise RuntimeError("continuous batching stopped returning results")
        if result.is_finished():
            done[result.request_id] = len(result.generated_tokens)
    return done


def run_hf_cb(models, warm: list[list[int]], prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    """One manager: the warm-up prompts, then the timed prompts (submission to the last result). The
    manager's start-up and CUDA-graph warm-up stay outside the timed region. With only `generate_batch`
    they cannot be separated: it is called twice and the second call is timed whole (noted)."""
    api = hf_cb_api(models.hf)
    gen, cb_config = _cb_configs(models, max_tokens, concurrency)
    kwargs = {"generation_config": gen, "continuous_batching_config": cb_config,
              "workload_hints": _workload_hints(prompts, max_tokens)}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if api == "continuous_batching_context_manager":
        accepted = inspect.signature(models.hf.continuous_batching_context_manager).parameters
        with models.hf.continuous_batching_context_manager(
            **{k: v for k, v in kwargs.items() if k in accepted}, block=True, timeout=30
        ) as manager:
            _collect(manager, manager.add_requests(warm, max_new_tokens=min(max_tokens, 8)))
            sync(models.device)
            start = time.perf_counter()
            done = _collect(manager, manager.add_requests(prompts, max_new_tokens=max_tokens))
            sync(models.device)
            elapsed = time.perf_counter() - start
        note = "timed from add_requests to the last result; manager start-up and warm-up excluded"
    else:
        accepted = inspect.signature(models.hf.generate_batch).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        models.hf.generate_batch(warm, **kwargs)
        start = time.perf_counter()
        out = models.hf.generate_batch(prompts, **kwargs)
        sync(models.device)
        elapsed = time.perf_counter() - start
        done = {k: len(v.generated_tokens) for k, v in out.items()}
        note = "generate_batch timed whole: includes the manager's start-up and warm-up"
    num_tokens = sum(done.values())
    if num_tokens != max_tokens * len(prompts):
        raise RuntimeError(f"HF continuous batching produced {num_tokens} tokens, expected {max_tokens * len(prompts)}")
    return {"elapsed_s": elapsed, "num_requests": len(prompts), "output_tokens": num_tokens,
            "output_tok_s": num_tokens / elapsed, "req_s": len(prompts) / elapsed, "api": api, "note": note}


# --- one point ----------------------------------------------------------------------------------


def run_point(
    system: str, models, engine, scenario, concurrency: int, num_requests: int, seed: int, timeline: bool = False
) -> dict:
    num_in, num_out = scenario
    vocab = models.config.vocab_size
    warm = random_prompts(min(concurrency, num_requests), num_in, vocab, seed=seed)
    prompts = random_prompts(num_requests, num_in, vocab, seed=seed + 1)
    if system == "engine":
        run_engine(engine, warm, min(num_out, 8), concurrency)
        return run_engine(engine, prompts, num_out, concurrency, timeline=timeline)
    if system == "hf_static":
        need = concurrency * (num_in + num_out) * kv_bytes_per_token(models.config, models.dtype)
        free = _free_bytes(models.device)
        if free is not None and need > 0.8 * free:
            raise MemoryError(f"KV for {concurrency} x {num_in + num_out} tokens is {need / 1e9:.1f} GB; "
                              f"{free / 1e9:.1f} GB free")
        hf_generate(models, warm, min(num_out, 8))
        elapsed = sum(
            hf_generate(models, prompts[i : i + concurrency], num_out) for i in range(0, num_requests, concurrency)
        )
        return {"elapsed_s": elapsed, "num_requests": num_requests, "output_tokens": num_requests * num_out,
                "output_tok_s": num_requests * num_out / elapsed, "req_s": num_requests / elapsed}
    if system == "hf_cb":
        if hf_cb_api(models.hf) is None:
            raise NotImplementedError("the installed transformers has no continuous-batching API (generate_batch)")
        return run_hf_cb(models, warm, prompts, num_out, concurrency)
    raise ValueError(system)


def _key(point: dict) -> tuple:
    return point["system"], point["scenario"], point["concurrency"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"directory for {RESULT_FILE} / throughput.png")
    parser.add_argument("--tiny", action="store_true", help="2-layer model and tiny sizes (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--scenarios", default=None, help="in/out pairs (default 128/128,128/512,2048/128)")
    parser.add_argument("--concurrency", default=None, help="default 1,8,32,64,128,256 (tiny: 1,4)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--requests-per-concurrency", type=int, default=2,
                        help="requests per point = max(min-requests, this x concurrency)")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="our engine's step budget")
    parser.add_argument("--kv-memory-fraction", type=float, default=0.85)
    parser.add_argument("--enforce-eager", action="store_true", help="our engine without CUDA graphs")
    parser.add_argument("--attention-backend", default="auto", help="our engine's: auto | batched | triton | reference")
    parser.add_argument("--max-prefill-graph-tokens", type=int, default=2048,
                        help="our engine's piecewise prefill graphs (0: prefill steps run eagerly)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8_e4m3"), default="auto",
                        help="our engine's KV cache: auto = the model dtype; fp8_e4m3 = float8_e4m3fn "
                        "(saturating, scale 1.0: twice the blocks); the HF baselines keep the model dtype")
    parser.add_argument("--hf-concurrency", default=None,
                        help="concurrencies of the HF baselines (default: --concurrency); they are slow")
    parser.add_argument("--hf-requests-per-concurrency", type=int, default=None,
                        help="HF baselines' requests per point = max(hf-min-requests, this x concurrency)")
    parser.add_argument("--hf-min-requests", type=int, default=None, help="default: --min-requests")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave start-up objects to the garbage collector (the services freeze them)")
    parser.add_argument("--step-timeline", action="store_true",
                        help="our engine's points also record step_timeline: prefill vs decode-only steps")
    parser.add_argument("--merge", action="store_true", help=f"add to an existing {RESULT_FILE}")
    parser.add_argument("--time-budget-s", type=float, default=None, help="start no new point after this")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    scenarios = _scenarios(args.scenarios or ("16/8,64/8" if args.tiny else "128/128,128/512,2048/128"))
    concurrencies = _ints(args.concurrency or ("1,4" if args.tiny else "1,8,32,64,128,256"))
    hf_concurrencies = set(_ints(args.hf_concurrency)) if args.hf_concurrency else set(concurrencies)
    hf_per_concurrency = args.hf_requests_per_concurrency or args.requests_per_concurrency
    hf_min_requests = args.hf_min_requests or args.min_requests
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")

    started = time.perf_counter()
    out_path = args.out / RESULT_FILE
    previous = json.loads(out_path.read_text()) if args.merge and out_path.is_file() else {"points": []}
    models = build_models(tiny=args.tiny, device=args.device, dtype=dtype)
    env = environment(device)
    results = {
        "scenario": "throughput",
        **env,
        "model": "tiny 2-layer Llama (smoke run)" if args.tiny else "LLaVA-1.5-7B decoder (Vicuna-7B shapes)",
        "weights": "random, created on the device; HF and our engine share the same tensors",
        "dtype": str(dtype).removeprefix("torch."),
        "hf_cb_api": hf_cb_api(models.hf),
        "points": previous["points"],
    }

    def record(point: dict) -> None:
        results["points"] = [p for p in results["points"] if _key(p) != _key(point)] + [point]
        write_json(out_path, results)

    # our engine first, then its KV cache is freed for the HF baselines
    for system in systems:
        engine = None
        if system == "engine":
            engine = build_engine(
                models, max_num_seqs=max(concurrencies), max_num_batched_tokens=args.max_num_batched_tokens,
                kv_memory_fraction=args.kv_memory_fraction, enforce_eager=True if args.enforce_eager else None,
                attention_backend=args.attention_backend, max_prefill_graph_tokens=args.max_prefill_graph_tokens,
                kv_cache_dtype=args.kv_cache_dtype, freeze_gc=not args.no_gc_freeze,
            )
        try:
            for n, scenario in enumerate(scenarios):
                for concurrency in concurrencies:
                    if system != "engine" and concurrency not in hf_concurrencies:
                        continue
                    name = f"{scenario[0]}/{scenario[1]}"
                    label = system
                    if system == "engine":  # variants get their own name, so --merge keeps them apart
                        label += "_eager" if args.enforce_eager else ""
                        label += "" if args.attention_backend in ("auto", "batched") else f"_{args.attention_backend}"
                        label += "" if args.max_prefill_graph_tokens == 2048 else f"_pg{args.max_prefill_graph_tokens}"
                        label += "" if args.kv_cache_dtype == "auto" else "_fp8kv"
                        label += "_gc" if args.no_gc_freeze else ""
                    point = {"system": label, "scenario": name, "input": scenario[0], "output": scenario[1],
                             "concurrency": concurrency, "device": env["device"]}
                    # the KV cache's element type: the engine's as configured, the model dtype for HF's
                    point["kv_cache_dtype"] = results["dtype"]
                    if system == "engine":
                        point["cuda_graphs"] = engine.config.use_cuda_graphs
                        point["attention_backend"] = engine.config.attention_backend
                        point["kv_cache_dtype"] = str(engine.runner.kv_cache_dtype).removeprefix("torch.")
                        point["num_kv_blocks"] = engine.scheduler.config.num_blocks
                    if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
                        if not any(_key(p) == _key(point) for p in results["points"]):  # keep an older value
                            record({**point, "output_tok_s": None, "reason": "not run: --time-budget-s reached"})
                        continue
                    if system == "engine":
                        num_requests = max(args.min_requests, args.requests_per_concurrency * concurrency)
                    else:
                        num_requests = max(hf_min_requests, hf_per_concurrency * concurrency)
                    try:
                        stats = run_point(system, models, engine, scenario, concurrency, num_requests,
                                          seed=10_000 * n + concurrency, timeline=args.step_timeline)
                        record({**point, **stats})
                    except (MemoryError, torch.OutOfMemoryError, NotImplementedError, RuntimeError) as exc:
                        record({**point, "output_tok_s": None, "reason": f"{type(exc).__name__}: {exc}"[:500]})
                        release(None)
                    p = results["points"][-1]
                    tok_s = p["output_tok_s"]
                    print(f"{label:<10} {name:>9} c={concurrency:<4} "
                          + (f"{tok_s:>10.1f} tok/s" if tok_s is not None else f"      null  ({p['reason'][:80]})"),
                          flush=True)
        finally:
            release(engine)

    results["wall_s"] = time.perf_counter() - started
    write_json(out_path, results)
    print_table(results)
    save_plot(args.out / "throughput.png", lambda plt: draw(plt, results))
    return 0


def print_table(results: dict) -> None:
    points = results["points"]
    systems = list(dict.fromkeys(p["system"] for p in points))
    print(f"{results['device']}  {results['dtype']}  output tok/s")
    width = max([12, *(len(s) + 2 for s in systems)])
    print(f"{'scenario':>9} {'conc':>5}" + "".join(f"{s:>{width}}" for s in systems))
    for scenario, concurrency in dict.fromkeys((p["scenario"], p["concurrency"]) for p in points):
        cells = []
        for system in systems:
            match = [p for p in points if _key(p) == (system, scenario, concurrency)]
            value = match[0]["output_tok_s"] if match else None
            cells.append(f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}")
        print(f"{scenario:>9} {concurrency:>5}" + "".join(cells))


def draw(plt, results: dict):
    points = results["points"]
    scenarios = list(dict.fromkeys(p["scenario"] for p in points))
    fig, axes = plt.subplots(1, max(1, len(scenarios)), figsize=(4.5 * max(1, len(scenarios)), 3.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=False):
        for system in dict.fromkeys(p["system"] for p in points):
            xs = sorted((p["concurrency"], p["output_tok_s"]) for p in points
                        if p["system"] == system and p["scenario"] == scenario and p["output_tok_s"] is not None)
            if xs:
                ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tok/s")
        ax.set_title(f"{scenario} (in/out)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']}, {results['dtype']}, {results['device']}", fontsize=9)
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
