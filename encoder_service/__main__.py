"""``python -m encoder_service --model DIR --port N ...`` (console script ``vlm-encoder``).

Every flag can also come from the environment as ``VLM_ENCODER_<FLAG>`` (upper case, dashes as
underscores, e.g. ``VLM_ENCODER_MAX_BATCH_SIZE=16``); a flag on the command line wins. The environment
is read here, once, and nowhere else. SIGTERM/SIGINT drain gracefully; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from encoder_service.config import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    COMPUTE_DTYPES,
    ENCODER_CUDA_THREADS,
    OUTPUT_DTYPES,
    SDPA_BACKENDS,
    EncoderConfig,
    MediaLimits,
    UrlPolicy,
)
from vlm_protocol.errors import VlmError
from vlm_protocol.sizes import parse_bytes

logger = logging.getLogger("encoder_service")

ENV_PREFIX = "VLM_ENCODER_"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-encoder",
        description="gRPC encoder service: images and videos -> embeddings for the LLM service.",
        epilog=f"Every flag may also be set as an environment variable {ENV_PREFIX}<FLAG>.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    model.add_argument(
        "--engine-dir",
        type=Path,
        help="visual engine exported from --model by build/export_visual_engine.py, run instead of the "
        "eager modules (needs the same --dtype and device type)",
    )
    model.add_argument("--model-id", help="name reported by GetModelInfo (default: the directory name)")
    model.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    model.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype")
    model.add_argument(
        "--output-dtype", choices=OUTPUT_DTYPES, help="default dtype of returned features (default: --dtype)"
    )
    model.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, torch.compile the vision tower + projector, one static graph per batch bucket, "
        "all compiled before health reports SERVING (LLaVA, VILA, OneVision; CPU and --engine-dir run "
        "as they are; default: on)",
    )
    model.add_argument(
        "--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode (default)"
    )
    model.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capture each compiled batch bucket in a CUDA graph and replay it (compile scope model, "
        "modes without their own CUDA graphs; at batch 1 a replay is ~4x faster than the compiled call "
        "on an H100; default: on)",
    )
    model.add_argument(
        "--compile-scope",
        default="model",
        choices=COMPILE_SCOPES,
        help="what one compiled graph covers: the whole tower + projector (model), or one encoder layer, "
        "shared by all layers, plus the projector (layer: compiles ~20x faster; modes without CUDA "
        "graphs only; default: model)",
    )
    model.add_argument(
        "--compile-buckets",
        type=_bucket_list,
        metavar="N[,N...]",
        help="batch sizes compiled; smaller batches are padded to the next, larger ones run in chunks "
        "(default: powers of two below --max-batch-size, and --max-batch-size)",
    )
    model.add_argument(
        "--sdpa-backend",
        default="auto",
        choices=SDPA_BACKENDS,
        help="attention kernels of the vision tower on CUDA (default: auto, PyTorch's choice)",
    )

    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="interface to bind (default: 0.0.0.0)")
    server.add_argument("--port", type=int, default=50051, help="TCP port, 0 = any free one (default: 50051)")
    server.add_argument(
        "--max-message-bytes", type=parse_bytes, default=256 * 1024**2, help="gRPC message limit"
    )
    server.add_argument("--grace-period-s", type=float, default=10.0, help="drain: time for in-flight RPCs")
    server.add_argument(
        "--drain-delay-s", type=float, default=0.0, help="drain: keep serving after NOT_SERVING"
    )
    server.add_argument(
        "--max-concurrent-rpcs", type=int, help="refuse RPCs beyond this many (default: no limit)"
    )
    server.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default: INFO)")

    batching = parser.add_argument_group("batching and cache")
    batching.add_argument("--max-batch-size", type=int, default=8, help="items per model run (default: 8)")
    batching.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=0.0,
        help="how long an item waits for companions when the model is idle (default 0: run at once; "
        "items arriving while a batch runs form the next batch anyway)",
    )
    batching.add_argument(
        "--max-queue-size", type=int, default=256, help="queued items before RESOURCE_EXHAUSTED"
    )
    batching.add_argument(
        "--cache-bytes", type=parse_bytes, default="1GiB", help="embedding cache budget; 0 = off"
    )
    batching.add_argument("--num-workers", type=int, default=2, help="decode/preprocess threads (default: 2)")
    batching.add_argument("--num-fetch-workers", type=int, default=8, help="URL fetch threads (default: 8)")
    batching.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="CPU threads torch may use per operator; 0 = auto (default): at most 4 with a CUDA --device "
        "(unless OMP_NUM_THREADS is set), torch's default on CPU",
    )

    transport = parser.add_argument_group("embedding transport")
    transport.add_argument(
        "--shared-memory-mb",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="size in MiB of a POSIX shared-memory ring (/dev/shm/vlm-emb-*) for Encode requests that ask "
        "for EMBEDDING_TRANSPORT_SHARED_MEMORY: the features are written there and only a reference "
        "crosses gRPC, for an LLM service on the same host that shares /dev/shm (compose: ipc). The "
        "ring holds the last N MiB of embeddings (a LLaVA-1.5 image is 4.5 MiB in bf16); its pages are "
        "reserved at start-up, so /dev/shm must have room (Docker's default is 64 MiB: set shm_size). "
        "0 = off (default)",
    )

    limits = parser.add_argument_group("media limits")
    limits.add_argument("--max-items-per-request", type=int, default=16, help="media items per Encode (16)")
    limits.add_argument("--max-media-bytes", type=parse_bytes, default="32MiB", help="encoded file size cap")
    limits.add_argument("--max-image-pixels", type=int, default=40_000_000, help="width*height cap (40M)")
    limits.add_argument("--max-video-frames", type=int, default=64, help="frames encoded per video (64)")
    limits.add_argument("--default-num-frames", type=int, default=8, help="frames sampled when unset (8)")

    urls = parser.add_argument_group("URL policy")
    urls.add_argument(
        "--url-fetch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fetch http(s) URLs (data: URIs always work; default: on)",
    )
    urls.add_argument(
        "--url-allow-private",
        action="append",
        default=[],
        metavar="HOST|IP|CIDR[,...]",
        help="hosts or networks whose private/loopback/link-local addresses may be fetched (repeatable)",
    )
    urls.add_argument(
        "--media-root", type=Path, help="directory for file:// URLs and paths (default: refused)"
    )
    urls.add_argument("--url-connect-timeout-s", type=float, default=5.0, help="connect timeout per hop (5)")
    urls.add_argument(
        "--url-read-timeout-s", type=float, default=10.0, help="max wait for the next bytes (10)"
    )
    urls.add_argument("--url-timeout-s", type=float, default=30.0, help="whole fetch incl. redirects (30)")
    urls.add_argument("--url-max-redirects", type=int, default=5, help="redirect hops followed (5)")
    return parser


def _bucket_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive batch sizes, e.g. 1,2,4,8")
    return values


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0 (0 = off)")
    return value


def _apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Flag defaults from ``VLM_ENCODER_*`` variables (type conversion as for command-line values)."""
    defaults: dict[str, object] = {}
    for action in parser._actions:  # argparse has no public iterator over actions
        if not action.option_strings or action.dest == "help":
            continue
        value = environ.get(ENV_PREFIX + action.dest.upper())
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            lowered = value.strip().lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={value!r} is not a boolean")
            defaults[action.dest] = lowered in ("1", "true", "yes", "on")
        elif isinstance(action, argparse._AppendAction):
            defaults[action.dest] = [value]
        else:
            defaults[action.dest] = value  # argparse converts string defaults with the action's type
            action.required = False
    parser.set_defaults(**defaults)


