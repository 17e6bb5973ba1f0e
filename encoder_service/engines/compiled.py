"""The CUDA fast path of an engine's `compute`: torch.compile with one static graph per batch bucket.

`BucketedCompute` wraps a compute module whose output rows depend only on their own input rows (the
LLaVA-style `TowerProjector`). A call with n rows runs at the smallest bucket >= n, the rows padded
with zeros and the padding's outputs dropped; more rows than the largest bucket run in chunks of it.
So only `len(buckets)` shapes ever reach the compiler, and `warm_up()` compiles every one of them
before the server reports SERVING: no compile ever happens under traffic.

Why static buckets rather than one graph with a dynamic batch dim (`mark_dynamic`): static shapes let
Inductor specialise every kernel (and are what `max-autotune` tunes for and what CUDA-graph replay
needs, per shape anyway), the graph count is fixed and known at start-up (no 0/1 specialisation or
recompile surprises later), and the padding costs little where most of it happens: at small
batches the GPU is launch-bound (on H100 1 LLaVA image takes ~6.5 ms, 8 take ~8 ms), and at full
load every batch is the largest bucket. Between those, a batch just above a power of two (33 -> 64)
does up to twice its work; finer buckets (`--compile-buckets 1,2,4,8,16,24,32,48,64`) cut that at
the price of start-up time, one compile per bucket (tens of seconds each for ViT-L; Inductor's
on-disk cache makes restarts cheaper).

`scope` says what one torch.compile call covers. "model": the whole compute, one graph per bucket.
"layer": each encoder layer and the projector apart (`TowerProjector.compiled_regions`); the layers
share one graph, whose weights are inputs, so a bucket costs one layer's compile plus the projector's
(~20x less for ViT-L's 23 layers), and max-autotune tunes a handful of GEMM shapes instead of timing
out. The price: a guard check and a Python call per layer (measured by benchmarks/bench_encoder.py),
and no fusion across layer boundaries. CUDA-graph modes are not offered per layer.

`sdpa_backend` pins `scaled_dot_product_attention` to one kernel family (flash, efficient, cudnn,
math) for every call and for compilation (the choice is baked into the compiled graph).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from encoder_service.config import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    CUDAGRAPH_COMPILE_MODES,
    SDPA_BACKENDS,
    check_compile_scope,
    default_batch_buckets,
)
from encoder_service.engines.base import ComputeInput

__all__ = [
    "COMPILE_MODES",
    "COMPILE_SCOPES",
    "SDPA_BACKENDS",
    "BucketedCompute",
    "CompileSettings",
    "default_batch_buckets",
    "parse_buckets",
    "sdpa_context",
]

logger = logging.getLogger(__name__)

CUDAGRAPH_MODES = frozenset(CUDAGRAPH_COMPILE_MODES)  # modes whose outputs a replay overwrites


@dataclass(frozen=True)
class CompileSettings:
    """How an engine's compute runs on CUDA.

    compile: torch.compile the compute (else eager, still padded to buckets if any are given).
    mode: torch.compile mode.
    buckets: batch sizes (rows of the compute's inputs) compiled, ascending; empty: inputs run at
        their own size (only sensible without compile, e.g. to pin the SDPA backend of eager runs).
    sdpa_backend: "auto" (PyTorch's choice) or one SDPA kernel family.
    scope: "model" (one graph of the whole compute) or "layer" (each encoder layer and the
        projector compiled apart, one graph shared by the layers; no CUDA-graph modes).
    """

    compile: bool = True
    mode: str = "default"
    buckets: tuple[int, ...] = (1, 2, 4, 8)
    sdpa_backend: str = "auto"
    scope: str = "model"
    # Capture each compiled bucket in a CUDA graph after its warm-up and replay it (scope "model",
    # modes without their own CUDA graphs): at batch 1 the compiled ViT-L + projector is launch-bound
    # (H100: 7.7 ms per call compiled, 1.8 ms replayed; bench_encoder.py compiled_cudagraph).
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {self.mode!r}")
        check_compile_scope(self.scope, self.mode)
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(
                f"sdpa backend must be one of {', '.join(SDPA_BACKENDS)}, got {self.sdpa_backend!r}"
            )
        object.__setattr__(self, "buckets", normalize_buckets(self.buckets))
        if self.compile and not self.buckets:
            raise ValueError("compiling needs at least one batch bucket")


def normalize_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    values = sorted(set(int(b) for b in buckets))
    if values and values[0] < 1:
        raise ValueError(f"batch buckets must be positive integers, got {list(buckets)}")
    return tuple(values)


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); ValueError on anything else."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"batch buckets must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError("give at least one batch bucket")
    return normalize_buckets(values)


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """A context that restricts SDPA to `backend` ("auto": no restriction)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    return sdpa_kernel([kernel])


Compiler = Callable[..., Callable[..., torch.Tensor]]


class BucketedCompute(nn.Module):
    """`module` run at fixed batch sizes, optionally compiled (one static graph per bucket).

    `compiler` is `torch.compile` (tests pass a fake), called with `mode` and `dynamic=False`: once on
    `module` (scope "model"), or once per region (scope "layer": `module.compiled_regions`). The result
    is called with bucket-sized inputs only. Every input is batched along dim 0.
    """

    def __init__(
        self, module: nn.Module, settings: CompileSettings, *, compiler: Compiler | None = None
    ) -> None:
        super().__init__()
        self.module = module
        self.settings = settings
        self.buckets = settings.buckets
        self.compile_seconds: dict[int, float] = {}  # bucket -> first-call seconds during warm-up
        self.fallback_reason: str | None = None  # why compiled code was given up for eager, if it was
        runner: Callable[..., torch.Tensor] = module
        if settings.compile:
            _allow_recompiles(len(self.buckets))  # per code object: each region has one graph per bucket
            runner = _compile(module, settings, compiler if compiler is not None else torch.compile)
        # not a child module: the compiled wrapper would list the same parameters a second time
        self.__dict__["_runner"] = runner
        self._cudagraphs = settings.compile and settings.mode in CUDAGRAPH_MODES
        # bucket -> (graph, static inputs, static output); filled by warm_up on CUDA
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._graph_pool = None

    @property
    def wrapped_module(self) -> nn.Module:
        return self.module

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding `rows` (the largest one for more rows; they run in chunks)."""
        if not self.buckets:
            return rows
        return next((b for b in self.buckets if b >= rows), self.buckets[-1])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs[0].shape[0]
        largest = self.buckets[-1] if self.buckets else rows
        with sdpa_context(self.settings.sdpa_backend):
            if rows <= largest:
                return self._run_padded(inputs, rows)
            chunks = [
                self._run_padded(
                    tuple(t[start : start + largest] for t in inputs), min(largest, rows - start)
                )
                for start in range(0, rows, largest)
            ]
        return torch.cat(chunks)

    def _run_padded(self, inputs: tuple[torch.Tensor, ...], rows: int) -> torch.Tensor:
        bucket = self.bucket_for(rows)
        captured = self._graphs.get(bucket)
        if captured is not None:
            graph, static_inputs, static_output = captured
            for static, given in zip(static_inputs, inputs, strict=True):
                static[:rows].copy_(given)
                static[rows:].zero_()
            graph.replay()
            return static_output[:rows].clone()  # the next replay overwrites the static output
        if bucket != rows:
            inputs = tuple(_pad_rows(t, bucket) for t in inputs)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        output = self._runner(*inputs)
        if self._cudagraphs:
            output = output.clone()  # graph outputs are overwritten by the next replay
        return output if bucket == rows else output[:rows]

    @torch.no_grad()
    def warm_up(self, inputs: Sequence[ComputeInput], device: torch.device) -> None:
        """Run every bucket once (CUDA-graph modes: three times, to record), so each is compiled.

        If compiling fails, the error is logged and the module runs eager from then on: a compiler
        problem on some host costs speed, not the service.
        """
        with sdpa_context(self.settings.sdpa_backend):
            for bucket in self.buckets:
                example = tuple(torch.zeros((bucket, *i.shape), dtype=i.dtype, device=device) for i in inputs)
                started = time.perf_counter()
                try:
                    for _ in range(3 if self._cudagraphs else 1):
                        self._run_padded(example, bucket)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                except Exception as exc:
                    if self.__dict__["_runner"] is self.module:
                        raise  # eager itself fails: nothing to fall back to
                    logger.exception(
                        "torch.compile failed for batch bucket %d; the engine runs eager", bucket
                    )
                    self.fallback_reason = f"{type(exc).__name__}: {exc}"
                    self.__dict__["_runner"] = self.module
                    self._cudagraphs = False
                    self._run_padded(example, bucket)
                if (
                    self.compiled
                    and self.settings.cuda_graphs
                    and device.type == "cuda"
                    and not self._cudagraphs
                ):
                    self._capture(bucket, example)
                self.compile_seconds[bucket] = time.perf_counter() - started
                logger.info(
                    "visual engine bucket %d ready in %.1f s (%s)",
                    bucket,
                    self.compile_seconds[bucket],
                    f"torch.compile mode={self.settings.mode} scope={self.settings.scope}"
                    + (", CUDA graph" if bucket in self._graphs else "")
                    if self.compiled
                    else "eager",
                )

    def _capture(self, bucket: int, example: tuple[torch.Tensor, ...]) -> None:
        """Record the compiled bucket in a CUDA graph over static inputs. A failure is logged and the
        bucket keeps running compiled without a graph."""
        try:
            static_inputs = tuple(t.clone() for t in example)
            torch.cuda.synchronize(example[0].device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_output = self.__dict__["_runner"](*static_inputs)
            self._graph_pool = self._graph_pool or graph.pool()
            self._graphs[bucket] = (graph, static_inputs, static_output)
        except Exception:
            logger.exception(
                "CUDA graph capture failed for batch bucket %d; it runs compiled without one", bucket
            )

    @property
    def compiled(self) -> bool:
        """Whether calls go through the compiled module (False without compile or after a fallback)."""
        return self.__dict__["_runner"] is not self.module


def _compile(module: nn.Module, settings: CompileSettings, compiler: Compiler) -> Callable[..., torch.Tensor]:
    """`module` compiled whole (scope "model") or region by region (scope "layer")."""

    def compile_region(region: nn.Module) -> Callable[..., torch.Tensor]:
        return compiler(region, mode=settings.mode, dynamic=False)

    if settings.scope == "model":
        return compile_region(module)
    regions = getattr(module, "compiled_regions", None)
    if regions is None:
        raise ValueError(f"{type(module).__name__} cannot be compiled per layer; use scope 'model'")
    return regions(compile_region)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def _allow_recompiles(num_graphs: int) -> None:
    """Dynamo keeps at most `recompile_limit` graphs per code object (8 by default) and silently
    falls back to eager past it; one graph per bucket (plus slack) must fit."""
    import torch._dynamo.config as dynamo_config

    wanted = num_graphs + 4
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name, wanted) < wanted:
        setattr(dynamo_config, name, wanted)
