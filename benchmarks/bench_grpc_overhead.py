"""Issue key `grpc_overhead_pct_c64`: output tok/s of our engine through the gRPC service
(`GenerateStream`) against the same engine called in-process, 128/128 at concurrency 64.

One engine object serves both variants, on LLaVA-1.5-7B decoder shapes with random bf16 weights
created on the GPU (`llm_setup`):
* `in_process`   `AsyncLLMEngine.generate()` consumed by `concurrency` asyncio tasks on this
                 process's event loop, the way the servicer consumes it
* `grpc_stream`  that same `AsyncLLMEngine` behind `llm_service.server.build_server` (the real
                 `LlmService`, health, reflection) on a loopback port, served by a grpc.aio server on
                 this process's event loop (the engine loop keeps its own thread). The clients are
                 `concurrency` concurrent `GenerateStream` calls through the generated stubs on one
                 channel, in a separate process (`--inline-clients`: on the server's event loop)
Both send the same requests: 128 random token ids as text (the proto carries text, not ids; the
synthetic tokenizer maps `w<id>` words back to exactly those ids), greedy, `ignore_eos`, fixed
output length, fresh prompts every run (no prefix-cache hits). A run is a closed loop over
`requests-per-concurrency x concurrency` requests, timed from the first request sent to the last token
received, in the process sending them. After one untimed warm-up of each variant, the variants
alternate (A B A B ...) for `--rounds` rounds so drift hits both; the medians give
overhead_pct = 100 * (1 - grpc_stream / in_process).

`--engine-process` adds a third variant, `grpc_engine_process`: the same service around a
`ProcessEngineClient` (the service's `--engine-process` mode) whose engine, built in its own process
from the same seed, has the same random weights; the headline then also reports its overhead
(`grpc_engine_process_overhead_pct`). Both engines then get a fixed KV cache sized for the load, so
two 7B engines fit on one 80 GB card.

    python benchmarks/bench_grpc_overhead.py --out benchmarks/results          # GPU
    python benchmarks/bench_grpc_overhead.py --tiny --out /tmp/bench           # CPU smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

REPO = Path(__file__).resolve().parents[1]
for _root in (REPO, REPO / "protos" / "gen" / "python"):  # run as a script from a bare checkout
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

import grpc  # noqa: E402
from vlm.v1 import llm_service_pb2, llm_service_pb2_grpc  # noqa: E402

# torch, llm_setup and llm_service are imported inside the functions that need them: the client
# process (spawned from this module) then imports only grpc and the stubs and starts in well under a
# second.
if TYPE_CHECKING:
    from llm_service.engine.async_engine import AsyncLLMEngine
    from llm_service.server import LlmServer

RESULT_FILE = "grpc_overhead.json"
VARIANTS = ("in_process", "grpc_stream")
PROCESS_VARIANT = "grpc_engine_process"
RPC_TIMEOUT_S = 600.0
T = TypeVar("T")


# --- one run (shared by both variants) ----------------------------------------------------------


@dataclass
class RequestRecord:
    submitted: float  # time.perf_counter() in the process that sent the request
    first_token: float | None
    finished: float
    output_tokens: int
    prompt_tokens: int
    chunks: int  # engine outputs / stream messages that carried tokens (the collector may merge steps)


async def closed_loop(
    items: Sequence[T], concurrency: int, one: Callable[[T], Awaitable[RequestRecord]]
) -> tuple[list[RequestRecord], float]:
    """Keep `concurrency` requests in flight until every item is served; (records, seconds)."""
    pending = iter(items)
    records: list[RequestRecord] = []

    async def worker() -> None:
        for item in pending:  # one iterator shared by the workers: each takes the next item
            records.append(await one(item))

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:  # a failure cancels the other workers
        for _ in range(min(concurrency, len(items))):
            group.create_task(worker())
    return records, time.perf_counter() - start


def run_stats(records: Sequence[RequestRecord], elapsed: float, *, prompt_len: int, max_tokens: int) -> dict:
    """Output tok/s of a run and per-request medians; checks that lengths were fixed."""
    tokens = sum(r.output_tokens for r in records)
    if tokens != max_tokens * len(records):
        raise RuntimeError(f"{tokens} output tokens, expected {max_tokens * len(records)}: fixed lengths broken")
    prompts = {r.prompt_tokens for r in records}
    if prompts != {prompt_len}:
        raise RuntimeError(f"prompts of {sorted(prompts)} tokens, expected {prompt_len}")
    ttft = [r.first_token - r.submitted for r in records if r.first_token is not None]
    tpot = [(r.finished - r.first_token) / max(1, r.output_tokens - 1) for r in records if r.first_token is not None]
    return {
        "elapsed_s": elapsed,
        "num_requests": len(records),
        "output_tokens": tokens,
        "output_tok_s": tokens / elapsed,
        "req_s": len(records) / elapsed,
        "ttft_ms_median": 1e3 * statistics.median(ttft),
        "tpot_ms_median": 1e3 * statistics.median(tpot),
        "chunks_per_request_mean": statistics.fmean(r.chunks for r in records),
    }


# --- gRPC clients ---------------------------------------------------------------------------------


def stream_request(text: str, max_tokens: int) -> llm_service_pb2.GenerateStreamRequest:
    return llm_service_pb2.GenerateStreamRequest(
        prompt=text,
        add_special_tokens=False,
        sampling=llm_service_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


async def _stream_one(stub: llm_service_pb2_grpc.LlmServiceStub, request) -> RequestRecord:
    submitted = time.perf_counter()
    first, tokens, chunks, usage = None, 0, 0, None
    async for message in stub.GenerateStream(request, timeout=RPC_TIMEOUT_S):
        if message.token_ids:
            first = first or time.perf_counter()
            tokens += len(message.token_ids)
            chunks += 1
        if message.HasField("usage"):
            usage = message.usage
    if usage is None or usage.completion_tokens != tokens:
        raise RuntimeError(f"stream ended with usage {usage} after {tokens} streamed tokens")
    return RequestRecord(submitted, first, time.perf_counter(), tokens, usage.prompt_tokens, chunks)


async def grpc_load(
    address: str, texts: Sequence[str], max_tokens: int, concurrency: int
) -> tuple[list[RequestRecord], float]:
    """`concurrency` concurrent GenerateStream calls on one channel (connected before the clock starts)."""
    requests = [stream_request(text, max_tokens) for text in texts]
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = llm_service_pb2_grpc.LlmServiceStub(channel)
        return await closed_loop(requests, concurrency, lambda request: _stream_one(stub, request))


def _client_process(conn) -> None:
    """The clients' process: runs each `grpc_load` job received on `conn` and sends back its result
    (or the traceback); None ends it."""
    while (job := conn.recv()) is not None:
        try:
            result = asyncio.run(grpc_load(**job))
        except Exception:  # noqa: BLE001 - reported to the parent
            result = traceback.format_exc()
        conn.send(result)


class ClientProcess:
    """gRPC clients in their own process (spawned: no CUDA state, own GIL), driven over a pipe."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_client_process, args=(child,), name="grpc-clients", daemon=True)
        self._process.start()
        child.close()

    async def run(self, **job) -> tuple[list[RequestRecord], float]:
        self._conn.send(job)
        result = await asyncio.to_thread(self._conn.recv)  # the server keeps serving on this loop meanwhile
        if isinstance(result, str):
            raise RuntimeError(f"gRPC client process failed:\n{result}")
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the process may already be gone
            self._conn.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


