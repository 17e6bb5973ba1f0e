"""Server assembly, separate from ``main`` so tests start real servers in-process.

Lifecycle: ``build_server(config, engine)`` (bound, not started) -> ``start()`` (listening, health
NOT_SERVING, Encode answers UNAVAILABLE) -> warm-up (on CUDA every batch bucket compiled, then one
dummy encode) -> ``set_serving`` -> ... -> ``drain()`` (NOT_SERVING, in-flight RPCs finish) ->
``close()`` (batcher and pools stopped).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from encoder_service.config import EncoderConfig
from encoder_service.engines.base import VisualEngine
from encoder_service.fetch import MediaFetcher
from encoder_service.pipeline import EncoderPipeline
from encoder_service.service import SERVICE_NAME, EncoderService
from vlm_protocol import media_ids
from vlm_protocol.checkpoint_identity import model_fingerprint, processor_config_hash
from vlm_protocol.grpc_server import RunningServer, ServiceRegistration
from vlm_protocol.grpc_server import build_server as build_grpc_server
from vlm_protocol.shared_memory import SharedMemoryRing

if TYPE_CHECKING:
    from encoder_service.engines.compiled import CompileSettings

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EncoderServer:
    """A built encoder server: the gRPC server (``running``) and the pipeline behind it."""

    def __init__(self, running: RunningServer, pipeline: EncoderPipeline, service: EncoderService) -> None:
        self.running = running
        self.pipeline = pipeline
        self.service = service

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def shared_memory(self) -> SharedMemoryRing | None:
        """The shared-memory ring Encode writes into on request (``--shared-memory-mb``), if any."""
        return self.service.shared_memory

    @property
    def port(self) -> int:
        return self.running.port

    async def start(self, *, warm_up: bool = True) -> None:
        """Listen (health NOT_SERVING), then, unless ``warm_up`` is False, warm up and report SERVING."""
        await self.pipeline.start()
        await self.running.start()
        if warm_up:
            await self.warm_up()

    async def warm_up(self) -> None:
        await self.pipeline.warm_up()
        await self.running.set_serving()

    async def drain(self, grace_period_s: float | None = None) -> None:
        """Graceful stop (NOT_SERVING, in-flight RPCs finish), then release the pipeline."""
        await self.running.drain(grace_period_s)
        await self.close()

    async def stop_now(self) -> None:
        await self.running.stop_now()
        await self.close()

    async def close(self) -> None:
        """Release the pipeline and unlink the shared-memory region once the gRPC server has stopped
        (after a signal-driven drain). Idempotent."""
        await self.pipeline.close()
        if self.shared_memory is not None:
            self.shared_memory.close()


def build_server(
    config: EncoderConfig,
    engine: VisualEngine,
    *,
    fetcher: MediaFetcher | None = None,
    shared_memory: SharedMemoryRing | None = None,
) -> EncoderServer:
    """Bind a server for ``engine`` (call inside the event loop that will run it; then ``start()``).

    ``shared_memory``: the ring for ``config.shared_memory_bytes`` if the caller already created it
    (``serve`` does, before loading the model, to fail fast); otherwise it is created here. The server
    owns it from now on and unlinks it in ``close``.
    """
    identity = media_ids.PreprocessingIdentity(
        model_family=engine.family,
        model_fingerprint=model_fingerprint(config.model_dir),
        processor_config_hash=processor_config_hash(config.model_dir),
    )
    ring = shared_memory
    if ring is None and config.shared_memory_bytes:
        ring = SharedMemoryRing(config.shared_memory_bytes)  # a too small /dev/shm fails here, clearly
        ring.prefault()
    try:
        pipeline = EncoderPipeline(config, engine, identity, fetcher=fetcher)
        service = EncoderService(pipeline, config, shared_memory=ring)
        registration = ServiceRegistration(_add_servicer, service, SERVICE_NAME)
        running = build_grpc_server(config.server, [registration])
    except BaseException:
        if ring is not None:
            ring.close()
        raise
    if ring is not None:
        logger.info("shared-memory embedding transport: %s (%.0f MiB)", ring.path, ring.size_bytes / 2**20)
    return EncoderServer(running, pipeline, service)


def load_engine(config: EncoderConfig) -> VisualEngine:
    """Load the visual engine the config names: eager modules from the checkpoint, or the exported
    engine in ``config.engine_dir`` (verified against the checkpoint; FailedPreconditionError if not)."""
    from encoder_service.engines import load_visual_engine

    engine = load_visual_engine(
        Path(config.model_dir),
        device=config.device,
        dtype=_TORCH_DTYPES[config.dtype],
        engine_dir=config.engine_dir,
    )
    how = "eager" if config.engine_dir is None else f"exported engine {config.engine_dir}"
    settings = fast_path_settings(config)
    if settings is not None and engine.enable_fast_path(settings):
        how = (
            f"torch.compile mode={settings.mode} scope={settings.scope}, batch buckets {list(settings.buckets)}"
            if settings.compile
            else "eager"
        )
        if settings.sdpa_backend != "auto":
            how += f", SDPA {settings.sdpa_backend}"
    elif settings is not None:
        logger.info("the %s compute has no compiled path here; it runs as loaded", engine.family)
    logger.info(
        "loaded %s visual engine (%s, hidden %d) from %s on %s/%s (%s)",
        engine.family,
        engine.kind,
        engine.llm_hidden_size,
        config.model_dir,
        config.device,
        config.dtype,
        how,
    )
    return engine


def fast_path_settings(config: EncoderConfig) -> CompileSettings | None:
    """The `CompileSettings` for this config's engine, or None when it runs as loaded: on a CPU (CI,
    where compiling costs more than it saves), with an exported engine (already a compiled artifact),
    or with --no-compile and the default SDPA backend."""
    from encoder_service.engines.compiled import CompileSettings

    if config.engine_dir is not None or torch.device(config.device).type != "cuda":
        return None
    if not config.compile and config.sdpa_backend == "auto":
        return None
    return CompileSettings(
        compile=config.compile,
        mode=config.compile_mode,
        buckets=config.batch_buckets if config.compile else (),
        sdpa_backend=config.sdpa_backend,
        scope=config.compile_scope,
        cuda_graphs=config.compile and config.cuda_graphs and config.compile_scope == "model",
    )


def _add_servicer(servicer: EncoderService, server) -> None:
    from vlm.v1 import encoder_service_pb2_grpc

    encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server)
