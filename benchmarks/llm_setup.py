"""Shared setup of the LLM benchmarks (scenarios 1 and 2): model, engine, drivers, device ceilings.

The model is LLaVA-1.5-7B's language model (Vicuna-7B: Llama, 32 layers, hidden 4096, 32 heads,
intermediate 11008, vocab 32064) with random weights created on the device (no download, no
checkpoint file). The Hugging Face model is built first; ours shares its very tensors
(`build_decoder_from_config(weights=...)`), so the baselines run on the same weights, in the same
process, on the same card. `--tiny` swaps in a 2-layer model so the scripts can be smoke-run on CPU.

Timing rules: fixed output lengths (`ignore_eos` / `min_new_tokens`), warm-up runs excluded, the
device synchronized before every clock read that ends a timed region.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llm_service.engine.engine_core import EngineConfig, EngineCore, GenerationInput
from llm_service.engine.outputs import CONTINUATION_TOKEN
from llm_service.engine.sampling_params import SamplingParams
from llm_service.models.loader import build_decoder_from_config, fused_weight_views
from vlm_protocol.gc_freeze import freeze_startup_objects

VICUNA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-5,
)


def llama_config(tiny: bool) -> LlamaConfig:
    # eos None: random weights must never end a Hugging Face run early (fixed output lengths)
    return LlamaConfig(**(TINY if tiny else VICUNA_7B), attn_implementation="sdpa", eos_token_id=None)


# Ids below this are the synthetic tokenizer's special tokens; random prompts use only ids above.
FIRST_WORD_ID = 4


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab_size` made-up words, so the engine's detokenizer runs on
    every generated id as in production (the cost per token is one small `decode`).

    Ids 0-3 are <unk> <s> </s> <image> (the engine's text prompts need an image placeholder token, as
    LLaVA's tokenizer has); id i >= FIRST_WORD_ID is the word `w<i>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    vocab = {**specials, **{f"w{i}": i for i in range(FIRST_WORD_ID, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def word_prompt(token_ids: Sequence[int]) -> str:
    """The text `synthetic_tokenizer` encodes (without special tokens) to exactly `token_ids` (all
    >= FIRST_WORD_ID, as `random_prompts` makes them): how a token-id prompt travels through a
    text-only API such as the gRPC service."""
    return " ".join(f"w{i}" for i in token_ids)


@dataclass
class Models:
    config: LlamaConfig
    hf: LlamaForCausalLM  # Hugging Face baseline
    ours: torch.nn.Module  # our decoder, sharing `hf`'s weight tensors
    tokenizer: PreTrainedTokenizerFast
    device: torch.device
    dtype: torch.dtype


def build_models(*, tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> Models:
    config = llama_config(tiny)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init straight in bf16 on the device: no fp32 copy of 7B
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    hf = hf.to(dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = build_decoder_from_config(config, dtype=dtype, device=device, weights=hf.state_dict())
    # ours copied q/k/v and gate/up into fused tensors: point HF at views of those, so 7B is held once
    hf.load_state_dict(fused_weight_views(ours), strict=False, assign=True)
    return Models(config, hf, ours, synthetic_tokenizer(config.vocab_size), torch.device(device), dtype)


def build_engine(models: Models, *, freeze_gc: bool = True, **engine_kwargs) -> EngineCore:
    """Our engine on `models`' weights. `freeze_gc`: freeze the objects alive now out of garbage
    collection, as the services do once started (`vlm_protocol/gc_freeze.py`)."""
    config = EngineConfig(
        model_dir="",  # from_model reads nothing from disk
        device=str(models.device),
        dtype=str(models.dtype).removeprefix("torch."),
        **engine_kwargs,
    )
    engine = EngineCore.from_model(models.ours, models.tokenizer, config)
    if freeze_gc:
        freeze_startup_objects("benchmark engine")
    return engine


def random_engine_core(config: EngineConfig, *, tiny: bool, seed: int = 0) -> EngineCore:
    """`build_models` + `EngineCore.from_model` in one picklable call: the engine that
    `ProcessEngineClient(core_factory=functools.partial(random_engine_core, tiny=...))` builds inside
    its own process, with the same random weights (same seed) as one built here."""
    models = build_models(tiny=tiny, device=config.device, dtype=config.torch_dtype, seed=seed)
    return EngineCore.from_model(models.ours, models.tokenizer, config)


def release(engine: EngineCore | None) -> None:
    """Free an engine's KV cache and CUDA graphs (the shared weights stay) before the next system runs.
    The engine is unusable afterwards."""
    if engine is not None:
        engine.runner.decode_graphs = None  # its graphs hold the memory pool and views of the KV cache
        engine.runner.prefill_graphs = None
        engine.runner.kv_cache = None
        engine.runner.kv_caches = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Distinct random prompts (word ids only, no special tokens), so no prefix cache hits across requests."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_WORD_ID, vocab_size) for _ in range(length)] for _ in range(num)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- drivers ------------------------------------------------------------------------------------


_REQUEST_IDS = itertools.count()  # request ids unique across runs on one engine


class StepTimeline:
    """What each engine step ran and how long `engine.step()` took for it.

    Wraps `runner.launch` to record every launched step's rows and prefill tokens (chunks of more than
    one token), the host time spent launching it, and the time `step()` then blocks in its `wait()`
    (the GPU still running it); each non-empty `step()` call waits for exactly one launched step (the
    one queued by pipelined decode, or its own), so the i-th step time belongs to the i-th launch.
    On CUDA, events recorded before and after each launch give the GPU's own time per step (from
    when the step's first work could start, i.e. the previous step's end, to its last work) and the
    GPU's idle time before it (the previous step's end to this step's first enqueue, when later).
    """

    def __init__(self, engine: EngineCore) -> None:
        self.launches: list[tuple[int, int, bool]] = []  # (rows, prefill tokens, queued by pipelined decode)
        self.launch_s: list[float] = []
        self.wait_s: list[float] = []
        self.step_s: list[float] = []
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._runner = engine.runner
        self._launch = engine.runner.launch
        on_cuda = engine.runner.device.type == "cuda"
        self.gc_passes: list[tuple[int, float]] = []  # (generation, seconds) of each garbage collection
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

        def launch(scheduled, *args, **kwargs):
            prefill = sum(c.num_tokens for c in scheduled.chunks if c.num_tokens > 1)
            continuation = scheduled.chunks[0].token_ids[0] == CONTINUATION_TOKEN
            self.launches.append((len(scheduled.chunks), prefill, continuation))
            started = time.perf_counter()
            if on_cuda:
                self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                self.events[-1][0].record()
            pending = self._launch(scheduled, *args, **kwargs)
            if on_cuda:
                self.events[-1][1].record()
            self.launch_s.append(time.perf_counter() - started)
            wait = pending.wait

            def timed_wait():
                begun = time.perf_counter()
                try:
                    return wait()
                finally:
                    self.wait_s.append(time.perf_counter() - begun)

            pending.wait = timed_wait
            return pending

        engine.runner.launch = launch

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_passes.append((info["generation"], time.perf_counter() - self._gc_started))

    def close(self) -> None:
        self._runner.launch = self._launch
        gc.callbacks.remove(self._on_gc)

    def _gpu_times(self) -> tuple[list[float], list[float]]:
        """Per launch: seconds from its start event to its end event (its GPU time, including any wait
        for its own enqueueing) and of GPU idle before it (previous end to this start). Zeros off CUDA."""
        if not self.events:
            return [0.0] * len(self.launches), [0.0] * len(self.launches)
        torch.cuda.synchronize()
        gpu = [start.elapsed_time(end) / 1e3 for start, end in self.events]
        ends = [None] + [end for _, end in self.events[:-1]]
        idle = [0.0 if prev is None else max(0.0, prev.elapsed_time(start) / 1e3)
                for prev, (start, _) in zip(ends, self.events, strict=True)]
        return gpu, idle

    def summary(self) -> dict:
        """Steps with prefill rows vs decode-only steps: count, seconds, mean ms of the step, of its
        launch (host), of its `wait()` (GPU-bound time left), of GPU time and GPU idle before it (CUDA
        only), mean rows; the decode-only steps' mean ms by batch (rows rounded down to a multiple of
        32); garbage-collection passes by generation; and every step's row (`steps_columns`)."""
        gpu_s, idle_s = self._gpu_times()
        kinds: dict[str, list[tuple]] = {"with_prefill": [], "decode_only": []}
        per_step = []
        for seconds, (rows, prefill, continuation), launch, wait, gpu, idle in zip(
            self.step_s, self.launches, self.launch_s, self.wait_s, gpu_s, idle_s, strict=False
        ):
            kinds["with_prefill" if prefill else "decode_only"].append((seconds, rows, prefill, launch, wait, gpu, idle))
            per_step.append([rows, prefill, int(continuation), *(round(1e3 * x, 3) for x in (seconds, launch, wait, gpu, idle))])
        out: dict = {}
        for kind, steps in kinds.items():
            n = len(steps) or 1
            total = sum(s[0] for s in steps)
            out[kind] = {
                "steps": len(steps),
                "seconds": total,
                "mean_ms": 1e3 * total / n,
                "mean_launch_ms": 1e3 * sum(s[3] for s in steps) / n,
                "mean_wait_ms": 1e3 * sum(s[4] for s in steps) / n,
                "mean_gpu_ms": 1e3 * sum(s[5] for s in steps) / n if self.events else None,
                "mean_gpu_idle_before_ms": 1e3 * sum(s[6] for s in steps) / n if self.events else None,
                "mean_rows": sum(s[1] for s in steps) / n,
                "prefill_tokens": sum(s[2] for s in steps),
            }
        by_batch: dict[int, list[float]] = {}
        for seconds, rows, *_ in kinds["decode_only"]:
            by_batch.setdefault(rows // 32 * 32, []).append(seconds)
        out["decode_only_ms_by_rows"] = {
            str(b): {"steps": len(v), "mean_ms": 1e3 * sum(v) / len(v)} for b, v in sorted(by_batch.items())
        }
        out["gc_passes"] = {
            str(generation): {
                "count": sum(1 for g, _ in self.gc_passes if g == generation),
                "total_ms": 1e3 * sum(t for g, t in self.gc_passes if g == generation),
                "max_ms": 1e3 * max((t for g, t in self.gc_passes if g == generation), default=0.0),
            }
            for generation in (0, 1, 2)
        }
        out["steps_columns"] = ["rows", "prefill_tokens", "continuation", "step_ms", "launch_ms", "wait_ms",
                                "gpu_ms", "gpu_idle_before_ms"]
        out["steps"] = per_step
        return out


def run_engine(
    engine: EngineCore, prompts: Sequence[list[int]], max_tokens: int, concurrency: int, timeline: bool = False
) -> dict:
    """Closed loop: keep `concurrency` requests in flight until every prompt is served.

    Returns output tok/s over the whole run and per-request TTFT / time-per-output-token medians;
    with `timeline`, also `step_timeline` (`StepTimeline.summary`).
    """
    steps = StepTimeline(engine) if timeline else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending = list(prompts)
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    finished: dict[str, tuple[float, int]] = {}
    num_steps = 0
    preemptions_before = engine.scheduler.num_preemptions
    start = time.perf_counter()
    try:
        while pending or engine.has_unfinished_requests():
            while pending and len(submitted) - len(finished) < concurrency:
                rid = f"bench-{next(_REQUEST_IDS)}"
                engine.add_request(GenerationInput(rid, prompt_token_ids=pending.pop(0), sampling=params))
                submitted[rid] = time.perf_counter()
            before = time.perf_counter()
            outputs = engine.step()
            num_steps += 1
            now = time.perf_counter()
            if steps is not None:
                steps.step_s.append(now - before)
            for out in outputs:
                if out.new_token_ids and out.request_id not in first:
                    first[out.request_id] = now
                if out.is_finished:
                    finished[out.request_id] = (now, out.num_output_tokens)
    finally:  # after a failure, leave the engine empty for the next point
        for rid in set(submitted) - set(finished):
            engine.abort(rid)
        if steps is not None:
            steps.close()
    elapsed = time.perf_counter() - start
    num_tokens = sum(n for _, n in finished.values())
    if num_tokens != max_tokens * len(prompts):
        raise RuntimeError(f"{num_tokens} output tokens, expected {max_tokens * len(prompts)}: fixed lengths broken")
    ttft = sorted(first[r] - submitted[r] for r in finished)
    tpot = sorted((finished[r][0] - first[r]) / max(1, finished[r][1] - 1) for r in finished)
    return {
        "elapsed_s": elapsed,
        "num_requests": len(prompts),
        "output_tokens": num_tokens,
        "output_tok_s": num_tokens / elapsed,
        "req_s": len(prompts) / elapsed,
        "ttft_ms_median": 1e3 * ttft[len(ttft) // 2],
        "tpot_ms_median": 1e3 * tpot[len(tpot) // 2],
        "num_steps": num_steps,
        "num_preemptions": engine.scheduler.num_preemptions - preemptions_before,
        **({"step_timeline": steps.summary()} if steps is not None else {}),
    }


@torch.inference_mode()
def hf_generate(models: Models, prompts: Sequence[list[int]], max_tokens: int, **generate_kwargs) -> float:
    """One Hugging Face `generate` call on a batch of equal-length prompts; seconds, device synced."""
    ids = torch.tensor(list(prompts), device=models.device)
    sync(models.device)
    start = time.perf_counter()
    out = models.hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
        do_sample=False, **generate_kwargs,
    )
    sync(models.device)
    elapsed = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + max_tokens:
        raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {max_tokens}")
    return elapsed


# --- device ceilings ------------------------------------------------------------------------------


def copy_bandwidth_bytes_per_s(device: torch.device, num_bytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth, bytes read + bytes written (METHOD.md's memory ceiling)."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return 2 * num_bytes * iters / (time.perf_counter() - start)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter except the input embedding table (one
    row of it is read), lm_head included."""
    embed = model.model.embed_tokens.weight
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() in seen or (param is embed and param is not model.lm_head.weight):
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    return total


def kv_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }


# --- output -------------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_plot(path: Path, draw: Callable) -> bool:
    """`draw(plt)` into a PNG; False (and a note on stdout) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return False
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