# --- the engine in-process --------------------------------------------------------------------------


async def in_process_load(
    engine: AsyncLLMEngine, texts: Sequence[str], max_tokens: int, concurrency: int
) -> tuple[list[RequestRecord], float]:
    """The same requests as `stream_request` builds, straight into `engine.generate()`."""
    from llm_service.engine.engine_core import GenerationInput
    from llm_service.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(text: str) -> RequestRecord:
        inp = GenerationInput(
            request_id=f"bench-{uuid.uuid4().hex}", prompt=text, add_special_tokens=False, sampling=params
        )
        submitted = time.perf_counter()
        first, tokens, chunks, prompt_tokens = None, 0, 0, 0
        async for output in engine.generate(inp):
            if output.new_token_ids:
                first = first or time.perf_counter()
                tokens += len(output.new_token_ids)
                chunks += 1
            prompt_tokens = output.num_prompt_tokens
        return RequestRecord(submitted, first, time.perf_counter(), tokens, prompt_tokens, chunks)

    return await closed_loop(texts, concurrency, one)


def check_same_engine_request(server: LlmServer, text: str, max_tokens: int) -> None:
    """The servicer turns `stream_request(text)` into the very prompt and SamplingParams that
    `in_process_load` sends, so the two variants differ only by the service around the engine."""
    from llm_service import convert
    from llm_service.engine.sampling_params import SamplingParams

    inp = convert.generation_input(
        stream_request(text, max_tokens), engine_request_id="check", defaults=server.servicer.defaults,
        vocab_size=server.servicer.model.vocab_size,
    )
    direct = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if (inp.prompt, inp.add_special_tokens, inp.sampling) != (text, False, direct):
        raise RuntimeError(f"the servicer builds a different engine request: {inp} vs sampling {direct}")


