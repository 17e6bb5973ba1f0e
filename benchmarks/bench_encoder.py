"""Scenario 4: the visual engine alone, LLaVA-1.5 shapes (CLIP ViT-L/14-336 + 2-layer MLP projector).

Random weights of the real architecture, bf16 on the GPU. Times the tower + projector on GPU-resident
pixels in several variants, and the whole `engine.encode()` call (host pixels in, host embeddings
out), against the FLOP ceiling of the card. Preprocessing is excluded. Every variant's output is
compared with the reference, HF's eager forward as the engine ran it before the fast path (HF
`CLIPVisionModel` forward with hooks on the selected layer, separate q/k/v, HF's default attention),
on the same weights and pixels: max abs diff, cosine similarity and relative L2 error go in the JSON.

Variants (tower + projector on GPU-resident pixels, unless said otherwise):
  eager_hf               the reference above (the engine before the fast path)
  eager                  the engine's eager compute: layer walk, fused q/k/v, SDPA
  compiled               the service's CUDA fast path as it ships: `BucketedCompute`, torch.compile
                         mode "default", scope "model" (one static graph of the whole compute per
                         batch size; first_call_s = compile time). The baseline.
  compiled_cudagraph     `compiled`'s graph captured once in a torch.cuda.CUDAGraph, replayed (what
                         CUDA graphs would save; at batch 1 it shows the launch overhead)
  encode_breakdown       `engine.encode()` with the `compiled` compute, stage by stage, each timed
                         alone between device synchronisations: stage_pixels (host float32 -> pinned
                         bf16), upload, compute (wall; gpu: CUDA events; launch: until the call
                         returns), download (to pinned), host_copies (pinned -> one pageable tensor
                         per image), rows_to_host (download + copies as encode() overlaps them),
                         fixed_row_outputs (that + the per-image outputs), encode (the whole call),
                         encode_in_executor (the call through a one-thread executor, as the service's
                         batcher runs it), unaccounted (encode - its stages); at batch 1 also
                         encode_in_executor_gil_busy (the same with a pure-Python thread spinning: the
                         worst case of GIL contention from the service's other threads) and
                         preprocess_one_image (the HF processor on a 640x480 image, outside encode())
  compiled_regional      the service's scope "layer": each encoder layer and the projector compiled
                         apart, mode "default"; the 23 layers share one graph (graphs_compiled says
                         how many graphs the first call made: 2 = layer + projector)
  encode_call_eager / encode_call_compiled   the whole engine.encode() with the eager / compiled
                         compute (pinned bf16 upload, compute, chunked download into per-image tensors)
  regional_autotune_gemm scope "layer", GEMM autotuning only (max_autotune over ATen + Triton GEMMs,
                         no coordinate-descent tuning)
  regional_max_autotune  scope "layer", mode "max-autotune-no-cudagraphs" (GEMM autotuning over ATen
                         + Triton, coordinate-descent tuning of the Triton kernels: the mode's options,
                         recorded under "inductor" in the JSON)
  eager_unfused          the layer walk with HF's separate q/k/v projections
  eager_hf_attn_eager    eager_hf with HF's "eager" attention (matmul + softmax) instead of SDPA
  eager_sdpa_<backend>   `eager` with SDPA pinned to flash / efficient / cudnn
  compiled_sdpa          `compiled` with the fastest eager SDPA backend (skipped when that is auto)
  compiled_hf            torch.compile (default mode) of the reference module
  reduce_overhead        torch.compile mode "reduce-overhead" (cudagraph trees), whole model
  max_autotune           whole-model "max-autotune-no-cudagraphs" (minutes; only with --max-autotune
                         or when named in --variants)

Order: --variants lists the steps in run order, each `name` at its default batch sizes (all of
--batch-sizes for eager_hf, eager, compiled, compiled_cudagraph, encode_breakdown, compiled_regional,
encode_call_*, regional_max_autotune; the first one for the others) or `name@64/1` at those; a
(variant, batch size) point runs once, so a name may come back later for its remaining sizes. The
default order puts what matters first (the baseline, its CUDA-graph replay, the breakdown, regional
compile, the whole call, regional autotuning at the first batch size) so that the budget never skips
them. `--skip` drops names. The reference's outputs are always computed (timing it is eager_hf).

Timing: warm-up calls excluded, CUDA events around each call (wall clock where the call does host
work), the median of --iters calls. The run is bounded by --time-budget-s (from the start of `main`,
compiles included) and each step by --max-step-s: a step that would not fit is skipped, one that
overruns (a long compile) is aborted by SIGALRM, and the JSON is rewritten after every step.

    python benchmarks/bench_encoder.py --out benchmarks/results --batch-sizes 64,1 --time-budget-s 390
    python benchmarks/bench_encoder.py --out /tmp/bench --variants compiled,encode_breakdown
    python benchmarks/bench_encoder.py --tiny --device cpu --out /tmp/bench      # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import copy
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a clean checkout
    sys.path.insert(0, str(REPO))

from encoder_service.engines import MediaInput, load_visual_engine  # noqa: E402
from encoder_service.engines.base import PreparedInput, fixed_row_outputs, pinned_batch, rows_to_host  # noqa: E402
from encoder_service.engines.compiled import BucketedCompute, CompileSettings, sdpa_context  # noqa: E402
from encoder_service.engines.towers import LayerSelectingTower, TowerProjector  # noqa: E402

STARTED = time.perf_counter()
SDPA_CHOICES = ("flash", "efficient", "cudnn")
WARMUP_CALLS = 3
RESERVE_S = 12.0  # kept back for the matmul peak, the JSON and the plot
# GEMM autotuning candidates of the max-autotune variants (no CUTLASS/CK: their compiles take minutes)
AUTOTUNE_GEMM_BACKENDS = "ATEN,TRITON"


def make_llava15_vision_checkpoint(directory: Path, device: str) -> None:
    """Config of llava-1.5-7b-hf; weights for the vision tower and projector only (random)."""
    from transformers import CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from vlm_tiny import make_tiny_checkpoint

    tiny = make_tiny_checkpoint("llava", directory / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, directory / name)
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32064,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2
    )
    config.save_pretrained(directory)
    preprocessor = json.loads((tiny / "preprocessor_config.json").read_text())
    preprocessor.update(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with torch.device(device):
        tower = CLIPVisionModel(vision).to(torch.bfloat16)
        projector = LlavaMultiModalProjector(config).to(torch.bfloat16)
    tensors = {f"vision_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    tensors |= {f"multi_modal_projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    save_file({k: v.cpu() for k, v in tensors.items()}, directory / "model.safetensors")


def flops_per_image(tokens: int = 577, hidden: int = 1024, mlp: int = 4096, layers: int = 23) -> float:
    # vision_feature_layer -2: 23 of 24 layers run; projector 1024->4096->4096 on 576 rows
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * tokens * tokens * hidden
    return layers * per_layer + 2 * 576 * (1024 * 4096 + 4096 * 4096)


# -- time budget -------------------------------------------------------------------------------------


class BudgetExceeded(BaseException):
    """Raised by the alarm when a step overruns the budget or its cap (a BaseException, so that no
    `except Exception` inside torch swallows it)."""


class Budget:
    def __init__(self, seconds: float, max_step_s: float) -> None:
        self.deadline = STARTED + seconds
        self.max_step_s = max_step_s
        self.aborted = False

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.perf_counter()

    @contextlib.contextmanager
    def alarm(self):
        """Abort the enclosed step when the budget or the step cap runs out (SIGALRM; main thread, POSIX)."""
        if not hasattr(signal, "setitimer"):
            yield
            return
        left = self.left()
        reason = "time budget ran out" if left <= self.max_step_s else f"step cap of {self.max_step_s:.0f} s"

        def expire(signum, frame):
            raise BudgetExceeded(reason)

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, max(min(left, self.max_step_s), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


# -- timing and checks --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], iters: int, device: torch.device, *, wall: bool = False
) -> list[float]:
    """Milliseconds of each of `iters` calls after WARMUP_CALLS untimed ones: CUDA events on a GPU, or
    the wall clock (`wall`, for calls that do host work), the device idle at each start and
    synchronised before each stop."""
    for _ in range(WARMUP_CALLS):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda" and not wall:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - began) * 1000.0)
    return times


def launch_times(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Milliseconds until each call returns, the device idle at each start: the host's share (Python,
    guards, kernel launches). About the wall time when launches bound the call."""
    for _ in range(WARMUP_CALLS):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000.0)
    _sync(device)
    return times


