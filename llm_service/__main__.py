"""`python -m llm_service --model DIR [--port N] [...]` (console script `vlm-llm`): serve one checkpoint."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from llm_service.config import DEFAULT_PORT, LlmServiceConfig, MiB
from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.sizes import parse_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-llm",
        description="Serve a vision-language model's LLM side (vlm.v1.LlmService) over gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (HF layout; VILA with llm/)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="interface to bind")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 = any free port)")
    server.add_argument(
        "--max-message-bytes",
        type=parse_bytes,
        default=256 * MiB,
        help="largest gRPC message sent or received",
    )
    server.add_argument(
        "--grace-period-s",
        type=float,
        default=10.0,
        help="on SIGTERM, how long in-flight requests may finish",
    )
    server.add_argument(
        "--drain-delay-s",
        type=float,
        default=0.0,
        help="on SIGTERM, how long to report NOT_SERVING before refusing calls",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    engine.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    engine.add_argument("--max-num-seqs", type=int, default=64, help="requests generated at once")
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    kv = engine.add_mutually_exclusive_group()
    kv.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks")
    kv.add_argument(
        "--kv-memory-fraction",
        type=float,
        default=0.85,
        help="KV cache size as a fraction of the GPU memory free after loading",
    )
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    engine.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8_e4m3"),
        default="auto",
        help="element type of the paged KV cache: auto = the model dtype; fp8_e4m3 = float8_e4m3fn "
        "(half the bytes: twice the KV blocks in the same memory, less K/V traffic per decode step) "
        "with a per-tensor scale of 1.0, K/V stored as the nearest e4m3 value and saturated to +-448 "
        "(no NaN; calibrated scales are future work). With the triton attention it needs compute "
        "capability >= 8.9 (Ada/Hopper). mllama's cross-attention K/V stay in the model dtype",
    )
    engine.add_argument(
        "--max-model-len", type=int, default=None, help="context limit (default: the checkpoint's)"
    )
    engine.add_argument(
        "--max-queue-size",
        type=int,
        default=1024,
        help="waiting requests; beyond it calls fail with RESOURCE_EXHAUSTED",
    )
    engine.add_argument(
        "--max-prefill-chunk-tokens",
        type=int,
        default=None,
        help="longest prompt chunk of one request per step (default: the step budget)",
    )
    engine.add_argument("--no-prefix-caching", action="store_true", help="disable KV prefix reuse")
    engine.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler")
    engine.add_argument(
        "--attention-backend",
        choices=("auto", "reference", "batched", "triton"),
        default="auto",
        help="paged attention: batched (one SDPA call for decode rows, one for prefill chunks), "
        "triton (decode rows and prefill chunks read the paged cache in place, Triton kernels; CUDA only) or "
        "reference (one call per sequence); auto = triton on CUDA, batched elsewhere",
    )
    engine.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step eagerly: no CUDA graphs (by default decode steps replay graphs on CUDA)",
    )
    engine.add_argument(
        "--max-prefill-graph-tokens",
        type=int,
        default=2048,
        help="steps other than plain decode (prefill chunks, image rows, mixed) of up to this many tokens "
        "run as piecewise CUDA graphs around the attention; 0: eagerly (default 2048, capped at "
        "--max-num-batched-tokens; off with --enforce-eager)",
    )
    engine.add_argument(
        "--no-skinny-gemm",
        action="store_true",
        help="always use cuBLAS for the projections (by default, on CUDA, inputs of at most 16 rows use a "
        "Triton skinny GEMM for every weight shape where start-up timing measures it faster)",
    )
    engine.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="CPU threads torch may use per operator in this service; 0 = auto (default): 1 when the "
        "model runs on CUDA, so that host copies never wait on a thread another process has "
        "preempted (unless OMP_NUM_THREADS is set), torch's default on CPU",
    )
    engine.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine in its own process (spawned), so the gRPC threads and the engine loop "
        "do not share one GIL (H200, 64 streams: 0.08%% below in-process tok/s, 13.7%% without; a "
        "first image's TTFT the same either way). Default: on with a CUDA device, off on CPU",
    )
    service = parser.add_argument_group("service")
    service.add_argument(
        "--embedding-cache-bytes",
        type=parse_bytes,
        default=2048 * MiB,
        help="budget of the content-id embedding cache (0 disables it)",
    )
    service.add_argument(
        "--accept-shared-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="accept embeddings whose features an encoder on this host left in shared memory "
        "(EMBEDDING_TRANSPORT_SHARED_MEMORY): only its /dev/shm/vlm-emb-* regions are opened, read-only, "
        "and each slot is checked and copied; the encoder's /dev/shm must be visible here (same host, "
        "compose: ipc). Off: such inputs get FAILED_PRECONDITION and clients send bytes",
    )
    service.add_argument(
        "--encoder-address",
        default=None,
        help="host:port of an EncoderService; enables raw media inputs (one-call mode)",
    )
    service.add_argument("--encoder-timeout-s", type=float, default=60.0, help="limit for one Encode call")
    service.add_argument(
        "--default-max-tokens", type=int, default=256, help="max_tokens when a request sends 0"
    )
    service.add_argument(
        "--request-timeout-s",
        type=float,
        default=None,
        help="server-side limit per request (default: only the client's deadline)",
    )
    service.add_argument("--max-multimodal-inputs", type=int, default=16, help="images/videos per request")
    service.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(args: argparse.Namespace) -> LlmServiceConfig:
    return LlmServiceConfig(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_bytes,
        grace_period_s=args.grace_period_s,
        drain_delay_s=args.drain_delay_s,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_memory_fraction=args.kv_memory_fraction,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_queue_size=args.max_queue_size,
        max_prefill_chunk_tokens=args.max_prefill_chunk_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        max_prefill_graph_tokens=args.max_prefill_graph_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
        skinny_gemm=not args.no_skinny_gemm,
        torch_threads=args.torch_threads,
        engine_process=args.engine_process,
        embedding_cache_bytes=args.embedding_cache_bytes,
        accept_shared_memory=args.accept_shared_memory,
        encoder_address=args.encoder_address,
        encoder_timeout_s=args.encoder_timeout_s,
        default_max_tokens=args.default_max_tokens,
        request_timeout_s=args.request_timeout_s,
        max_multimodal_inputs=args.max_multimodal_inputs,
        warmup=not args.no_warmup,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except InvalidArgumentError as exc:
        parser.error(str(exc))
    from llm_service.server import serve  # torch and the model code load only once the flags are valid

    try:
        asyncio.run(serve(config))
    except (FileNotFoundError, ValueError, OSError) as exc:
        logging.getLogger("llm_service").error("cannot serve %s: %s", config.model_dir, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