# --- the benchmark ----------------------------------------------------------------------------------


def build_service(engine: AsyncLLMEngine, config_dir: Path) -> LlmServer:
    """Our LLM service around `engine` on a free loopback port. `config_dir` gets the in-memory model's
    config.json: the service reads its model id and fingerprint (GetModelInfo) from the model directory;
    the weights never touch disk."""
    from llm_service.server import build_server

    core = engine.core
    core.model.config.save_pretrained(config_dir)
    return build_server(service_config(core, config_dir), engine)


def service_config(core, config_dir: Path):
    """The engine is built already: of the engine fields, only those GetModelInfo reports are set."""
    from llm_service.config import LlmServiceConfig

    return LlmServiceConfig(
        model_dir=str(config_dir), host="127.0.0.1", port=0, device=core.device.type,
        dtype=str(core.config.torch_dtype).removeprefix("torch."), block_size=core.config.block_size,
        max_num_seqs=core.config.max_num_seqs, max_num_batched_tokens=core.config.max_num_batched_tokens,
    )


async def run_rounds(
    engine: AsyncLLMEngine, args: argparse.Namespace, vocab_size: int, variants: Sequence[str] = VARIANTS
) -> dict:
    """Serve `engine` (and, for `grpc_engine_process`, an engine in its own process), warm every variant
    up, then alternate them for `args.rounds` rounds."""
    from llm_setup import random_prompts, word_prompt

    num_requests = args.requests_per_concurrency * args.concurrency
    seeds = iter(range(1000, 10**6))  # fresh prompts for every run: no prefix-cache hits across runs

    def texts(num: int) -> list[str]:
        return [word_prompt(ids) for ids in random_prompts(num, args.input, vocab_size, seed=next(seeds))]

    runs: list[dict] = []
    clients: ClientProcess | None = None
    process_server: LlmServer | None = None
    with tempfile.TemporaryDirectory() as tmp:
        server = build_service(engine, Path(tmp) / "random-decoder")
        servers = {"grpc_stream": server}

        async def load(variant: str, prompts: list[str], max_tokens: int):
            if variant == "in_process":
                return await in_process_load(engine, prompts, max_tokens, args.concurrency)
            job = dict(address=servers[variant].address, texts=prompts, max_tokens=max_tokens,
                       concurrency=args.concurrency)
            return await (grpc_load(**job) if clients is None else clients.run(**job))

        async def preemptions(variant: str) -> int:
            from llm_service.engine.calls import engine_stats

            target = servers[variant].engine if variant == PROCESS_VARIANT else engine
            return (await target.call(engine_stats)).num_preemptions

        try:
            await server.start()
            await server.start_serving()  # the service's own warm-up generation, then SERVING
            if PROCESS_VARIANT in variants:
                process_server = await build_process_service(engine, args, Path(tmp) / "random-decoder")
                servers[PROCESS_VARIANT] = process_server
                await process_server.start()
                await process_server.start_serving()
            check_same_engine_request(server, texts(1)[0], args.output)
            if not args.inline_clients:
                clients = ClientProcess()
            for variant in variants:  # untimed warm-up at the same concurrency
                await load(variant, texts(args.concurrency), min(args.output, 8))
            for round_index in range(args.rounds):
                for variant in variants:
                    before = await preemptions(variant)
                    records, elapsed = await load(variant, texts(num_requests), args.output)
                    stats = run_stats(records, elapsed, prompt_len=args.input, max_tokens=args.output)
                    stats["num_preemptions"] = await preemptions(variant) - before
                    runs.append({"round": round_index, "variant": variant, **stats})
                    print(f"round {round_index}  {variant:<12} {stats['output_tok_s']:>10.1f} tok/s  "
                          f"ttft p50 {stats['ttft_ms_median']:.1f} ms", flush=True)
        finally:
            if clients is not None:
                clients.close()
            await server.stop_now()
            if process_server is not None:
                await process_server.stop_now()
                process_server.engine.shutdown()
    return {"runs": runs, "num_requests": num_requests}