def executor_times(fn: Callable[[], object], iters: int) -> list[float]:
    """Milliseconds of each call submitted from an event loop to a one-thread executor and awaited, as
    the encoder's batcher runs `engine.encode` (thread hop and loop wake-up included)."""

    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-model") as pool:
            for _ in range(WARMUP_CALLS):
                await loop.run_in_executor(pool, fn)
            times = []
            for _ in range(iters):
                began = time.perf_counter()
                await loop.run_in_executor(pool, fn)
                times.append((time.perf_counter() - began) * 1000.0)
        return times

    return asyncio.run(run())


@contextlib.contextmanager
def busy_python_thread():
    """A thread that runs pure Python (holding the GIL but for the interpreter's switch interval)
    while the block runs."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin, name="bench-busy", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def compare(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    out, ref = output.float().flatten(), reference.float().flatten().to(output.device)
    return {
        "max_abs_diff": (out - ref).abs().max().item(),
        "ref_max_abs": ref.abs().max().item(),
        "cosine": torch.nn.functional.cosine_similarity(out, ref, dim=0).item(),
        "rel_l2": ((out - ref).norm() / ref.norm()).item(),
    }


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# -- the stages of encode() ------------------------------------------------------------------------------


def encode_stages(engine, batch_size: int, iters: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each stage of `engine.encode()` (one PreparedInput of `batch_size` host
    float32 images, LLaVA-style engine), each stage run alone with the device idle at its start and
    synchronised at its end, so they add up to about the whole call (see the module docstring)."""
    size = engine.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(batch_size))
    batch = [PreparedInput(engine.family, "image", pixels, (1,) * batch_size, (None,) * batch_size)]
    cuda = device.type == "cuda"
    ms: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object], *, events: bool = False) -> None:
        ms[name] = statistics.median(time_calls(fn, iters, device, wall=not events))

    if cuda:
        timed("stage_pixels", lambda: pinned_batch([pixels], engine.dtype))
        staged = pinned_batch([pixels], engine.dtype)
        timed("upload", lambda: staged.to(device, non_blocking=True))
    timed("tower_batch", lambda: engine._tower_batch(batch))  # stage_pixels + upload, as encode() runs them
    on_device = engine._tower_batch(batch)
    timed("compute", lambda: engine.compute(on_device))
    if cuda:
        timed("compute_gpu", lambda: engine.compute(on_device), events=True)
        ms["compute_launch"] = statistics.median(
            launch_times(lambda: engine.compute(on_device), iters, device)
        )
    features = engine.compute(on_device)  # [N, rows, llm_hidden]
    _sync(device)
    if cuda:
        pinned = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        timed("download", lambda: pinned.copy_(features, non_blocking=True))
        timed("host_copies", lambda: [torch.empty(row.shape, dtype=row.dtype).copy_(row) for row in pinned])
    timed("rows_to_host", lambda: rows_to_host(features))
    timed("fixed_row_outputs", lambda: fixed_row_outputs(features, batch))
    timed("encode", lambda: engine.encode(batch))
    ms["encode_in_executor"] = statistics.median(executor_times(lambda: engine.encode(batch), iters))
    ms["unaccounted"] = ms["encode"] - ms["tower_batch"] - ms["compute"] - ms["fixed_row_outputs"]
    if batch_size == 1:
        with busy_python_thread():  # the worst case of GIL contention from the service's other threads
            ms["encode_in_executor_gil_busy"] = statistics.median(
                executor_times(lambda: engine.encode(batch), iters)
            )
        from PIL import Image

        image = Image.new("RGB", (640, 480), (120, 80, 40))
        ms["preprocess_one_image"] = statistics.median(
            time_calls(lambda: engine.preprocess(MediaInput(images=[image])), iters, torch.device("cpu"))
        )
    return ms


