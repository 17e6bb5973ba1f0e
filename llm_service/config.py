"""Settings of one LLM service process, built once from CLI flags and passed down explicitly.

`LlmServiceConfig` holds the transport settings (mapped to `vlm_protocol.grpc_server.ServerConfig`),
the engine flags (mapped to `EngineConfig`) and the service's own knobs: embedding cache budget,
encoder address for one-call mode, default `max_tokens`, request timeout, request limits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_service.engine.sampling_params import SamplingParams
from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.grpc_server import ServerConfig

if TYPE_CHECKING:
    from llm_service.engine.engine_core import EngineConfig

MiB = 1024 * 1024
DEFAULT_PORT = 50052
_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # as layers/attention.py's KV_CACHE_DTYPES (no torch import here)


@dataclass(frozen=True)
class LlmServiceConfig:
    """Everything `python -m llm_service` can be told. Validated on construction.

    Server: `host`, `port` (0 = any free port), `max_message_bytes` (both directions; 256 MiB fits
    several OneVision embeddings), `grace_period_s` (how long a drain lets in-flight RPCs finish),
    `drain_delay_s` (NOT_SERVING before refusing calls, so balancers move away).

    Engine (see `EngineConfig`): `device` ("auto" = cuda when available), `dtype`, `block_size`,
    `num_kv_blocks` (None: from `kv_memory_fraction` on CUDA), `max_num_seqs`,
    `max_num_batched_tokens` (per step), `max_model_len` (None: the checkpoint's), `max_queue_size`
    (waiting requests; more -> RESOURCE_EXHAUSTED), `max_prefill_chunk_tokens`,
    `enable_prefix_caching`, `seed`, `engine_process` (run the EngineCore in a child process, so the
    gRPC threads and the engine loop do not share one GIL; None = auto: on with a CUDA device),
    `kv_cache_dtype` ("auto" = the model dtype; "fp8_e4m3" = float8_e4m3fn, twice the blocks).

    Service: `embedding_cache_bytes` (0 disables the cache: content_id references then always
    answer NOT_FOUND), `accept_shared_memory` (read embedding features that an encoder on this host
    left in its /dev/shm ring: only `vlm-emb-*` regions, read-only), `encoder_address` (enables raw
    media inputs), `encoder_timeout_s`,
    `default_max_tokens` (for `max_tokens == 0`), `request_timeout_s` (server-side cap per request,
    None = only the client's deadline), `max_multimodal_inputs`, `warmup`.
    """

    model_dir: str
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    max_message_bytes: int = 256 * MiB
    grace_period_s: float = 10.0
    drain_delay_s: float = 0.0
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_memory_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_queue_size: int = 1024
    max_prefill_chunk_tokens: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    attention_backend: str = "auto"  # auto | reference | batched | triton (EngineConfig validates)
    enforce_eager: bool = False  # True: no CUDA graphs (decode steps replay them on CUDA by default)
    engine_process: bool | None = None  # the EngineCore in its own process (ProcessEngineClient); None: on CUDA
    max_prefill_graph_tokens: int = 2048  # prefill/mixed steps up to this many tokens replay piecewise graphs
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8_e4m3 (saturating cast, scale 1.0)
    skinny_gemm: bool = True  # CUDA: decode-sized GEMMs on the Triton kernel where measured faster
    torch_threads: int = 0  # torch CPU threads per operator; 0 = auto (1 on CUDA): vlm_protocol/torch_threads.py
    embedding_cache_bytes: int = 2048 * MiB
    accept_shared_memory: bool = True
    encoder_address: str | None = None
    encoder_timeout_s: float = 60.0
    default_max_tokens: int = 256
    request_timeout_s: float | None = None
    max_multimodal_inputs: int = 16
    warmup: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"{name} {why}, got {getattr(self, name)!r}")

        if not self.model_dir:
            raise InvalidArgumentError("model_dir must name a checkpoint directory")
        if self.device not in _DEVICES and not self.device.startswith("cuda:"):
            raise bad("device", f"must be one of {', '.join(_DEVICES)} or cuda:N")
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"must be one of {', '.join(_DTYPES)}")
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_queue_size",
            "default_max_tokens",
            "max_multimodal_inputs",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("num_kv_blocks", "max_model_len", "max_prefill_chunk_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, "must be >= 1 or unset")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise bad("kv_memory_fraction", "must be in (0, 1]")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise bad("max_num_batched_tokens", f"must be >= max_num_seqs ({self.max_num_seqs})")
        if self.embedding_cache_bytes < 0:
            raise bad("embedding_cache_bytes", "must be >= 0 (0 disables the cache)")
        if self.encoder_address is not None and not self.encoder_address.strip():
            raise bad("encoder_address", "must be host:port or unset")
        if not (math.isfinite(self.encoder_timeout_s) and self.encoder_timeout_s > 0):
            raise bad("encoder_timeout_s", "must be > 0")
        if self.request_timeout_s is not None and not (
            math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0
        ):
            raise bad("request_timeout_s", "must be > 0 or unset")
        if not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2^63)")
        if self.attention_backend not in ("auto", "reference", "batched", "triton"):
            raise bad("attention_backend", "must be auto, reference, batched or triton")
        if self.torch_threads < 0:
            raise bad("torch_threads", "must be >= 0 (0 = auto)")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"must be one of {', '.join(_KV_CACHE_DTYPES)}")
        self.server_config()  # validates host, port, message size, grace period, drain delay

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def use_engine_process(self) -> bool:
        """Auto: on CUDA, where the engine loop and the gRPC threads fighting over one GIL cost 13.7%
        of output tok/s at 64 streams (H200; 0.08% with the engine process) and a first image's TTFT
        measured the same either way; on a CPU the engine computes with the cores the frontend needs."""
        if self.engine_process is not None:
            return self.engine_process
        return self.resolved_device.startswith("cuda")

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            host=self.host,
            port=self.port,
            max_message_bytes=self.max_message_bytes,
            grace_period_s=self.grace_period_s,
            drain_delay_s=self.drain_delay_s,
        )

    def engine_config(self) -> EngineConfig:
        from llm_service.engine.engine_core import EngineConfig  # torch loads only when an engine is built

        return EngineConfig(
            model_dir=self.model_dir,
            device=self.resolved_device,
            dtype=self.dtype,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_memory_fraction=self.kv_memory_fraction,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_waiting_requests=self.max_queue_size,
            max_prefill_chunk_tokens=self.max_prefill_chunk_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            attention_backend=self.attention_backend,
            enforce_eager=True if self.enforce_eager else None,
            max_prefill_graph_tokens=self.max_prefill_graph_tokens,
            kv_cache_dtype=self.kv_cache_dtype,
            skinny_gemm=self.skinny_gemm,
            torch_threads=self.torch_threads,
        )


def default_sampling(model_dir: str | Path, default_max_tokens: int) -> SamplingParams:
    """What unset SamplingParams fields become: the checkpoint's generation_config.json, else greedy.

    Sampling settings there only apply when it says `do_sample: true` (as in Hugging Face
    `generate()`); otherwise decoding is greedy.
    """
    root = Path(model_dir)
    config: dict = {}
    for directory in (root, root / "llm"):  # VILA keeps the decoder's files in llm/
        path = directory / "generation_config.json"
        if path.is_file():
            config = json.loads(path.read_text())
            break
    values: dict = {"max_tokens": default_max_tokens, "temperature": 0.0}
    if config.get("do_sample"):
        values["temperature"] = float(config.get("temperature", 1.0))
        values["top_k"] = int(config.get("top_k", 50) or 0)  # HF's default is 50
        values["top_p"] = float(config.get("top_p", 1.0))
        values["min_p"] = float(config.get("min_p") or 0.0)
    values["repetition_penalty"] = float(config.get("repetition_penalty") or 1.0)
    return SamplingParams(**values)
