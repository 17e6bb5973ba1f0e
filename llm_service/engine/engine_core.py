"""The synchronous engine: add requests, `step()` = schedule -> execute -> update, abort.

It is driven by one thread (the async engine's loop, or a test). It turns user-level inputs (text or
chat messages, embeddings, sampling settings) into scheduler requests and scheduler updates into
text deltas.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationConfig

from llm_service.engine.detokenizer import IncrementalDetokenizer
from llm_service.engine.model_runner import (
    CROSS_ATTENTION,
    PROMPT_TABLE,
    ModelRunner,
    MultimodalEmbedding,
    PendingStep,
)
from llm_service.engine.outputs import SchedulerOutput
from llm_service.engine.prompt import MultimodalItem, PromptBuilder, placeholder_spec
from llm_service.engine.request import FinishReason, Request
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.scheduler import Scheduler, SchedulerConfig
from llm_service.layers.attention import KV_CACHE_DTYPES, resolve_attention_backend, resolve_kv_cache_dtype
from llm_service.models.loader import build_decoder, inspect_checkpoint
from llm_service.models.mllama import MllamaForCausalLM
from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.torch_threads import AUTO as AUTO_TORCH_THREADS

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_DEFAULT_KV_BLOCKS = 1024


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_memory_fraction on CUDA, 1024 on CPU
    kv_memory_fraction: float = 0.85  # of the GPU memory still free after loading the weights
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_waiting_requests: int = 1024
    max_prefill_chunk_tokens: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    # "auto": "triton" on CUDA (decode rows read the paged cache in place; prefill chunks use SDPA),
    # "batched" on CPU (one SDPA call per step for decode rows, one for prefill chunks); "reference"
    # (one SDPA call per sequence; slow, kept to check the others against). See layers/attention.py.
    attention_backend: str = "auto"
    # None: decode steps replay CUDA graphs captured per padded batch size on CUDA, eager elsewhere.
    # True: every step runs eagerly. False: graphs, and a ValueError off CUDA.
    enforce_eager: bool | None = None
    # Produce the text of mid-stream tokens during the next step, while the GPU runs it (see
    # `EngineCore.step`). None: on for CUDA (where the GPU runs ahead of the host), off elsewhere.
    async_output: bool | None = None
    # Queue the next decode step behind the running one (see `EngineCore.step`). None: on where
    # decode steps run as CUDA graphs.
    pipeline_decode: bool | None = None
    # Largest decode batch served by a graph (bigger batches run eagerly); buckets are 1, 2, 4, 8, 16,
    # then multiples of 16 up to this.
    max_graph_batch_size: int = 256
    # Other steps (prefill, image rows, mixed) of up to this many tokens (and at most
    # max_num_batched_tokens) run as piecewise CUDA graphs around an eager attention (see
    # prefill_graphs.py) wherever decode graphs are on; 0 turns them off. Longer steps run eagerly.
    max_prefill_graph_tokens: int = 2048
    # The paged KV cache's element type: "auto" = the model dtype; "fp8_e4m3" = float8_e4m3fn with a
    # per-tensor scale of 1.0 (K/V stored as the nearest e4m3 value, saturated to +-448): half the
    # bytes, so twice the blocks for the same memory and half the K/V reads of a decode step. The
    # triton backend needs compute capability >= 8.9 for it. mllama's cross-attention K/V (per request,
    # not paged) stay in the model dtype. Calibrated scales are future work. See layers/attention.py.
    kv_cache_dtype: str = "auto"
    # On CUDA, projections with at most 16 input rows (decode, short prefill tails) use the Triton
    # skinny GEMM for each weight shape where start-up timing finds it faster than cuBLAS (see
    # layers/triton_skinny.py); False: always cuBLAS.
    skinny_gemm: bool = True
    # torch's CPU threads per operator in the engine's process (see vlm_protocol/torch_threads.py);
    # 0 = auto: 1 on CUDA (unless OMP_NUM_THREADS is set), torch's default on CPU. Applied by whoever
    # owns the process's main thread (the service, the engine process), not by EngineCore.
    torch_threads: int = AUTO_TORCH_THREADS

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        resolve_attention_backend(self.attention_backend, self.device_type)  # ValueError on a bad name
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            choices = ", ".join(KV_CACHE_DTYPES)
            raise ValueError(f"kv_cache_dtype must be one of {choices}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} needs a CPU or CUDA device, got {self.device!r}")
        if self.enforce_eager is False and not self.device.startswith("cuda"):
            raise ValueError(f"enforce_eager=False needs a CUDA device (CUDA graphs), got device {self.device!r}")
        if self.max_graph_batch_size < 1:
            raise ValueError(f"max_graph_batch_size must be >= 1, got {self.max_graph_batch_size}")
        if self.max_prefill_graph_tokens < 0:
            raise ValueError(f"max_prefill_graph_tokens must be >= 0, got {self.max_prefill_graph_tokens}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0 (0 = auto), got {self.torch_threads}")

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def use_cuda_graphs(self) -> bool:
        return self.enforce_eager is False or (self.enforce_eager is None and self.device_type == "cuda")

    @property
    def use_pipeline_decode(self) -> bool:
        return self.pipeline_decode if self.pipeline_decode is not None else self.use_cuda_graphs

    @property
    def use_async_output(self) -> bool:
        return self.async_output if self.async_output is not None else self.device_type == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return _DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return resolve_kv_cache_dtype(self.kv_cache_dtype, self.torch_dtype)


@dataclass
class GenerationInput:
    """One request in engine terms. Exactly one of `prompt`, `messages`, `prompt_token_ids`."""

    request_id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    embeddings: Sequence[MultimodalEmbedding] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    triton_ensemble_format: bool = False  # wrap `prompt` in the original ensemble's family template
    add_special_tokens: bool = True
    continue_final_message: bool = False  # chat: leave the last (assistant) message open


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finish_reason: FinishReason | None = None
    stop_string: str | None = None
    logprobs: list[object] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Timeline (time.monotonic()): when the engine queued the request (after tokenizing), how long
    # tokenizing took, and when its first forward pass began.
    arrival_time: float = 0.0
    tokenize_time_s: float = 0.0
    first_scheduled_time: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer
    arrival: float
    tokenize_s: float = 0.0
    first_scheduled: float | None = None


def _load_chat_template(root: Path, tokenizer) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = root / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _eos_token_ids(decoder_dir: Path, root: Path, tokenizer) -> tuple[int, ...]:
    for directory in (root, decoder_dir):
        if (directory / "generation_config.json").is_file():
            eos = GenerationConfig.from_pretrained(directory).eos_token_id
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)


def kv_cache_bytes_per_block(model: nn.Module, config: EngineConfig) -> int:
    """Bytes of one KV block over all layers, K and V, in the cache dtype (fp8: half of bf16)."""
    num_kv_heads, head_dim = model.kv_shape
    elements = 2 * model.num_layers * config.block_size * num_kv_heads * head_dim
    return elements * config.kv_cache_torch_dtype.itemsize


def kv_blocks_for_memory(model: nn.Module, config: EngineConfig, free_bytes: int) -> int:
    """How many KV blocks `config.kv_memory_fraction` of `free_bytes` holds."""
    num_blocks = int(free_bytes * config.kv_memory_fraction) // kv_cache_bytes_per_block(model, config)
    if num_blocks < 1:
        raise RuntimeError("no GPU memory left for the KV cache after loading the weights")
    return num_blocks


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        info = inspect_checkpoint(config.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_dir)
        self._setup(
            config,
            model=build_decoder(info, dtype=config.torch_dtype, device=torch.device(config.device)),
            tokenizer=tokenizer,
            family=info.family,
            hf_config=info.config,
            text_config=info.text_config,
            eos_token_ids=_eos_token_ids(info.decoder_dir, info.root, tokenizer),
            chat_template=_load_chat_template(info.root, tokenizer),
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer,
        config: EngineConfig,
        *,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> EngineCore:
        """A text-only engine around a decoder already in memory (`model.config` is its HF text config),
        e.g. random weights built on the GPU by `build_decoder_from_config` for benchmarks.

        Nothing is read from disk: `config.model_dir` is not used. The model must already be on
        `config.device` in `config.torch_dtype`.
        """
        if isinstance(model, MllamaForCausalLM):
            raise ValueError("from_model builds text-only engines; mllama needs its checkpoint (EngineCore(config))")
        param = next(model.parameters())
        if param.dtype != config.torch_dtype or param.device.type != torch.device(config.device).type:
            raise ValueError(
                f"model is {param.dtype} on {param.device}; the config asks for {config.torch_dtype} on {config.device}"
            )
        engine = cls.__new__(cls)
        engine._setup(
            config,
            model=model,
            tokenizer=tokenizer,
            family="text",
            hf_config=model.config,
            text_config=model.config,
            eos_token_ids=tuple(eos_token_ids),
            chat_template=chat_template,
        )
        return engine

    def _setup(
        self,
        config: EngineConfig,
        *,
        model: nn.Module,
        tokenizer,
        family: str,
        hf_config,
        text_config,
        eos_token_ids: tuple[int, ...],
        chat_template: str | None,
    ) -> None:
        self.config = config
        self.family = family
        self.device = torch.device(config.device)
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        spec = placeholder_spec(family, hf_config)
        self.prompt_builder = PromptBuilder(family, tokenizer, spec, chat_template)
        self.model = model
        self.hidden_size = text_config.hidden_size
        self.vocab_size = text_config.vocab_size
        self.max_model_len = config.max_model_len or text_config.max_position_embeddings
        num_blocks = config.num_kv_blocks or self._auto_num_blocks()
        image_token_id = tokenizer.convert_tokens_to_ids(spec.image_token) if not spec.expands else None
        self.runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            device=self.device,
            dtype=config.torch_dtype,
            vocab_size=self.vocab_size,
            image_token_id=image_token_id,
            seed=config.seed,
            attention_backend=config.attention_backend,
            cuda_graphs=config.use_cuda_graphs,
            max_model_len=self.max_model_len,
            max_graph_batch_size=min(config.max_graph_batch_size, config.max_num_seqs),
            max_prefill_graph_tokens=min(config.max_prefill_graph_tokens, config.max_num_batched_tokens),
            kv_cache_dtype=config.kv_cache_torch_dtype,
            skinny_gemm=config.skinny_gemm,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                max_waiting_requests=config.max_waiting_requests,
                max_prefill_chunk_tokens=config.max_prefill_chunk_tokens,
                block_size=config.block_size,
                num_blocks=num_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
            )
        )
        self._tracked: dict[str, _Tracked] = {}
        self._deferred: list = []  # token updates whose text is produced during the next step
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None  # a queued continuation step
        logger.info(
            "engine ready: family=%s device=%s dtype=%s kv_cache_dtype=%s kv_blocks=%d x %d tokens (%.2f GiB)",
            self.family, self.device, config.torch_dtype, config.kv_cache_torch_dtype, num_blocks,
            config.block_size, num_blocks * kv_cache_bytes_per_block(model, config) / 2**30,
        )

    def _auto_num_blocks(self) -> int:
        if self.device.type != "cuda":
            return _CPU_DEFAULT_KV_BLOCKS
        free, _ = torch.cuda.mem_get_info(self.device)
        return kv_blocks_for_memory(self.model, self.config, free)

    # --- requests ---------------------------------------------------------------------------------

    def add_request(self, inp: GenerationInput) -> Request:
        """Validate, tokenize and queue a request. Raises a VlmError subclass on bad input."""
        if inp.request_id in self._tracked:
            raise InvalidArgumentError(f"request id {inp.request_id!r} is already in use")
        self._check_embeddings(inp.embeddings)
        started = time.monotonic()
        token_ids, spans = self._tokenize(inp)
        tokenize_s = time.monotonic() - started
        cross_ids = tuple(e.content_id for e in inp.embeddings if e.kind == CROSS_ATTENTION)
        request = Request(
            request_id=inp.request_id,
            prompt_token_ids=token_ids,
            sampling_params=self._fit_to_context(inp.sampling, len(token_ids)),
            eos_token_ids=self.eos_token_ids,
            mm_spans=spans,
            cache_salt_keys=cross_ids,
        )
        self.scheduler.add_request(request)
        try:
            self.runner.add_request(request, inp.embeddings)
        except Exception:
            self.scheduler.abort(request.request_id)
            raise
        params = request.sampling_params
        self._tracked[request.request_id] = _Tracked(
            request,
            IncrementalDetokenizer(
                self.tokenizer,
                list(token_ids),
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            ),
            time.monotonic(),
            tokenize_s,
        )
        return request

    def _fit_to_context(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        # Generation stops at max_model_len (FINISH_REASON_LENGTH), so a max_tokens that would run
        # past it is shortened, not refused. A prompt that fills the context is refused by the scheduler.
        room = self.max_model_len - num_prompt_tokens
        if room < 1 or params.max_tokens <= room:
            return params
        return replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))

    def _check_embeddings(self, embeddings: Sequence[MultimodalEmbedding]) -> None:
        want = CROSS_ATTENTION if self.runner.is_cross_attention_model else PROMPT_TABLE
        for e in embeddings:
            if e.kind != want:
                raise InvalidArgumentError(
                    f"embedding {e.content_id} is a {e.kind} embedding; this {self.family} model takes {want}"
                )
            if e.features.shape[-1] != self.hidden_size:
                raise InvalidArgumentError(
                    f"embedding {e.content_id} has hidden size {e.features.shape[-1]}; "
                    f"the model expects {self.hidden_size} (was it encoded for another model?)"
                )
            if e.kind == PROMPT_TABLE and e.features.dim() != 2:
                raise InvalidArgumentError(f"prompt table {e.content_id} must be [rows, hidden]")
            if e.kind == CROSS_ATTENTION and (e.features.dim() != 4 or len(e.num_tiles) != e.features.shape[0]):
                raise InvalidArgumentError(
                    f"cross-attention features {e.content_id} must be [images, tiles, patches, hidden] "
                    "with one tile count per image"
                )

    def _tokenize(self, inp: GenerationInput):
        given = [x is not None for x in (inp.prompt, inp.messages, inp.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidArgumentError("give exactly one of prompt text, chat messages or prompt token ids")
        if inp.prompt_token_ids is not None:
            if inp.embeddings:
                raise InvalidArgumentError("prompt token ids cannot be combined with images; send text")
            bad = [t for t in inp.prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgumentError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
            return list(inp.prompt_token_ids), ()
        items = [
            MultimodalItem(e.content_id, e.media_type, e.num_rows or int(e.features.shape[0]))
            for e in inp.embeddings
        ]
        text, add_special = self.render_prompt(inp)
        tokenized = self.prompt_builder.tokenize(text, items, add_special_tokens=add_special)
        return tokenized.token_ids, tokenized.mm_spans

    def tokenize_prompt(self, inp: GenerationInput) -> tuple[str, list[int]]:
        """The rendered prompt text and the token ids `add_request` would queue (placeholders expanded)."""
        self._check_embeddings(inp.embeddings)
        return self.render_prompt(inp)[0], list(self._tokenize(inp)[0])

    def render_prompt(self, inp: GenerationInput) -> tuple[str, bool]:
        """The prompt text after templating, and whether the tokenizer should add special tokens."""
        if inp.messages is not None:
            text = self.prompt_builder.render_chat(
                inp.messages,
                add_generation_prompt=not inp.continue_final_message,
                continue_final_message=inp.continue_final_message,
            )
            # Templates that write BOS themselves must not get a second one from the tokenizer.
            bos = self.tokenizer.bos_token
            return text, not (bos and text.startswith(bos))
        text = inp.prompt or ""
        if inp.triton_ensemble_format:
            text = self.prompt_builder.ensemble_format(text, len(inp.embeddings))
        return text, inp.add_special_tokens

    def abort(self, request_id: str) -> bool:
        tracked = self._tracked.pop(request_id, None)
        self.runner.remove_request(request_id)
        return self.scheduler.abort(request_id) or tracked is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None or bool(self._deferred)

    # --- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine iteration: run a step and return what it produced.

        Two ways the host's work is hidden behind the GPU's, both on CUDA by default:

        * `pipeline_decode`: while a decode-only step runs, the next one (the same requests, one token
          further, see `Scheduler.schedule_continuation`) is scheduled and queued behind it, reading
          its input tokens on the device. The previous step's bookkeeping and detokenization then
          run while the GPU computes the next step. Outputs stay exact: a request that stops meanwhile
          has its extra token dropped.
        * `async_output`: when no step is queued, the text of a token that neither starts nor ends its
          request (and whose request has no stop strings, which need the text to be checked) is
          produced during the next step. Token-level stops (EOS, stop ids, lengths) apply at once.
        """
        if self._in_flight is not None:
            scheduled, pending = self._in_flight
            self._in_flight = None
        else:
            scheduled = self.scheduler.schedule()
            if scheduled.is_empty:
                return self._flush_deferred()
            self._mark_scheduled(scheduled)
            pending = self.runner.launch(scheduled, self.scheduler.requests)
        if self.config.use_pipeline_decode and self.runner.can_continue(scheduled.chunks):
            following = self.scheduler.schedule_continuation(scheduled)
            if following is not None:
                self._in_flight = (following, self.runner.launch(following, self.scheduler.requests, pending))
        outputs = self._flush_deferred()  # host work that overlaps the GPU's
        runner_output = pending.wait()
        for update in self.scheduler.update_from_output(scheduled, runner_output):
            tracked = self._tracked.get(update.request_id)
            if tracked is None:
                continue
            if self._can_defer(tracked, update):
                self._deferred.append(update)
            else:
                outputs.append(self._to_output(tracked, update))
        return outputs

    def _mark_scheduled(self, scheduled) -> None:
        now = time.monotonic()
        for chunk in scheduled.chunks:
            tracked = self._tracked.get(chunk.request_id)
            if tracked is not None and tracked.first_scheduled is None:
                tracked.first_scheduled = now

    def _can_defer(self, tracked: _Tracked, update) -> bool:
        return (
            self.config.use_async_output
            and self._in_flight is None  # with a step queued, this text is made while the GPU runs it
            and update.finish_reason is None
            and not tracked.detokenizer.has_stop_strings
            and tracked.request.num_output_tokens > 1  # the first token goes out at once (TTFT)
        )

    def _flush_deferred(self) -> list[RequestOutput]:
        deferred, self._deferred = self._deferred, []
        # requests aborted since are gone from _tracked; the rest cannot finish here (no stop strings)
        return [self._to_output(self._tracked[u.request_id], u) for u in deferred if u.request_id in self._tracked]

    def _to_output(self, tracked: _Tracked, update) -> RequestOutput:
        request = tracked.request
        detok = tracked.detokenizer.push(update.new_token_ids)
        text = detok.text_delta
        reason = update.finish_reason
        if detok.stop_string is not None and reason is None:
            reason = FinishReason.STOP_STRING
            self.scheduler.finish_request(request.request_id, reason)
        if reason is not None:
            if detok.stop_string is None:
                text += tracked.detokenizer.flush()
            self._tracked.pop(request.request_id, None)
            self.runner.remove_request(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=list(update.new_token_ids),
            text_delta=text,
            finish_reason=reason,
            stop_string=detok.stop_string,
            logprobs=[update.logprobs] if update.logprobs is not None else [],
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_prompt_tokens=request.num_cached_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            arrival_time=tracked.arrival,
            tokenize_time_s=tracked.tokenize_s,
            first_scheduled_time=tracked.first_scheduled,
        )