def config_from_args(args: argparse.Namespace) -> EncoderConfig:
    from vlm_protocol.grpc_server import ServerConfig

    entries = [part for value in args.url_allow_private for part in value.split(",")]
    hosts, networks = UrlPolicy.parse_allow_list(entries)
    return EncoderConfig(
        model_dir=args.model,
        engine_dir=args.engine_dir,
        model_id=args.model_id,
        device=args.device,
        dtype=args.dtype,
        output_dtype=args.output_dtype,
        max_batch_size=args.max_batch_size,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_scope=args.compile_scope,
        cuda_graphs=args.cuda_graphs,
        compile_buckets=args.compile_buckets,
        sdpa_backend=args.sdpa_backend,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        cache_bytes=args.cache_bytes,
        num_workers=args.num_workers,
        num_fetch_workers=args.num_fetch_workers,
        torch_threads=args.torch_threads,
        shared_memory_bytes=args.shared_memory_mb * 1024 * 1024,
        limits=MediaLimits(
            max_items_per_request=args.max_items_per_request,
            max_media_bytes=args.max_media_bytes,
            max_image_pixels=args.max_image_pixels,
            max_video_frames=args.max_video_frames,
            default_num_frames=args.default_num_frames,
        ),
        url_policy=UrlPolicy(
            allow_fetch=args.url_fetch,
            allowed_hosts=hosts,
            allowed_networks=networks,
            media_root=args.media_root,
            connect_timeout_s=args.url_connect_timeout_s,
            read_timeout_s=args.url_read_timeout_s,
            total_timeout_s=args.url_timeout_s,
            max_redirects=args.url_max_redirects,
        ),
        server=ServerConfig(
            host=args.host,
            port=args.port,
            max_message_bytes=args.max_message_bytes,
            grace_period_s=args.grace_period_s,
            drain_delay_s=args.drain_delay_s,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
        ),
    )


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[EncoderConfig, str]:
    """(config, log level) from flags and environment; exits with a usage error on bad values."""
    parser = build_parser()
    _apply_env_defaults(parser, os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args), args.log_level.upper()
    except VlmError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


