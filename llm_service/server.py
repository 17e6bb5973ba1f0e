"""Assembling and running the LLM service: `build_server(config, engine)` for tests and `serve(config)`
for the command line.

Lifecycle: build (bound, not started) -> `start()` (listening, health NOT_SERVING, generation calls
answer UNAVAILABLE) -> `start_serving()` (a tiny warm-up generation, then SERVING) -> `drain()`
(NOT_SERVING, in-flight calls finish within the grace period, new calls are refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from vlm.v1 import llm_service_pb2_grpc

from llm_service.config import LlmServiceConfig, default_sampling
from llm_service.encoder_client import EncoderClient
from llm_service.engine.async_engine import AsyncLLMEngine
from llm_service.engine.engine_core import EngineCore, GenerationInput
from llm_service.engine.engine_process import ProcessEngineClient
from llm_service.engine.sampling_params import SamplingParams
from llm_service.model_info import ModelDescription
from llm_service.servicer import SERVICE_NAME, LlmService
from vlm_protocol import grpc_server
from vlm_protocol.gc_freeze import freeze_startup_objects
from vlm_protocol.grpc_server import RunningServer, ServiceRegistration
from vlm_protocol.torch_threads import apply_torch_threads

logger = logging.getLogger(__name__)


class LlmServer:
    """A built LLM service: the gRPC server (`running`), its servicer and the engine it drives."""

    def __init__(
        self, running: RunningServer, servicer: LlmService, engine: AsyncLLMEngine | ProcessEngineClient
    ) -> None:
        self.running = running
        self.servicer = servicer
        self.engine = engine

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def address(self) -> str:
        return self.running.address

    async def start(self) -> None:
        """Listen; health stays NOT_SERVING and generation calls answer UNAVAILABLE until `start_serving`."""
        await self.running.start()

    async def warm_up(self) -> None:
        """One tiny generation, so the first real request does not pay for lazy initialisation."""
        model = self.servicer.model
        token_id = model.bos_token_id
        if token_id is None:
            token_id = model.eos_token_ids[0] if model.eos_token_ids else 0
        inp = GenerationInput(
            request_id="warmup-" + uuid.uuid4().hex,
            prompt_token_ids=[token_id],
            sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        )
        async for _ in self.engine.generate(inp):
            pass

    async def start_serving(self, *, warmup: bool = True) -> None:
        """Warm up (unless told not to), then accept generation calls and report SERVING."""
        if warmup:
            await self.warm_up()
        self.servicer.set_ready()
        await self.running.set_serving()
        logger.info("LLM service ready on %s", self.address)

    async def drain(self, grace_period_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish (up to the grace period), stop."""
        await self.running.drain(grace_period_s)
        await self.servicer.close()

    async def stop_now(self) -> None:
        await self.running.stop_now()
        await self.servicer.close()

    async def wait_for_termination(self) -> None:
        await self.running.wait_for_termination()


def build_server(
    config: LlmServiceConfig,
    engine: AsyncLLMEngine | ProcessEngineClient,
    *,
    model: ModelDescription | None = None,
) -> LlmServer:
    """Wire servicer, health, reflection and limits around `engine`, and bind the port. Call inside
    the event loop that will run it; then `start()` and `start_serving()`."""
    if model is None:
        model = engine.describe(config.model_dir)
    encoder = None
    if config.encoder_address:
        encoder = EncoderClient(
            config.encoder_address,
            max_message_bytes=config.max_message_bytes,
            timeout_s=config.encoder_timeout_s,
        )
    servicer = LlmService(
        engine,
        model,
        config,
        defaults=default_sampling(config.model_dir, config.default_max_tokens),
        encoder=encoder,
    )
    registration = ServiceRegistration(
        llm_service_pb2_grpc.add_LlmServiceServicer_to_server, servicer, SERVICE_NAME
    )
    running = grpc_server.build_server(config.server_config(), [registration])
    if isinstance(engine, ProcessEngineClient):
        _report_engine_death(engine, running)
    return LlmServer(running, servicer, engine)


def _report_engine_death(engine: ProcessEngineClient, running: RunningServer) -> None:
    """A dead engine process cannot come back: health goes NOT_SERVING so that orchestrators restart
    the service (every generation call already answers UNAVAILABLE)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def report() -> None:
        logger.error("the engine process is gone: health is NOT_SERVING; restart the service")
        task = asyncio.ensure_future(running.set_not_serving())
        tasks.add(task)  # held until done
        task.add_done_callback(tasks.discard)

    def on_death() -> None:
        with contextlib.suppress(RuntimeError):  # that server's loop is closed: nothing to report to
            loop.call_soon_threadsafe(report)

    engine.on_death(on_death)


async def serve(config: LlmServiceConfig) -> None:
    """Load the model, serve until SIGTERM/SIGINT (drain; a second signal stops at once), shut down."""
    logger.info(
        "loading %s on %s%s",
        config.model_dir,
        config.resolved_device,
        " in an engine process" if config.use_engine_process else "",
    )
    engine: AsyncLLMEngine | ProcessEngineClient
    apply_torch_threads(config.torch_threads, config.resolved_device, service="llm service")
    if config.use_engine_process:
        engine = await asyncio.to_thread(ProcessEngineClient, config.engine_config())
    else:
        engine = AsyncLLMEngine(await asyncio.to_thread(EngineCore, config.engine_config()))
    try:
        server = build_server(config, engine)
        await server.start()
        remove_handlers = grpc_server.install_signal_handlers(server.running)
        terminated = False
        try:
            await server.start_serving(warmup=config.warmup)
            freeze_startup_objects("llm service")  # full GC passes would stall the engine loop
            await server.wait_for_termination()
            terminated = True
        finally:
            remove_handlers()
            if not terminated:  # warm-up failed or we were cancelled: do not leave the port open
                await server.running.stop_now()
            await server.servicer.close()
    finally:
        engine.shutdown()