async def build_process_service(engine: AsyncLLMEngine, args: argparse.Namespace, config_dir: Path) -> LlmServer:
    """The service around a `ProcessEngineClient` whose engine (same config, same seed, so the same
    random weights) is built in its own process (loaded in a worker thread: the constructor blocks)."""
    import functools

    from llm_setup import random_engine_core

    from llm_service.engine.engine_process import ProcessEngineClient
    from llm_service.server import build_server

    core = engine.core
    config = dataclasses.replace(core.config, model_dir=str(config_dir))
    factory = functools.partial(random_engine_core, tiny=args.tiny)
    client = await asyncio.to_thread(ProcessEngineClient, config, core_factory=factory, tokenizer=core.tokenizer)
    return build_server(service_config(core, config_dir), client)  # on the event loop, as grpc.aio needs


def main(argv: list[str] | None = None) -> int:
    import torch
    from llm_setup import build_engine, build_models, environment, release, save_plot, word_prompt, write_json

    from llm_service.engine.async_engine import AsyncLLMEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"directory for {RESULT_FILE} / grpc_overhead.png")
    parser.add_argument("--tiny", action="store_true", help="2-layer model and tiny sizes (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--input", type=int, default=None, help="prompt tokens (default 128, tiny 16)")
    parser.add_argument("--output", type=int, default=None, help="output tokens (default 128, tiny 8)")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 64, tiny 4)")
    parser.add_argument("--requests-per-concurrency", type=int, default=4, help="requests per run = this x concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant, alternating")
    parser.add_argument("--inline-clients", action="store_true",
                        help="run the gRPC clients on the server's event loop instead of a separate process")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="our engine's step budget")
    parser.add_argument("--kv-memory-fraction", type=float, default=0.85)
    parser.add_argument("--enforce-eager", action="store_true", help="our engine without CUDA graphs")
    parser.add_argument("--attention-backend", default="auto", help="our engine's: auto | batched | triton | reference")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave start-up objects to the garbage collector (the services freeze them)")
    parser.add_argument("--engine-process", action="store_true",
                        help=f"also measure the service with its engine in its own process ({PROCESS_VARIANT})")
    args = parser.parse_args(argv)
    args.input = args.input or (16 if args.tiny else 128)
    args.output = args.output or (8 if args.tiny else 128)
    args.concurrency = args.concurrency or (4 if args.tiny else 64)
    if args.rounds < 1 or args.requests_per_concurrency < 1:
        parser.error("--rounds and --requests-per-concurrency must be >= 1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    started = time.perf_counter()
    models = build_models(tiny=args.tiny, device=args.device, dtype=dtype)
    ids = [5, 17, models.config.vocab_size - 1]
    if models.tokenizer(word_prompt(ids), add_special_tokens=False).input_ids != ids:
        raise RuntimeError("the synthetic tokenizer does not map word prompts back to their ids")
    variants = (*VARIANTS, PROCESS_VARIANT) if args.engine_process else VARIANTS
    kv = {}
    if args.engine_process:  # two engines on one card: each gets a fixed cache, twice what the load needs
        kv["num_kv_blocks"] = 2 * args.concurrency * -(-(args.input + args.output) // 16)
    core = build_engine(
        models, max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_memory_fraction=args.kv_memory_fraction, enforce_eager=True if args.enforce_eager else None,
        attention_backend=args.attention_backend, freeze_gc=not args.no_gc_freeze, **kv,
    )
    engine = AsyncLLMEngine(core)  # the one engine object both variants drive
    try:
        measured = asyncio.run(run_rounds(engine, args, models.config.vocab_size, variants))
    finally:
        engine.shutdown()
        release(core)

    medians = {v: statistics.median(r["output_tok_s"] for r in measured["runs"] if r["variant"] == v)
               for v in variants}
    overhead = 100.0 * (1.0 - medians["grpc_stream"] / medians["in_process"])
    shape = (f"{args.input}/{args.output}, concurrency {args.concurrency}, {measured['num_requests']} requests "
             f"per run, median of {args.rounds} alternating runs each")
    clients = ("the same event loop as the server (--inline-clients)" if args.inline_clients
               else "a separate process (multiprocessing spawn), grpc.aio, one channel")
    results = {
        "scenario": "grpc_overhead",
        **environment(device),
        "model": "tiny 2-layer Llama (smoke run)" if args.tiny else "LLaVA-1.5-7B decoder (Vicuna-7B shapes)",
        "weights": "random, created on the device",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"input": args.input, "output": args.output, "concurrency": args.concurrency,
                  "num_requests": measured["num_requests"], "rounds": args.rounds},
        "engine": {"attention_backend": core.config.attention_backend, "cuda_graphs": core.config.use_cuda_graphs,
                   "max_num_seqs": core.config.max_num_seqs,
                   "max_num_batched_tokens": core.config.max_num_batched_tokens,
                   "gc_freeze": not args.no_gc_freeze},
        "setup": {
            "in_process": f"AsyncLLMEngine.generate() from {args.concurrency} asyncio tasks in this process",
            "grpc_stream": "the same AsyncLLMEngine object behind llm_service.server.build_server (LlmService) "
                           "on 127.0.0.1, grpc.aio server on this process's event loop, engine loop on its own "
                           f"thread; {args.concurrency} concurrent GenerateStream calls (generated stubs) from {clients}",
            "requests": f"{args.input} random token ids sent as text ('w<id>' words of the synthetic word-level "
                        "tokenizer, add_special_tokens false) in both variants, so both tokenize; greedy, "
                        f"ignore_eos, {args.output} output tokens; the servicer's engine request was checked equal "
                        "to the in-process one",
            "timing": "closed loop from the first request sent to the last token received, in the sending "
                      "process; one untimed warm-up per variant (8 output tokens); fresh prompts every run",
        },
        "runs": measured["runs"],
        "median_output_tok_s": medians,
        "overhead_pct": overhead,
        "headline": {"grpc_overhead_pct_c64": overhead, "shape": shape, "concurrency": args.concurrency,
                     "in_process_tok_s": medians["in_process"], "grpc_stream_tok_s": medians["grpc_stream"]},
        "variants": list(variants),
        "wall_s": time.perf_counter() - started,
    }
    if args.engine_process:
        results["setup"][PROCESS_VARIANT] = (
            "the same service around a ProcessEngineClient (the service's --engine-process mode): its engine, "
            "built in a spawned process from the same seed, has the same random weights; same clients")
        results["headline"]["grpc_engine_process_tok_s"] = medians[PROCESS_VARIANT]
        results["headline"]["grpc_engine_process_overhead_pct"] = 100.0 * (1.0 - medians[PROCESS_VARIANT]
                                                                            / medians["in_process"])
        results["engine"]["num_kv_blocks"] = kv["num_kv_blocks"]
    write_json(args.out / RESULT_FILE, results)
    print_table(results)
    save_plot(args.out / "grpc_overhead.png", lambda plt: draw(plt, results))
    return 0


def print_table(results: dict) -> None:
    print(f"{results['device']}  {results['dtype']}  {results['headline']['shape']}")
    print(f"{'variant':<20}" + "".join(f"{'run ' + str(i):>11}" for i in range(results["shape"]["rounds"]))
          + f"{'median':>11}  output tok/s")
    for variant in results["variants"]:
        cells = [r["output_tok_s"] for r in results["runs"] if r["variant"] == variant]
        print(f"{variant:<20}" + "".join(f"{v:>11.1f}" for v in cells)
              + f"{results['median_output_tok_s'][variant]:>11.1f}")
    print(f"gRPC overhead: {results['overhead_pct']:.2f} % of in-process tok/s (target <= 5 %)")
    if "grpc_engine_process_overhead_pct" in results["headline"]:
        print(f"gRPC overhead with the engine in its own process: "
              f"{results['headline']['grpc_engine_process_overhead_pct']:.2f} %")


def draw(plt, results: dict):
    fig, ax = plt.subplots(figsize=(5, 4))
    variants = results["variants"]
    medians = [results["median_output_tok_s"][v] for v in variants]
    ax.bar(variants, medians, color=["tab:blue", "tab:orange", "tab:green"][: len(variants)], alpha=0.8,
           label="median")
    for i, variant in enumerate(variants):
        runs = [r["output_tok_s"] for r in results["runs"] if r["variant"] == variant]
        ax.scatter([i] * len(runs), runs, color="black", s=14, zorder=3, label="runs" if i == 0 else None)
    ax.set_ylabel("output tok/s")
    ax.set_title(f"gRPC overhead {results['overhead_pct']:.1f} % (target <= 5 %)\n{results['headline']['shape']}",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']}, {results['dtype']}, {results['device']}", fontsize=9)
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