async def serve(config: EncoderConfig) -> None:
    from encoder_service.server import build_server, load_engine
    from vlm_protocol.gc_freeze import freeze_startup_objects
    from vlm_protocol.grpc_server import install_signal_handlers
    from vlm_protocol.torch_threads import apply_torch_threads

    # before any worker thread; see vlm_protocol/torch_threads.py for why the encoder's auto is 4
    apply_torch_threads(config.torch_threads, config.device, service="encoder", cuda_auto=ENCODER_CUDA_THREADS)
    loop = asyncio.get_running_loop()
    ring = None
    if config.shared_memory_bytes:
        from vlm_protocol.shared_memory import SharedMemoryRing

        ring = SharedMemoryRing(config.shared_memory_bytes)  # before the model: a full /dev/shm fails fast
    # the ring's pages are mapped now, beside the model load (no GIL held), not by the first requests
    prefault = loop.run_in_executor(None, ring.prefault) if ring is not None else None
    try:
        engine = await loop.run_in_executor(None, load_engine, config)  # keep the loop free while loading
        if prefault is not None:
            await prefault
        server = build_server(config, engine, shared_memory=ring)
    except BaseException:
        if ring is not None:
            with contextlib.suppress(BaseException):
                await prefault  # done within a second; the region must not be closed under it
            ring.close()
        raise
    remove_handlers = install_signal_handlers(server.running)
    try:
        await server.start()  # health NOT_SERVING until the warm-up encode has run
        freeze_startup_objects("encoder service")  # full GC passes would stall the batcher
        logger.info("encoder serving %s on %s", config.display_model_id, server.address)
        await server.running.wait_for_termination()
    finally:
        remove_handlers()
        if not server.running.is_draining:
            await server.running.stop_now()
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    config, log_level = parse_config(argv)
    logging.basicConfig(
        level=getattr(logging, log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config))
    except VlmError as exc:
        logger.error("encoder failed to start: %s", exc)
        return 1
    except OSError as exc:
        logger.error("encoder failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