# -- model variants ------------------------------------------------------------------------------------


def load_hf_modules(checkpoint: Path, device: torch.device, dtype: torch.dtype):
    """The checkpoint's CLIP tower and projector as HF modules (what the engine loads), not fused."""
    from transformers import AutoModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from encoder_service.engines.llava import PROJECTOR_PREFIXES, TOWER_PREFIXES
    from encoder_service.engines.weights import CheckpointTensors, load_module_weights

    config = LlavaConfig.from_pretrained(checkpoint)
    tensors = CheckpointTensors(checkpoint)
    with torch.device(device):
        tower = AutoModel.from_config(config.vision_config).eval()
        projector = LlavaMultiModalProjector(config).eval()
    load_module_weights(tower, tensors, TOWER_PREFIXES, what="vision tower")
    load_module_weights(projector, tensors, PROJECTOR_PREFIXES, what="projector")
    return tower.to(dtype), projector.to(dtype), config


def hf_computes(tower, projector, config) -> tuple[TowerProjector, TowerProjector]:
    """Tower + projector over the unfused HF modules (shared): (HF's forward with a hook on the
    selected layer, i.e. the engine before this change; the layer walk)."""
    walking = LayerSelectingTower(  # truncates `tower`
        tower, config.vision_feature_layer, fuse_qkv=False, unfold_patches=False
    )
    hooked = copy.copy(walking)  # same modules, its own flag
    hooked.walks_layers = False
    drop_cls = config.vision_feature_select_strategy == "default"
    return tuple(
        TowerProjector(selecting, projector, drop_cls=drop_cls, projector_role="multi_modal_projector")
        for selecting in (hooked, walking)
    )


