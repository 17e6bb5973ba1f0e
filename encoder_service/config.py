"""Settings of one encoder server, built once (from CLI flags and env in ``__main__``) and passed down.

Every limit is validated here, so the rest of the service can trust the values. Nothing in this module
reads the environment.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.grpc_server import ServerConfig

MiB = 1024 * 1024

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
# torch.compile modes and SDPA kernel families (engines/compiled.py; kept here so that parsing the
# configuration needs no torch)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
CUDAGRAPH_COMPILE_MODES = ("max-autotune", "reduce-overhead")  # modes that replay CUDA graphs
# what one torch.compile call covers: the whole tower + projector, or each encoder layer and the
# projector apart (the layers share one graph: compiles ~20x faster, lets max-autotune finish)
COMPILE_SCOPES = ("model", "layer")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class MediaLimits:
    """Per-request and per-item limits on media (0 is never "unlimited" here: every cap is real).

    Attributes:
      max_items_per_request: most media items in one Encode request.
      max_media_bytes: largest encoded file accepted (inline bytes, decoded data: URI, fetched body).
      max_image_pixels: largest image or video frame (width * height), checked from the file header
        before any pixel is decoded, so decompression bombs cost nothing.
      max_video_frames: most frames encoded for one video (sampled or sent).
      default_num_frames: frames sampled from a video file when the request leaves num_frames at 0.
      max_video_scan_frames: most frames a video file may contain; sampling has to walk them all.
    """

    max_items_per_request: int = 16
    max_media_bytes: int = 32 * MiB
    max_image_pixels: int = 40_000_000
    max_video_frames: int = 64
    default_num_frames: int = 8
    max_video_scan_frames: int = 20_000

    def __post_init__(self) -> None:
        _check_positive("max_items_per_request", self.max_items_per_request)
        _check_positive("max_media_bytes", self.max_media_bytes)
        _check_positive("max_image_pixels", self.max_image_pixels)
        _check_positive("max_video_frames", self.max_video_frames)
        _check_positive("default_num_frames", self.default_num_frames)
        _check_positive("max_video_scan_frames", self.max_video_scan_frames)
        if self.default_num_frames > self.max_video_frames:
            raise InvalidArgumentError(
                f"default_num_frames ({self.default_num_frames}) must not exceed max_video_frames "
                f"({self.max_video_frames})"
            )


@dataclass(frozen=True)
class UrlPolicy:
    """What the server may fetch for ``Image.url`` / ``Video.url`` (data: URIs are always accepted).

    Attributes:
      allow_fetch: fetch http(s) URLs at all.
      allowed_hosts: host names (lower case) whose addresses may be private/loopback/link-local.
      allowed_networks: networks whose addresses may be fetched although they are not public. A cloud
        metadata address is only permitted when listed as a single address (/32 or /128).
      media_root: directory from which ``file://`` URLs and bare paths may be read; None refuses them.
      connect_timeout_s: TCP (and TLS) connect limit per hop.
      read_timeout_s: longest wait for the next bytes from the server.
      total_timeout_s: whole fetch, all redirect hops included.
      max_redirects: redirect hops followed; each hop is checked like the first URL.
    """

    allow_fetch: bool = True
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[IpNetwork, ...] = ()
    media_root: Path | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_redirects: int = 5

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise InvalidArgumentError(f"{name} must be > 0 seconds, got {value}")
        if self.max_redirects < 0:
            raise InvalidArgumentError(f"max_redirects must be >= 0, got {self.max_redirects}")
        for host in self.allowed_hosts:
            if not host or host != host.lower() or "/" in host:
                raise InvalidArgumentError(f"allowed host {host!r} must be a lower-case host name")
        if self.media_root is not None and not self.media_root.is_dir():
            raise InvalidArgumentError(f"media root {self.media_root} is not a directory")

    @staticmethod
    def parse_allow_list(
        entries: list[str] | tuple[str, ...],
    ) -> tuple[tuple[str, ...], tuple[IpNetwork, ...]]:
        """Split allow-list entries (host names, IP addresses, CIDRs) into (hosts, networks)."""
        hosts: list[str] = []
        networks: list[IpNetwork] = []
        for raw in entries:
            entry = raw.strip().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or " " in entry:
                raise InvalidArgumentError(f"URL allow-list entry {raw!r} is neither a host name nor a CIDR")
            hosts.append(entry.lower().rstrip("."))
        return tuple(hosts), tuple(networks)


ENCODER_CUDA_THREADS = 4  # --torch-threads auto on CUDA: as fast as 16 for an image's host work, fewer spinning


@dataclass(frozen=True)
class EncoderConfig:
    """Everything one encoder server needs.

    Attributes:
      model_dir: checkpoint directory (config.json, processor config, safetensors).
      engine_dir: exported visual engine (build/export_visual_engine.py) to run instead of the eager
        modules; checked against model_dir, dtype and device when the server loads it.
      model_id: name reported by GetModelInfo; defaults to the checkpoint directory's name.
      device: torch device of the vision model ("cpu", "cuda", "cuda:1").
      dtype: compute dtype of the vision model.
      output_dtype: default dtype of returned features; None means the compute dtype.
      max_batch_size: most items in one model run.
      compile: on CUDA, run the vision tower + projector through torch.compile with one static graph
        per batch bucket, all compiled during warm-up (engines/compiled.py); LLaVA, VILA and
        OneVision only, not with engine_dir. CPU always runs eager.
      compile_mode: torch.compile mode (default, max-autotune-no-cudagraphs, max-autotune,
        reduce-overhead).
      compile_scope: "model" (one graph of the whole tower + projector per bucket) or "layer" (each
        encoder layer and the projector compiled apart; the layers share one graph). "layer" takes
        the modes without CUDA graphs only (default, max-autotune-no-cudagraphs).
      cuda_graphs: capture each compiled bucket in a CUDA graph after its warm-up and replay it
        (scope "model" with the modes that have no CUDA graphs of their own).
      compile_buckets: batch sizes compiled (tower rows: images, or OneVision crops/frames); smaller
        batches are padded up to the next one, larger ones run in chunks of the largest. None: powers
        of two below max_batch_size, and max_batch_size.
      sdpa_backend: on CUDA, the attention kernel family of the vision tower: auto (PyTorch's
        choice), flash, efficient, cudnn or math.
      max_queue_delay_ms: how long the first queued item waits for companions before a batch runs.
        0 (default): a batch starts as soon as the model is free; under load, the items that arrive
        while one batch runs form the next, so waiting only adds latency at low load (it was 2 ms,
        2.2 ms of queue time in a 39 ms image TTFT on an H100).
      max_queue_size: items waiting for the model beyond which Encode answers RESOURCE_EXHAUSTED.
      cache_bytes: byte budget of the embedding cache (0 disables it).
      num_workers: threads that decode and preprocess media.
      num_fetch_workers: threads that fetch URLs (I/O bound, kept apart so slow hosts cannot starve
        preprocessing).
      torch_threads: CPU threads torch may use per operator in this process; 0 = auto: at most
        ENCODER_CUDA_THREADS (4) when the model runs on CUDA (see vlm_protocol/torch_threads.py),
        torch's default on CPU.
      shared_memory_bytes: size of the POSIX shared-memory ring (/dev/shm) into which Encode writes the
        features when a request asks for EMBEDDING_TRANSPORT_SHARED_MEMORY, so that an LLM service on
        the same host reads them without a copy through gRPC; reserved at start-up. 0 disables it.
      limits: media limits.
      url_policy: URL fetching policy.
      server: gRPC transport settings.
    """

    model_dir: Path
    engine_dir: Path | None = None
    model_id: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    output_dtype: str | None = None
    max_batch_size: int = 8
    compile: bool = True
    compile_mode: str = "default"
    compile_scope: str = "model"
    cuda_graphs: bool = True
    compile_buckets: tuple[int, ...] | None = None
    sdpa_backend: str = "auto"
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 256
    cache_bytes: int = 1024 * MiB
    num_workers: int = 2
    num_fetch_workers: int = 8
    torch_threads: int = 0
    shared_memory_bytes: int = 0
    limits: MediaLimits = field(default_factory=MediaLimits)
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if not (self.model_dir / "config.json").is_file():
            raise InvalidArgumentError(f"model directory {self.model_dir} has no config.json")
        if self.engine_dir is not None:
            object.__setattr__(self, "engine_dir", Path(self.engine_dir))
            if not self.engine_dir.is_dir():
                raise InvalidArgumentError(f"engine directory {self.engine_dir} is not a directory")
        if not self.device:
            raise InvalidArgumentError("device must be set, e.g. 'cpu' or 'cuda'")
        if self.dtype not in COMPUTE_DTYPES:
            raise InvalidArgumentError(
                f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}"
            )
        if self.output_dtype is not None and self.output_dtype not in OUTPUT_DTYPES:
            raise InvalidArgumentError(
                f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {self.output_dtype!r}"
            )
        _check_positive("max_batch_size", self.max_batch_size)
        if self.compile_mode not in COMPILE_MODES:
            raise InvalidArgumentError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        check_compile_scope(self.compile_scope, self.compile_mode, error=InvalidArgumentError)
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise InvalidArgumentError(
                f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}, got {self.sdpa_backend!r}"
            )
        if self.compile_buckets is not None:
            buckets = tuple(sorted(set(int(b) for b in self.compile_buckets)))
            if not buckets or buckets[0] < 1:
                raise InvalidArgumentError(
                    f"compile_buckets must be positive batch sizes, got {list(self.compile_buckets)}"
                )
            object.__setattr__(self, "compile_buckets", buckets)
        if self.max_queue_delay_ms < 0:
            raise InvalidArgumentError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        _check_positive("max_queue_size", self.max_queue_size)
        if self.cache_bytes < 0:
            raise InvalidArgumentError(
                f"cache_bytes must be >= 0 (0 disables the cache), got {self.cache_bytes}"
            )
        _check_positive("num_workers", self.num_workers)
        _check_positive("num_fetch_workers", self.num_fetch_workers)
        if self.torch_threads < 0:
            raise InvalidArgumentError(f"torch_threads must be >= 0 (0 = auto), got {self.torch_threads}")
        if self.shared_memory_bytes < 0:
            raise InvalidArgumentError(
                f"shared_memory_bytes must be >= 0 (0 disables shared memory), got {self.shared_memory_bytes}"
            )

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """The compiled batch sizes: `compile_buckets`, else powers of two below max_batch_size and it."""
        if self.compile_buckets is not None:
            return self.compile_buckets
        return default_batch_buckets(self.max_batch_size)

    @property
    def default_output_dtype(self) -> str:
        return self.output_dtype or self.dtype

    @property
    def display_model_id(self) -> str:
        return self.model_id or self.model_dir.resolve().name


def default_batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, and `max_batch_size` itself: 8 -> (1, 2, 4, 8), 6 -> (1, 2, 4, 6)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def check_compile_scope(scope: str, mode: str, *, error: type[Exception] = ValueError) -> None:
    """Raise `error` unless `scope` is known and goes with `mode` (no CUDA graphs per layer: not measured)."""
    if scope not in COMPILE_SCOPES:
        raise error(f"compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    if scope == "layer" and mode in CUDAGRAPH_COMPILE_MODES:
        raise error(
            f"compile_scope 'layer' runs without CUDA graphs; use compile_mode default or "
            f"max-autotune-no-cudagraphs, not {mode!r}"
        )


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