def kernel_category(name: str) -> str:
    """Coarse family of a CUDA kernel name, for the encoder's GPU-time split."""
    lower = name.lower()
    if "sdpa" in lower or "fmha" in lower or "flash" in lower or "attention" in lower:
        return "attention"
    if "conv" in lower or "fprop" in lower or "nchw" in lower or "nhwc" in lower:
        return "patch_conv"
    if any(m in lower for m in ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul", "_mm_")):
        return "gemm"
    if "triton" in lower:
        return "triton_fused"
    if "memcpy" in lower or "memset" in lower:
        return "copy"
    return "other"


class CudaGraphRunner:
    """One batch size of `fn` captured in a CUDA graph over a static input buffer, then replayed."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> None:
        self.static_input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(self.static_input)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(self.static_input)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.static_input.copy_(pixels)
        self.graph.replay()
        return self.static_output


@contextlib.contextmanager
def hf_attention(tower, implementation: str):
    """Switch the HF tower's attention implementation (read by every layer at each call)."""
    config = tower.config
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def attention_report(fn: Callable[[], object], device: torch.device) -> dict:
    """Which SDPA backends are enabled, and the attention kernels one call launches (profiler)."""
    report: dict = {}
    if device.type == "cuda":
        backends = torch.backends.cuda
        report["sdpa_enabled"] = {
            "flash": backends.flash_sdp_enabled(),
            "efficient": backends.mem_efficient_sdp_enabled(),
            "cudnn": backends.cudnn_sdp_enabled() if hasattr(backends, "cudnn_sdp_enabled") else None,
            "math": backends.math_sdp_enabled(),
        }
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof, torch.no_grad():
            fn()
            _sync(device)
        names = {event.key for event in prof.key_averages()}
        markers = ("flash", "fmha", "attention", "cudnn", "sdpa", "mha", "softmax")
        report["attention_kernels"] = sorted(n for n in names if any(m in n.lower() for m in markers))[:20]
    except Exception as exc:  # the report is a nicety; never fail the run on it
        report["attention_kernels_error"] = f"{type(exc).__name__}: {exc}"
    return report


# -- the run ---------------------------------------------------------------------------------------------


class Bench:
    """Records one point (variant, batch size) at a time into `results`, and rewrites the JSON."""

    def __init__(self, args: argparse.Namespace, results: dict, device: torch.device, budget: Budget) -> None:
        self.args, self.results, self.device, self.budget = args, results, device, budget
        self.references: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}

    def save(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - STARTED
        (self.args.out / "encoder_llava15.json").write_text(json.dumps(self.results, indent=2))

    def entry(self, name: str, description: str) -> dict:
        entry = self.results["variants"].setdefault(name, {"description": description, "results": {}})
        if description and not entry["description"]:
            entry["description"] = description
        return entry

    def done(self, name: str, batch_size: int) -> bool:
        """Whether this point already ran (a variant listed twice in --variants runs each size once)."""
        record = self.results["variants"].get(name, {}).get("results", {}).get(str(batch_size))
        return record is not None and not record.get("status", "").startswith("skipped")

    def fits(self, name: str, description: str, batch_size: int, expect_s: float) -> dict | None:
        """A fresh record for the point, or None (recorded as skipped) when `expect_s` won't fit."""
        record: dict = {}
        self.entry(name, description)["results"][str(batch_size)] = record
        left = self.budget.left()
        if left < expect_s:
            record["status"] = f"skipped: time budget (needs ~{expect_s:.0f} s, {left:.0f} s left)"
            self._print(name, batch_size, record)
            self.save()
            return None
        print(f"  {name:<24} bs {batch_size:>4}: running ({left:.0f} s left)", flush=True)
        return record

    def run(
        self,
        name: str,
        description: str,
        batch_size: int,
        build: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
        *,
        expect_s: float = 0.0,
        wrap: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float | None:
        """Build (first call = compile), check against the reference, time; images/s or None."""
        if self.done(name, batch_size):
            return self.results["variants"][name]["results"][str(batch_size)].get("images_per_s")
        record = self.fits(name, description, batch_size, expect_s)
        if record is None:
            return None
        began = time.perf_counter()
        try:
            with self.budget.alarm(), torch.no_grad(), wrap():
                graphs = _graph_count()
                fn = build()
                pixels = self.inputs[batch_size]
                output = fn(pixels)
                _sync(self.device)
                record["first_call_s"] = time.perf_counter() - began
                record["graphs_compiled"] = _graph_count() - graphs
                record.update(compare(output, self.references[batch_size]))
                del output
                times = time_calls(lambda: fn(pixels), self.args.iters, self.device)
        except (BudgetExceeded, Exception) as exc:  # BudgetExceeded is a BaseException (an alarm)
            self._record_failure(record, exc, began)
        else:
            self._record_times(record, batch_size, times)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._print(name, batch_size, record)
        self.save()
        return record.get("images_per_s")

    def _record_failure(self, record: dict, exc: BaseException, began: float) -> None:
        if isinstance(exc, BudgetExceeded):
            self.budget.aborted = True
            record["status"] = (
                f"aborted: {exc.args[0] if exc.args else 'time budget'} after "
                f"{time.perf_counter() - began:.0f} s"
            )
        else:
            record["status"] = f"failed: {type(exc).__name__}: {str(exc)[:400]}"

    @staticmethod
    def _record_times(record: dict, batch_size: int, times: list[float]) -> None:
        median = statistics.median(times)
        record.update(
            status="ok",
            images_per_s=batch_size / median * 1000.0,
            ms_median=median,
            ms_min=min(times),
            ms_max=max(times),
        )

    def run_encode(self, name: str, description: str, engine, batch_size: int, *, expect_s: float = 0.0):
        """engine.encode(): host float32 pixels in, per-image host features out."""
        if self.done(name, batch_size):
            return self.results["variants"][name]["results"][str(batch_size)].get("images_per_s")
        record = self.fits(name, description, batch_size, expect_s)
        if record is None:
            return None
        began = time.perf_counter()
        try:
            with self.budget.alarm(), torch.no_grad():
                generator = torch.Generator().manual_seed(batch_size)
                size = engine.image_size
                pixels = torch.randn(batch_size, 3, size, size, generator=generator)
                prepared = [
                    PreparedInput(engine.family, "image", pixels, (1,) * batch_size, (None,) * batch_size)
                ]
                outputs = engine.encode(prepared)
                record["first_call_s"] = time.perf_counter() - began
                expected = engine.compute(pixels.to(self.device, engine.dtype))
                got = torch.stack([o.features for o in outputs]).to(self.device)
                record.update(compare(got, expected))  # the host path against the same compute on device
                record["per_image_tensors_own_storage"] = all(
                    o.features.untyped_storage().nbytes() == o.features.numel() * o.features.element_size()
                    for o in outputs
                )
                del outputs, expected, got
                times = time_calls(lambda: engine.encode(prepared), self.args.iters, self.device, wall=True)
        except (BudgetExceeded, Exception) as exc:  # BudgetExceeded is a BaseException (an alarm)
            self._record_failure(record, exc, began)
        else:
            self._record_times(record, batch_size, times)
        self._print(name, batch_size, record)
        self.save()
        return record.get("images_per_s")

    def run_breakdown(self, engine, batch_size: int, compute_kind: str, *, expect_s: float = 0.0) -> None:
        """`encode_stages` for one batch size; the first encode() call compiles the bucket if needed."""
        name = "encode_breakdown"
        if self.done(name, batch_size):
            return
        description = (
            "engine.encode() stage by stage, each alone between device synchronisations "
            "(ms, medians; see the module docstring)"
        )
        record = self.fits(name, description, batch_size, expect_s)
        if record is None:
            return
        began = time.perf_counter()
        record["compute"] = compute_kind
        try:
            with self.budget.alarm(), torch.no_grad():
                size = engine.image_size
                warm = torch.zeros(batch_size, 3, size, size)
                engine.encode(
                    [PreparedInput(engine.family, "image", warm, (1,) * batch_size, (None,) * batch_size)]
                )
                record["first_call_s"] = time.perf_counter() - began
                stages = encode_stages(engine, batch_size, self.args.iters, self.device)
        except (BudgetExceeded, Exception) as exc:  # BudgetExceeded is a BaseException (an alarm)
            self._record_failure(record, exc, began)
            self._print(name, batch_size, record)
        else:
            record.update(
                status="ok",
                images_per_s=batch_size / stages["encode"] * 1000.0,
                ms_median=stages["encode"],
                stages_ms=stages,
            )
            self.results["encode_breakdown"][str(batch_size)] = stages
            order = (
                "stage_pixels",
                "upload",
                "tower_batch",
                "compute",
                "compute_gpu",
                "compute_launch",
                "download",
                "host_copies",
                "rows_to_host",
                "fixed_row_outputs",
                "encode",
                "encode_in_executor",
                "unaccounted",
                "encode_in_executor_gil_busy",
                "preprocess_one_image",
            )
            cells = "  ".join(f"{key} {stages[key]:.2f}" for key in order if key in stages)
            print(f"  {name:<24} bs {batch_size:>4} ({compute_kind}), ms: {cells}", flush=True)
        self.save()

    @staticmethod
    def _print(name: str, batch_size: int, record: dict) -> None:
        if record.get("status") == "ok":
            graphs = record.get("graphs_compiled")
            print(
                f"  {name:<24} bs {batch_size:>4}: {record['images_per_s']:8.1f} img/s  "
                f"{record['ms_median']:8.2f} ms  first call {record['first_call_s']:6.1f} s  "
                + (f"graphs {graphs}  " if graphs else "")
                + f"max|d| {record.get('max_abs_diff', float('nan')):.3g}  cos {record.get('cosine', float('nan')):.6f}",
                flush=True,
            )
        else:
            print(f"  {name:<24} bs {batch_size:>4}: {record.get('status')}", flush=True)


def _reset_compiler() -> None:
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the variants -------------------------------------------------------------------------------------------

# Every step, with the batch sizes it runs at when named without "@": all of --batch-sizes or the first.
STEP_SIZES = {
    "eager_hf": "all",
    "eager": "all",
    "compiled": "all",
    "compiled_cudagraph": "all",
    "encode_breakdown": "all",
    "compiled_regional": "all",
    "regional_max_autotune": "all",
    "encode_call_eager": "all",
    "encode_call_compiled": "all",
    "regional_autotune_gemm": "first",
    "eager_unfused": "first",
    "eager_hf_attn_eager": "first",
    **{f"eager_sdpa_{backend}": "first" for backend in SDPA_CHOICES},
    "compiled_sdpa": "first",
    "compiled_hf": "first",
    "reduce_overhead": "first",
    "max_autotune": "first",
    "kernel_profile": "first",
}


def default_plan(headline: int, *, max_autotune: bool) -> str:
    """What matters first: the baseline and its CUDA-graph replay, the encode() breakdown, regional
    compile, the whole encode() call, regional autotuning at the headline size (GEMMs only first: it
    fills the autotune cache that max-autotune then reuses); then the rest, cheapest answers first."""
    steps = [
        "eager_hf", "eager", "compiled", "compiled_cudagraph", "encode_breakdown", "compiled_regional",
        "encode_call_eager", "encode_call_compiled", f"regional_autotune_gemm@{headline}",
        f"regional_max_autotune@{headline}", "regional_max_autotune", "eager_unfused", "eager_hf_attn_eager",
        *(f"eager_sdpa_{backend}" for backend in SDPA_CHOICES), "compiled_sdpa", "compiled_hf", "reduce_overhead",
    ]  # fmt: skip
    return ",".join(steps + (["max_autotune"] if max_autotune else []))


def parse_plan(text: str, batch_sizes: list[int], skip: set[str]) -> list[tuple[str, list[int]]]:
    """'compiled,regional_max_autotune@64/1' -> [(step, batch sizes)] in run order; ValueError if unknown."""
    plan = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, sizes_text = part.partition("@")
        if name.startswith("compiled_sdpa_"):  # the old name, compiled_sdpa_<backend>
            name = "compiled_sdpa"
        if name not in STEP_SIZES:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(STEP_SIZES)}")
        if name in skip:
            continue
        if sizes_text:
            sizes = [int(s) for s in sizes_text.split("/")]
            unknown = [s for s in sizes if s not in batch_sizes]
            if unknown:
                raise ValueError(f"{part}: batch sizes {unknown} are not in --batch-sizes {batch_sizes}")
        else:
            sizes = list(batch_sizes) if STEP_SIZES[name] == "all" else batch_sizes[:1]
        plan.append((name, sizes))
    return plan


def _gemm_autotune_only(module, *, mode: str, dynamic: bool):
    """torch.compile with GEMM autotuning but without the coordinate-descent tuning that the mode
    "max-autotune-no-cudagraphs" adds (a `BucketedCompute` compiler; `mode` is "default")."""
    options = {"max_autotune": True, "coordinate_descent_tuning": False}
    return torch.compile(module, options=options, dynamic=dynamic)


class Suite:
    """The steps of the run; the computes they share (the service's compiled path, the regional ones)
    are built on first use and compile each batch size on its first call."""

    def __init__(
        self, args, bench: Bench, engine, reference, unfused_walk, tower, batch_sizes: list[int]
    ) -> None:
        self.args, self.bench, self.engine = args, bench, engine
        self.device = bench.device
        self.fused = engine.compute  # the eager TowerProjector
        self.reference, self.unfused_walk, self.tower = reference, unfused_walk, tower
        self.batch_sizes = batch_sizes
        self.headline = batch_sizes[0]
        self.can_compile = self.device.type == "cuda" or args.cpu_compile
        self.compile_estimate_s = 30.0  # first compile of the whole model; measured by `compiled`
        self.computes: dict[str, BucketedCompute] = {}
        self.warm: set[tuple[str, int]] = set()  # (compute, batch size) already compiled
        self.sdpa_speed: dict[str, float] = {}

    def run_step(self, name: str, sizes: list[int]) -> None:
        if name.startswith("eager_sdpa_"):
            self.eager_sdpa(name.removeprefix("eager_sdpa_"), sizes)
        else:
            getattr(self, name)(sizes)

    # -- shared computes ---------------------------------------------------------------------------

    def compute(self, key: str) -> BucketedCompute:
        """The compute of `key`: service (what the service ships: scope model, mode default), or
        regional, regional_max_autotune, regional_autotune_gemm (scope layer)."""
        if key not in self.computes:
            buckets = tuple(self.batch_sizes)
            compiler = None
            if key == "service":
                settings = CompileSettings(mode="default", buckets=buckets)
            elif key == "regional":
                settings = CompileSettings(mode="default", scope="layer", buckets=buckets)
            elif key == "regional_max_autotune":
                _autotune_knobs()
                settings = CompileSettings(mode="max-autotune-no-cudagraphs", scope="layer", buckets=buckets)
            elif key == "regional_autotune_gemm":
                _autotune_knobs()
                settings = CompileSettings(mode="default", scope="layer", buckets=buckets)
                compiler = _gemm_autotune_only
            else:
                raise KeyError(key)
            self.computes[key] = BucketedCompute(self.fused, settings, compiler=compiler)
        return self.computes[key]

    def expect(self, key: str, batch_size: int, estimate_s: float) -> float:
        return 0.0 if (key, batch_size) in self.warm else estimate_s

    def reset(self) -> None:
        """Drop every compiled graph (before variants whose settings Dynamo would not tell apart)."""
        _reset_compiler()
        self.computes.clear()
        self.warm.clear()

    def _compiled_point(
        self, name: str, key: str, description: str, sizes: list[int], estimate_s: float
    ) -> None:
        for bs in sizes:
            value = self.bench.run(
                name, description, bs, lambda: self.compute(key), expect_s=self.expect(key, bs, estimate_s)
            )
            if value:
                self.warm.add((key, bs))
                if name in self.bench.results:
                    self.bench.results[name][str(bs)] = value

    def _no_compile(self, name: str) -> bool:
        if not self.can_compile:
            print(f"  {name:<24} not run: no compile on a CPU without --cpu-compile", flush=True)
        return not self.can_compile

    # -- steps -------------------------------------------------------------------------------------

    def eager_hf(self, sizes: list[int]) -> None:
        for bs in sizes:
            self.bench.run(
                "eager_hf",
                "HF forward + hook on the selected layer, separate q/k/v (the engine "
                "before the fast path; the reference)",
                bs,
                lambda: self.reference,
            )

    def eager(self, sizes: list[int]) -> None:
        for bs in sizes:
            value = self.bench.run(
                "eager", "engine eager compute: layer walk, fused q/k/v, SDPA", bs, lambda: self.fused
            )
            if value:
                self.bench.results["eager"][str(bs)] = value
                if bs == self.headline:
                    self.sdpa_speed["auto"] = value
        if "attention" not in self.bench.results:
            pixels = self.bench.inputs[self.headline]
            self.bench.results["attention"] = attention_report(lambda: self.fused(pixels), self.device)

    def compiled(self, sizes: list[int]) -> None:
        if self._no_compile("compiled"):
            return
        description = (
            "the service's fast path: BucketedCompute, torch.compile default, scope model (one "
            "static graph of the whole compute per batch size; first_call_s = compile time)"
        )
        self._compiled_point("compiled", "service", description, sizes, self.compile_estimate_s)
        first = self.bench.results["variants"]["compiled"]["results"].get(str(self.headline), {})
        if first.get("status") == "ok":
            self.compile_estimate_s = max(first["first_call_s"], 1.0)

    def compiled_cudagraph(self, sizes: list[int]) -> None:
        if self._no_compile("compiled_cudagraph"):
            return
        if self.device.type != "cuda":
            print("  compiled_cudagraph       not run: CUDA graphs need a GPU", flush=True)
            return
        runner = self.compute("service").__dict__["_runner"]
        for bs in sizes:
            self.bench.run(
                "compiled_cudagraph",
                "compiled graph captured in a torch.cuda.CUDAGraph, replayed "
                "(input copied into the static buffer)",
                bs,
                lambda b=bs: CudaGraphRunner(runner, self.bench.inputs[b]),
                expect_s=self.expect("service", bs, self.compile_estimate_s) + 5.0,
            )
            if self.bench.done("compiled_cudagraph", bs):
                self.warm.add(("service", bs))

    def encode_breakdown(self, sizes: list[int]) -> None:
        key = "service" if self.can_compile else None
        kind = "compiled (scope model, mode default)" if key else "eager"
        self.engine.compute = self.compute(key) if key else self.fused
        try:
            for bs in sizes:
                expect = self.expect(key, bs, self.compile_estimate_s) if key else 0.0
                self.bench.run_breakdown(self.engine, bs, kind, expect_s=expect + 5.0)
                if key and self.bench.done("encode_breakdown", bs):
                    self.warm.add((key, bs))
        finally:
            self.engine.compute = self.fused

    def compiled_regional(self, sizes: list[int]) -> None:
        if self._no_compile("compiled_regional"):
            return
        description = (
            "the service's scope layer: each encoder layer and the projector compiled apart, "
            "torch.compile default (one graph shared by all layers)"
        )
        self._compiled_point("compiled_regional", "regional", description, sizes, self.compile_estimate_s / 4)

    def regional_max_autotune(self, sizes: list[int]) -> None:
        if self._no_compile("regional_max_autotune"):
            return
        description = (
            f"scope layer, torch.compile max-autotune-no-cudagraphs (GEMM backends "
            f"{AUTOTUNE_GEMM_BACKENDS}, coordinate-descent tuning)"
        )
        self._compiled_point("regional_max_autotune", "regional_max_autotune", description, sizes, 30.0)

    def regional_autotune_gemm(self, sizes: list[int]) -> None:
        if self._no_compile("regional_autotune_gemm"):
            return
        description = f"scope layer, GEMM autotuning only ({AUTOTUNE_GEMM_BACKENDS}; no coordinate descent)"
        self._compiled_point("regional_autotune_gemm", "regional_autotune_gemm", description, sizes, 20.0)

    def encode_call_eager(self, sizes: list[int]) -> None:
        for bs in sizes:
            value = self.bench.run_encode(
                "encode_call_eager", "engine.encode(), eager compute", self.engine, bs
            )
            if value:
                self.bench.results["encode_call_eager"][str(bs)] = value

    def encode_call_compiled(self, sizes: list[int]) -> None:
        if self._no_compile("encode_call_compiled"):
            return
        self.engine.compute = self.compute("service")
        try:
            for bs in sizes:
                value = self.bench.run_encode(
                    "encode_call_compiled",
                    "engine.encode(), compiled compute",
                    self.engine,
                    bs,
                    expect_s=self.expect("service", bs, self.compile_estimate_s),
                )
                if value:
                    self.warm.add(("service", bs))
                    self.bench.results["encode_call_compiled"][str(bs)] = value
        finally:
            self.engine.compute = self.fused

    def kernel_profile(self, sizes: list[int]) -> None:
        """Kernels of the service's compiled path (CUDA-graph replay), by GPU time: where the gap to
        the FLOP ceiling goes. Writes `encoder_kernels_bs<B>.txt` and a per-category summary."""
        if self._no_compile("kernel_profile") or self.device.type != "cuda":
            return
        runner = self.compute("service").__dict__["_runner"]
        for bs in sizes:
            with torch.no_grad():
                graph = CudaGraphRunner(runner, self.bench.inputs[bs])
            self.warm.add(("service", bs))
            calls = 3
            graph(self.bench.inputs[bs])
            _sync(self.device)
            activity = torch.profiler.ProfilerActivity.CUDA
            with torch.profiler.profile(activities=[activity]) as prof, torch.no_grad():
                for _ in range(calls):
                    graph(self.bench.inputs[bs])
                _sync(self.device)
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            (self.args.out / f"encoder_kernels_bs{bs}.txt").write_text(
                prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=110)
            )
            categories: dict[str, float] = {}
            for e in events:
                categories[kernel_category(e.key)] = categories.get(kernel_category(e.key), 0.0) + e.self_device_time_total
            record = {k: v / 1e3 / calls for k, v in sorted(categories.items(), key=lambda kv: -kv[1])}
            self.bench.results.setdefault("kernel_profile", {})[str(bs)] = {"gpu_ms_per_call": record}
            print(f"  kernel_profile           bs {bs:>4}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in record.items()), flush=True)
            self.bench.save()

    def eager_unfused(self, sizes: list[int]) -> None:
        for bs in sizes:
            self.bench.run(
                "eager_unfused",
                "layer walk, HF's separate q/k/v (HF attention)",
                bs,
                lambda: self.unfused_walk,
            )

    def eager_hf_attn_eager(self, sizes: list[int]) -> None:
        for bs in sizes:
            self.bench.run(
                "eager_hf_attn_eager",
                "eager_hf with attn_implementation='eager' (matmul + softmax)",
                bs,
                lambda: self.reference,
                wrap=lambda: hf_attention(self.tower, "eager"),
            )

    def eager_sdpa(self, backend: str, sizes: list[int]) -> None:
        for bs in sizes:
            value = self.bench.run(
                f"eager_sdpa_{backend}",
                f"eager with SDPA pinned to {backend}",
                bs,
                lambda: self.fused,
                wrap=lambda: sdpa_context(backend),
            )
            if value and bs == self.headline:
                self.sdpa_speed[backend] = value

    def best_sdpa(self) -> str:
        if self.args.sdpa_backend:
            return self.args.sdpa_backend
        return max(self.sdpa_speed, key=self.sdpa_speed.get) if self.sdpa_speed else "auto"

    def compiled_sdpa(self, sizes: list[int]) -> None:
        best = self.best_sdpa()
        self.bench.results.setdefault("attention", {})["fastest_eager_sdpa_backend"] = best
        if self._no_compile("compiled_sdpa"):
            return
        if best == "auto":
            print(
                "  compiled_sdpa            not run: auto is the fastest eager SDPA backend (= compiled)",
                flush=True,
            )
            return
        self.reset()  # the SDPA choice is not part of Dynamo's guards: a cached graph would be reused
        for bs in sizes:
            settings = CompileSettings(mode="default", buckets=(bs,), sdpa_backend=best)
            self.bench.run(
                f"compiled_sdpa_{best}",
                f"compiled with SDPA pinned to {best}",
                bs,
                lambda s=settings: BucketedCompute(self.fused, s),
                expect_s=self.compile_estimate_s,
            )

    def compiled_hf(self, sizes: list[int]) -> None:
        if self._no_compile("compiled_hf"):
            return
        self.reset()
        for bs in sizes:
            self.bench.run(
                "compiled_hf",
                "torch.compile (default) of eager_hf: the old 'compiled' figure",
                bs,
                lambda: torch.compile(self.reference, dynamic=False),
                expect_s=self.compile_estimate_s,
            )

    def reduce_overhead(self, sizes: list[int]) -> None:
        if self._no_compile("reduce_overhead"):
            return
        if self.device.type != "cuda":
            print("  reduce_overhead          not run: CUDA graphs need a GPU", flush=True)
            return
        self.reset()
        best = self.best_sdpa()
        for bs in sizes:
            settings = CompileSettings(mode="reduce-overhead", buckets=(bs,), sdpa_backend=best)
            self.bench.run(
                "reduce_overhead",
                f"torch.compile reduce-overhead (cudagraph trees), SDPA {best}",
                bs,
                lambda s=settings: BucketedCompute(self.fused, s),
                expect_s=self.compile_estimate_s,
            )

    def max_autotune(self, sizes: list[int]) -> None:
        if self._no_compile("max_autotune"):
            return
        _autotune_knobs()
        best = self.best_sdpa()
        for bs in sizes:
            settings = CompileSettings(mode="max-autotune-no-cudagraphs", buckets=(bs,), sdpa_backend=best)
            self.bench.run(
                "max_autotune",
                f"whole-model torch.compile max-autotune-no-cudagraphs, SDPA {best}",
                bs,
                lambda s=settings: BucketedCompute(self.fused, s),
                expect_s=self.compile_estimate_s,
            )


def _autotune_knobs() -> None:
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = AUTOTUNE_GEMM_BACKENDS


def inductor_settings() -> dict:
    """The Inductor knobs the compiled variants ran with (for the JSON)."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    return {
        "max_autotune_gemm_backends": inductor_config.max_autotune_gemm_backends,
        "max_autotune_gemm_search_space": inductor_config.max_autotune_gemm_search_space,
        "compile_threads": inductor_config.compile_threads,
        "mode_options": {
            mode: list_mode_options(mode) for mode in ("max-autotune-no-cudagraphs", "reduce-overhead")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--batch-sizes", default="64,128", help="first one is the headline size (64)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per point (median reported)")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run of the script")
    parser.add_argument("--time-budget-s", type=float, default=280.0, help="whole run, compiles included")
    parser.add_argument(
        "--max-step-s",
        type=float,
        default=180.0,
        help="longest one point may take (a compile past it is aborted)",
    )
    parser.add_argument(
        "--variants",
        "--only",
        dest="variants",
        default="",
        help="comma-separated steps in run order, each NAME or NAME@BS[/BS...] (default: all "
        "but max_autotune, most useful first; eager_hf, the reference, is always computed)",
    )
    parser.add_argument("--skip", default="", help="comma-separated variant names to leave out")
    parser.add_argument(
        "--max-autotune",
        action="store_true",
        help="add whole-model max_autotune to the default variants (minutes of compiling)",
    )
    parser.add_argument(
        "--sdpa-backend",
        choices=("auto", *SDPA_CHOICES),
        help="SDPA backend of compiled_sdpa, reduce_overhead and max_autotune (default: the "
        "fastest eager one)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny llava checkpoint instead of LLaVA-1.5 shapes"
    )
    parser.add_argument("--cpu-compile", action="store_true", help="run the compiled variants on a CPU too")
    args = parser.parse_args(argv)
    global STARTED
    STARTED = time.perf_counter()  # the budget counts from here (the imports came before)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        plan = parse_plan(
            args.variants or default_plan(batch_sizes[0], max_autotune=args.max_autotune), batch_sizes, skip
        )
    except ValueError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = Budget(args.time_budget_s, args.max_step_s)
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = 64  # variants share code objects (TowerProjector, the layers)

    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "model": "tiny llava" if args.tiny else "CLIP ViT-L/14-336 (23 of 24 layers) + LLaVA-1.5 projector",
        "time_budget_s": args.time_budget_s,
        "plan": [f"{name}@{'/'.join(map(str, sizes))}" for name, sizes in plan],
        "eager": {},
        "compiled": {},
        "compiled_regional": {},
        "regional_max_autotune": {},
        "encode_call_eager": {},
        "encode_call_compiled": {},
        "encode_breakdown": {},
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from vlm_tiny import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint("llava", Path(tmp) / "tiny")
        else:
            checkpoint = Path(tmp)
            make_llava15_vision_checkpoint(checkpoint, args.device)
        engine = load_visual_engine(checkpoint, device=device, dtype=dtype)
        tower, projector, config = load_hf_modules(checkpoint, device, dtype)
        results["hf_default_attn_implementation"] = tower.config._attn_implementation
        results["engine_fused_qkv"] = engine.compute.vision_tower.fused_qkv
        results["inductor"] = inductor_settings()
        reference_module, unfused_walk = hf_computes(tower, projector, config)
        bench = Bench(args, results, device, budget)
        size = engine.image_size
        with torch.no_grad():
            for bs in batch_sizes:
                generator = torch.Generator(device=device).manual_seed(bs)
                bench.inputs[bs] = torch.randn(bs, 3, size, size, generator=generator, device=device).to(
                    dtype
                )
                bench.references[bs] = reference_module(bench.inputs[bs])
        print(
            f"set up in {time.perf_counter() - STARTED:.0f} s on {results['device']}; "
            f"reference = eager_hf, HF attention {results['hf_default_attn_implementation']!r}; "
            f"plan: {', '.join(results['plan'])}",
            flush=True,
        )
        suite = Suite(args, bench, engine, reference_module, unfused_walk, tower, batch_sizes)
        for name, sizes in plan:
            suite.run_step(name, sizes)
        results["inductor"] = inductor_settings()

    summarize(results, batch_sizes, batch_sizes[0], device)
    bench.save()
    write_plot(results, batch_sizes, args.out)
    print(
        f"wrote {args.out / 'encoder_llava15.json'} after {time.perf_counter() - STARTED:.0f} s", flush=True
    )
    if budget.aborted:  # an interrupted compile may leave worker processes that would delay the exit
        sys.stdout.flush()
        os._exit(0)
    return 0


def summarize(results: dict, batch_sizes: list[int], headline: int, device: torch.device) -> None:
    tflops = measured_matmul_tflops() if device.type == "cuda" else float("nan")
    results["measured_bf16_matmul_tflops"] = tflops
    results["flop_ceiling_images_per_s"] = tflops * 1e12 / flops_per_image()
    best: dict = {}
    for name, variant in results["variants"].items():
        if name.startswith("encode_"):  # the whole call, host work included
            continue
        for bs, record in variant["results"].items():
            value = record.get("images_per_s")
            if value and (bs not in best or value > best[bs]["images_per_s"]):
                best[bs] = {"variant": name, "images_per_s": value}
    results["best"] = best
    ceiling = results["flop_ceiling_images_per_s"]
    print(
        f"\nimages/s, tower + projector on GPU-resident pixels (FLOP ceiling {ceiling:.0f} img/s; encode_* "
        "include host work); check = vs eager_hf",
        flush=True,
    )
    print(
        f"{'variant':<24} "
        + " ".join(f"{'bs ' + str(b):>10}" for b in batch_sizes)
        + "   max|d| / cosine   compile s",
        flush=True,
    )
    for name, variant in results["variants"].items():
        cells, check, compile_s = [], "", []
        for bs in batch_sizes:
            record = variant["results"].get(str(bs), {})
            value = record.get("images_per_s")
            cells.append(f"{value:>10.1f}" if value else f"{'-':>10}")
            if "cosine" in record and not check:
                check = f"{record['max_abs_diff']:.3g} / {record['cosine']:.6f}"
            if "first_call_s" in record:
                compile_s.append(f"{record['first_call_s']:.1f}")
        print(f"{name:<24} " + " ".join(cells) + f"   {check:<17} {'/'.join(compile_s)}", flush=True)
    if str(headline) in best:
        print(
            f"best at bs {headline}: {best[str(headline)]['variant']} {best[str(headline)]['images_per_s']:.1f}"
        )
    breakdown = results.get("encode_breakdown", {})
    if breakdown:
        sizes = [bs for bs in map(str, batch_sizes) if bs in breakdown]
        print("\nencode() stage by stage, ms (each stage alone; see the module docstring)", flush=True)
        print(f"{'stage':<28} " + " ".join(f"{'bs ' + bs:>10}" for bs in sizes), flush=True)
        for stage in dict.fromkeys(stage for bs in sizes for stage in breakdown[bs]):
            cells = [breakdown[bs].get(stage) for bs in sizes]
            print(f"{stage:<28} " + " ".join(f"{c:>10.2f}" if c is not None else f"{'-':>10}" for c in cells))


def measured_matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def write_plot(results: dict, batch_sizes: list[int], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [
        n for n, v in results["variants"].items() if any(r.get("images_per_s") for r in v["results"].values())
    ]
    width = 0.8 / max(len(batch_sizes), 1)
    for i, bs in enumerate(batch_sizes):
        values = [
            results["variants"][n]["results"].get(str(bs), {}).get("images_per_s") or 0.0 for n in names
        ]
        ax.barh([k + i * width for k in range(len(names))], values, height=width, label=f"batch {bs}")
    ceiling = results["flop_ceiling_images_per_s"]
    if not math.isnan(ceiling):
        ax.axvline(ceiling, linestyle="--", color="grey", label="FLOP ceiling")
    ax.set_yticks([k + width * (len(batch_sizes) - 1) / 2 for k in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.set_title(f"CLIP ViT-L/14-336 + projector, {results['dtype']}, {results['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "encoder_llava15.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
