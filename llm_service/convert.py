"""vlm.v1 messages <-> engine dataclasses. The only module of the LLM service that reads or builds them.

Requests: `GenerateRequest` and `GenerateStreamRequest` have the same fields, so every function here
takes either. Bad input raises `InvalidArgumentError` (or `FailedPreconditionError` for a feature the
deployment lacks) naming the offending field; the servicer's error table turns those into statuses.
Responses: `StreamResponseBuilder` turns engine outputs into stream deltas (the last one carrying
finish reason, usage and timings) and `merge_stream` folds a stream into a unary response.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from vlm.v1 import common_pb2, llm_service_pb2

from llm_service.engine.engine_core import GenerationInput, RequestOutput
from llm_service.engine.model_runner import CROSS_ATTENTION, PROMPT_TABLE, MultimodalEmbedding
from llm_service.engine.request import FinishReason
from llm_service.engine.sampling_params import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, SamplingParams
from llm_service.engine.staged_embeddings import StagedTensor
from llm_service.model_info import ModelDescription
from vlm_protocol.content_id import validate_content_id
from vlm_protocol.dtypes import torch_dtype_for_name
from vlm_protocol.errors import FailedPreconditionError, InvalidArgumentError, StaleSharedMemoryError
from vlm_protocol.shared_memory import SharedMemoryReader, SharedMemorySlice
from vlm_protocol.tensor_codec import data_type_for_name, decode_torch, shared_memory_reference

GenerateLike = llm_service_pb2.GenerateRequest | llm_service_pb2.GenerateStreamRequest

MAX_REQUEST_ID_CHARS = 256

FAMILY_ENUMS: dict[str, int] = {
    "blip2": common_pb2.MODEL_FAMILY_BLIP2,
    "llava": common_pb2.MODEL_FAMILY_LLAVA,
    "vila": common_pb2.MODEL_FAMILY_VILA,
    "llava_onevision": common_pb2.MODEL_FAMILY_LLAVA_ONEVISION,
    "mllama": common_pb2.MODEL_FAMILY_MLLAMA,
}
_KIND_ENUMS: dict[str, int] = {
    PROMPT_TABLE: common_pb2.EMBEDDING_KIND_PROMPT_TABLE,
    CROSS_ATTENTION: common_pb2.EMBEDDING_KIND_CROSS_ATTENTION,
}
_KINDS: dict[int, str] = {value: name for name, value in _KIND_ENUMS.items()}
_FINISH_REASONS: dict[FinishReason, int] = {
    FinishReason.STOP: llm_service_pb2.FINISH_REASON_STOP,
    FinishReason.STOP_TOKEN: llm_service_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: llm_service_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.LENGTH: llm_service_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: llm_service_pb2.FINISH_REASON_ABORTED,
}
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _enum_name(enum_type, value: int) -> str:
    try:
        return enum_type.Name(value)
    except ValueError:
        return str(value)


# --- requests ---------------------------------------------------------------------------------------


def request_id_of(request) -> str:
    """The caller's request id, or a fresh one when empty."""
    request_id = request.request_id
    if not request_id:
        return "req-" + uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidArgumentError(
            f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters (or empty)"
        )
    return request_id


def chat_messages(chat: llm_service_pb2.ChatPrompt) -> list[dict]:
    """ChatPrompt -> the Hugging Face chat-template format: {"role", "content": [{"type": ...}, ...]}."""
    if not chat.messages:
        raise InvalidArgumentError("chat.messages is empty; send at least one message")
    messages = []
    for i, message in enumerate(chat.messages):
        if not message.role:
            raise InvalidArgumentError(
                f"chat.messages[{i}].role is empty; use e.g. 'system', 'user' or 'assistant'"
            )
        content = []
        for j, part in enumerate(message.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                content.append({"type": "text", "text": part.text})
            elif kind in ("image", "video"):
                content.append({"type": kind})
            else:
                raise InvalidArgumentError(
                    f"chat.messages[{i}].content[{j}] has no part set (text, image or video)"
                )
        messages.append({"role": message.role, "content": content})
    return messages


def _prompt_fields(request) -> dict:
    """prompt / chat / prompt_format / add_special_tokens -> GenerationInput keyword arguments."""
    if request.prompt_format not in (
        llm_service_pb2.PROMPT_FORMAT_UNSPECIFIED,
        llm_service_pb2.PROMPT_FORMAT_TRITON_ENSEMBLE,
    ):
        raise InvalidArgumentError(f"prompt_format {request.prompt_format} is not a known PromptFormat value")
    is_triton = request.prompt_format == llm_service_pb2.PROMPT_FORMAT_TRITON_ENSEMBLE
    which = request.WhichOneof("prompt_input")
    if which is None:
        raise InvalidArgumentError("set `prompt` (text) or `chat` (messages)")
    if which == "prompt":
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return {
            "prompt": request.prompt,
            "triton_ensemble_format": is_triton,
            "add_special_tokens": add_special,
        }
    if is_triton:
        raise InvalidArgumentError(
            "prompt_format PROMPT_FORMAT_TRITON_ENSEMBLE applies to `prompt` text, not `chat`"
        )
    # Chat templates write their own special tokens; the engine adds BOS only when the template did not.
    return {
        "messages": chat_messages(request.chat),
        "continue_final_message": request.chat.continue_final_message,
    }


def _check_token_id(value: int, field: str, vocab_size: int) -> None:
    if not 0 <= value < vocab_size:
        raise InvalidArgumentError(
            f"{field} {value} is not a token id of this model (vocabulary size {vocab_size})"
        )


def sampling_params(request, defaults: SamplingParams, vocab_size: int) -> SamplingParams:
    """SamplingParams + OutputOptions -> the engine's SamplingParams; unset optionals take `defaults`."""
    s = request.sampling
    options = request.output_options
    if s.max_tokens < 0:
        raise InvalidArgumentError(
            f"sampling.max_tokens must be >= 1, or 0 for the server default ({defaults.max_tokens}); got {s.max_tokens}"
        )
    if s.min_tokens < 0:
        raise InvalidArgumentError(f"sampling.min_tokens must be >= 0, got {s.min_tokens}")
    if not 0 <= options.top_log_probs <= MAX_TOP_LOGPROBS:
        raise InvalidArgumentError(
            f"output_options.top_log_probs must be in [0, {MAX_TOP_LOGPROBS}], got {options.top_log_probs}"
        )
    if options.prompt_log_probs:
        raise FailedPreconditionError("output_options.prompt_log_probs is not supported by this server")
    if len(s.stop_strings) > MAX_STOP_STRINGS:
        raise InvalidArgumentError(
            f"sampling.stop_strings has {len(s.stop_strings)} entries; at most {MAX_STOP_STRINGS}"
        )
    for i, token_id in enumerate(s.stop_token_ids):
        _check_token_id(token_id, f"sampling.stop_token_ids[{i}]", vocab_size)
    for name in ("end_id", "pad_id"):
        if s.HasField(name):
            _check_token_id(getattr(s, name), f"sampling.{name}", vocab_size)

    def optional(name: str, default):
        return getattr(s, name) if s.HasField(name) else default

    top_p = optional("top_p", defaults.top_p)
    if top_p <= 0.0:
        top_p = 1.0  # the Triton ensemble treated top_p <= 0 as unset
    return SamplingParams(
        max_tokens=s.max_tokens or defaults.max_tokens,
        min_tokens=s.min_tokens,
        temperature=optional("temperature", defaults.temperature),
        top_k=optional("top_k", defaults.top_k),
        top_p=top_p,
        min_p=optional("min_p", defaults.min_p),
        seed=optional("seed", defaults.seed),
        repetition_penalty=optional("repetition_penalty", defaults.repetition_penalty),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        stop=tuple(s.stop_strings),
        stop_token_ids=tuple(s.stop_token_ids),
        end_id=optional("end_id", None),
        pad_id=optional("pad_id", None),
        ignore_eos=s.ignore_eos,
        include_stop_str_in_output=s.include_stop_str_in_output,
        logprobs=options.log_probs or options.top_log_probs > 0,
        top_logprobs=options.top_log_probs,
        skip_special_tokens=options.skip_special_tokens if options.HasField("skip_special_tokens") else True,
    )


def generation_input(
    request: GenerateLike, *, engine_request_id: str, defaults: SamplingParams, vocab_size: int
) -> GenerationInput:
    """A Generate(Stream)Request -> GenerationInput without embeddings (the servicer resolves those)."""
    return GenerationInput(
        request_id=engine_request_id,
        sampling=sampling_params(request, defaults, vocab_size),
        **_prompt_fields(request),
    )


def tokenize_input(request: llm_service_pb2.TokenizeRequest) -> GenerationInput:
    """A TokenizeRequest -> GenerationInput carrying only the prompt fields."""
    return GenerationInput(request_id="tokenize", **_prompt_fields(request))


# --- multimodal inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSlot:
    """One MultimodalInput, classified. Exactly one of the three is set."""

    index: int
    embedding: MultimodalEmbedding | None = None  # sent in full
    content_id: str | None = None  # a reference to an embedding the server should hold
    media: common_pb2.MediaItem | None = None  # raw media for the encoder (one-call mode)
    # content_id came from an embedding whose shared-memory slot was reused: usable only if cached
    stale_shared_memory: bool = False


def input_slots(
    request: GenerateLike,
    model: ModelDescription,
    *,
    max_inputs: int,
    shared_memory: SharedMemoryReader | None = None,
    defer_shared_memory: bool = False,
) -> list[InputSlot]:
    """Classify and check every multimodal input; full embeddings are decoded (``shared_memory``
    reads those whose features are in shared memory; None refuses them with FAILED_PRECONDITION;
    ``defer_shared_memory``: see `embedding_from_proto`).

    An embedding whose shared-memory slot was reused becomes a content-id reference: the cache may
    still hold it, and otherwise the caller answers NOT_FOUND for it like for any unknown id.
    """
    inputs = request.multimodal_inputs
    if len(inputs) > max_inputs:
        raise InvalidArgumentError(f"{len(inputs)} multimodal inputs sent; at most {max_inputs} per request")
    slots = []
    for i, item in enumerate(inputs):
        field = f"multimodal_inputs[{i}]"
        which = item.WhichOneof("source")
        if which == "embedding":
            try:
                embedding = embedding_from_proto(
                    item.embedding,
                    model,
                    field=f"{field}.embedding",
                    shared_memory=shared_memory,
                    defer_shared_memory=defer_shared_memory,
                )
            except StaleSharedMemoryError as exc:
                slots.append(InputSlot(i, content_id=exc.content_ids[0], stale_shared_memory=True))
                continue
            slots.append(InputSlot(i, embedding=embedding))
        elif which == "content_id":
            slots.append(
                InputSlot(i, content_id=validate_content_id(item.content_id, field=f"{field}.content_id"))
            )
        elif which == "media":
            if item.media.WhichOneof("media") == "video" and not model.supports_video:
                raise FailedPreconditionError(f"{field}: this {model.family} model does not take videos")
            slots.append(InputSlot(i, media=item.media))
        else:
            raise InvalidArgumentError(f"{field} has no source set (embedding, content_id or media)")
    return slots


def _shared_memory_features(tensor: common_pb2.Tensor, *, field: str) -> StagedTensor | None:
    reference = shared_memory_reference(tensor, field=field)
    if reference is None:
        return None
    name, shape = reference
    slice_ = tensor.shared_memory
    return StagedTensor(
        slice=SharedMemorySlice(slice_.region, int(slice_.offset), int(slice_.length), int(slice_.generation)),
        dtype=torch_dtype_for_name(name),
        shape=shape,
    )


def embedding_from_proto(
    message: common_pb2.Embedding,
    model: ModelDescription,
    *,
    field: str,
    shared_memory: SharedMemoryReader | None = None,
    defer_shared_memory: bool = False,
) -> MultimodalEmbedding:
    """Check an Embedding against the loaded model and decode its features.

    ``shared_memory`` reads features that are in shared memory (None: FAILED_PRECONDITION for those).
    ``defer_shared_memory``: leave them there; the features become a `StagedTensor` (the slice, dtype
    and shape) for the engine process to read (`--engine-process`: one copy instead of three).
    A reused slot raises ``StaleSharedMemoryError`` naming the content id (NOT_FOUND, so the client
    resends the bytes). Family, fingerprint and kind are checked before the features are read.
    """
    content_id = validate_content_id(message.content_id, field=f"{field}.content_id")
    our_family = FAMILY_ENUMS.get(model.family, common_pb2.MODEL_FAMILY_UNSPECIFIED)
    if message.model_family not in (common_pb2.MODEL_FAMILY_UNSPECIFIED, our_family):
        raise InvalidArgumentError(
            f"{field} was encoded for {_enum_name(common_pb2.ModelFamily, message.model_family)}; "
            f"this server runs {_enum_name(common_pb2.ModelFamily, our_family)}"
        )
    if message.model_fingerprint and message.model_fingerprint != model.fingerprint:
        raise InvalidArgumentError(
            f"{field}.model_fingerprint does not match this server's checkpoint; "
            "encode with an encoder serving the same model directory"
        )
    kind = _KINDS.get(message.kind)
    if kind is None:
        raise InvalidArgumentError(
            f"{field}.kind must be EMBEDDING_KIND_PROMPT_TABLE or EMBEDDING_KIND_CROSS_ATTENTION"
        )
    if kind != model.embedding_kind:
        raise InvalidArgumentError(
            f"{field} is a {_enum_name(common_pb2.EmbeddingKind, message.kind)} embedding; this "
            f"{model.family} model takes {_enum_name(common_pb2.EmbeddingKind, _KIND_ENUMS[model.embedding_kind])}"
        )
    if message.media_type == common_pb2.MEDIA_TYPE_VIDEO and not model.supports_video:
        raise FailedPreconditionError(
            f"{field} is a video embedding; this {model.family} model does not take videos"
        )
    if not message.HasField("features"):
        raise InvalidArgumentError(f"{field}.features is missing")
    try:
        features = None
        if defer_shared_memory and shared_memory is not None:
            features = _shared_memory_features(message.features, field=f"{field}.features")
        if features is None:
            features = decode_torch(message.features, field=f"{field}.features", shared_memory=shared_memory)
    except StaleSharedMemoryError as exc:
        raise StaleSharedMemoryError(
            f"{field} ({content_id}): the shared-memory slot was reused; resend the embedding bytes",
            content_ids=(content_id,),
        ) from exc
    shape = list(features.shape)
    if not features.is_floating_point():
        raise InvalidArgumentError(f"{field}.features must be one of {', '.join(_FLOAT_DTYPES)}")
    expected_dim = 2 if kind == PROMPT_TABLE else 4
    if len(shape) != expected_dim:
        layout = (
            "[num_rows, hidden_size]"
            if kind == PROMPT_TABLE
            else "[num_images, max_num_tiles, num_patches, hidden_size]"
        )
        raise InvalidArgumentError(f"{field}.features has shape {shape}; expected {layout}")
    if shape[-1] != model.hidden_size:
        raise InvalidArgumentError(
            f"{field}.features has hidden size {shape[-1]}; this model's is {model.hidden_size} "
            "(was it encoded for another model?)"
        )
    num_rows = features.numel() // model.hidden_size
    if num_rows < 1:
        raise InvalidArgumentError(f"{field}.features has no rows")
    if message.num_rows and message.num_rows != num_rows:
        raise InvalidArgumentError(
            f"{field}.num_rows is {message.num_rows} but features {shape} hold {num_rows} rows"
        )
    if kind == PROMPT_TABLE:
        if message.num_prompt_tokens and message.num_prompt_tokens != num_rows:
            raise InvalidArgumentError(
                f"{field}.num_prompt_tokens is {message.num_prompt_tokens}; a prompt table of {num_rows} rows "
                f"occupies {num_rows}"
            )
    else:
        num_images, max_tiles = shape[0], shape[1]
        if len(message.num_tiles) != num_images or not all(1 <= n <= max_tiles for n in message.num_tiles):
            raise InvalidArgumentError(
                f"{field}.num_tiles must have one entry per image ({num_images}), each in [1, {max_tiles}]"
            )
    media_type = "video" if message.media_type == common_pb2.MEDIA_TYPE_VIDEO else "image"
    return MultimodalEmbedding(
        content_id, kind, features, media_type, tuple(int(n) for n in message.num_tiles)
    )


def num_multimodal_prompt_tokens(embeddings: Iterable[MultimodalEmbedding]) -> int:
    """Prompt positions filled by these embeddings (cross-attention images keep one token each)."""
    return sum(e.num_rows if e.kind == PROMPT_TABLE else 1 for e in embeddings)


# --- responses --------------------------------------------------------------------------------------


@dataclass
class RequestTimeline:
    """Service-side timestamps of one request (time.monotonic())."""

    received_at: float
    encode_s: float = 0.0
    inputs_s: float = 0.0  # resolving multimodal inputs, encode_s excluded
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None

    @property
    def ttft_ms(self) -> float:
        return 0.0 if self.first_token_at is None else (self.first_token_at - self.received_at) * 1e3

    def total_ms(self, now: float) -> float:
        return ((self.finished_at or now) - self.received_at) * 1e3


class StreamResponseBuilder:
    """Turns one request's engine outputs into GenerateStreamResponse deltas.

    `token_text(id)` decodes one token alone (for log probs). The message built from the finished
    output is the last one and carries finish reason, usage and timings.
    """

    def __init__(
        self,
        request_id: str,
        timeline: RequestTimeline,
        *,
        token_text: Callable[[int], str],
        num_multimodal_prompt_tokens: int,
        top_log_probs: int,
    ) -> None:
        self.request_id = request_id
        self.timeline = timeline
        self._token_text = token_text
        self._num_multimodal = num_multimodal_prompt_tokens
        self._top_log_probs = top_log_probs
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0
        self.num_output_tokens = 0
        self.finish_reason: FinishReason | None = None

    def build(self, output: RequestOutput, now: float) -> llm_service_pb2.GenerateStreamResponse:
        timeline = self.timeline
        message = llm_service_pb2.GenerateStreamResponse(
            request_id=self.request_id, text=output.text_delta, token_ids=output.new_token_ids
        )
        if output.new_token_ids:
            if timeline.first_token_at is None:
                timeline.first_token_at = now
            timeline.last_token_at = now
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_prompt_tokens = output.num_cached_prompt_tokens
        first_position = output.num_prompt_tokens + self.num_output_tokens
        for k, (token_id, (log_prob, top)) in enumerate(
            zip(output.new_token_ids, output.logprobs, strict=False)
        ):
            entry = message.log_probs.add(position=first_position + k)
            self._fill(entry.token, token_id, log_prob)
            for alt_id, alt_log_prob in top[: self._top_log_probs]:
                self._fill(entry.top_alternatives.add(), alt_id, alt_log_prob)
        self.num_output_tokens += len(output.new_token_ids)
        if output.is_finished:
            self._finish(message, output, now)
        return message

    def _fill(self, target: llm_service_pb2.TokenLogProb, token_id: int, log_prob: float) -> None:
        target.token_id = token_id
        target.token = self._token_text(token_id)
        target.log_prob = log_prob

    def _finish(
        self, message: llm_service_pb2.GenerateStreamResponse, output: RequestOutput, now: float
    ) -> None:
        reason = output.finish_reason
        assert reason is not None
        self.finish_reason = reason
        timeline = self.timeline
        timeline.finished_at = now
        message.finish_reason = _FINISH_REASONS[reason]
        if reason is FinishReason.STOP_STRING and output.stop_string:
            message.stop_string = output.stop_string
        if reason in (FinishReason.STOP, FinishReason.STOP_TOKEN) and output.new_token_ids:
            message.stop_token_id = output.new_token_ids[-1]
        message.usage.prompt_tokens = output.num_prompt_tokens
        message.usage.completion_tokens = output.num_output_tokens
        message.usage.cached_prompt_tokens = output.num_cached_prompt_tokens
        message.usage.multimodal_prompt_tokens = self._num_multimodal
        t = message.timings
        t.tokenize_ms = output.tokenize_time_s * 1e3
        t.encode_ms = timeline.encode_s * 1e3
        t.inputs_ms = timeline.inputs_s * 1e3
        if output.first_scheduled_time is not None:
            t.queue_ms = max(output.first_scheduled_time - output.arrival_time, 0.0) * 1e3
            if timeline.first_token_at is not None:
                t.prefill_ms = max(timeline.first_token_at - output.first_scheduled_time, 0.0) * 1e3
        t.time_to_first_token_ms = timeline.ttft_ms
        if timeline.first_token_at is not None and timeline.last_token_at is not None:
            t.decode_ms = (timeline.last_token_at - timeline.first_token_at) * 1e3
            if output.num_output_tokens > 1:
                t.time_per_output_token_ms = t.decode_ms / (output.num_output_tokens - 1)
        t.total_ms = timeline.total_ms(now)


def echo_fields(
    message: llm_service_pb2.GenerateStreamResponse, prompt_text: str, prompt_token_ids: Sequence[int]
) -> None:
    message.prompt_text = prompt_text
    message.prompt_token_ids.extend(prompt_token_ids)


def merge_stream(
    responses: Sequence[llm_service_pb2.GenerateStreamResponse],
) -> llm_service_pb2.GenerateResponse:
    """Fold a complete stream (deltas, then the final message) into one GenerateResponse."""
    merged = llm_service_pb2.GenerateResponse()
    texts = []
    for response in responses:
        texts.append(response.text)
        merged.token_ids.extend(response.token_ids)
        merged.log_probs.extend(response.log_probs)
        if response.prompt_text or response.prompt_token_ids:
            merged.prompt_text = response.prompt_text
            merged.prompt_token_ids.extend(response.prompt_token_ids)
        merged.prompt_log_probs.extend(response.prompt_log_probs)
    merged.text = "".join(texts)
    if responses:
        last = responses[-1]
        merged.request_id = last.request_id
        merged.finish_reason = last.finish_reason
        merged.stop_string = last.stop_string
        if last.HasField("stop_token_id"):
            merged.stop_token_id = last.stop_token_id
        merged.usage.CopyFrom(last.usage)
        merged.timings.CopyFrom(last.timings)
    return merged


def tokenize_response(
    rendered_prompt: str,
    token_ids: Sequence[int],
    placeholders: dict[int, str],
    token_strings: Sequence[str] | None,
) -> llm_service_pb2.TokenizeResponse:
    response = llm_service_pb2.TokenizeResponse(rendered_prompt=rendered_prompt, token_ids=token_ids)
    media = [placeholders[t] for t in token_ids if t in placeholders]
    response.num_image_placeholders = media.count("image")
    response.num_video_placeholders = media.count("video")
    if token_strings is not None:
        response.token_strings.extend(token_strings)
    return response


# --- model info -------------------------------------------------------------------------------------


def sampling_to_proto(params: SamplingParams) -> llm_service_pb2.SamplingParams:
    message = llm_service_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


@dataclass(frozen=True)
class ServiceLimits:
    max_multimodal_inputs: int
    max_num_seqs: int
    max_queue_size: int
    max_embedding_cache_bytes: int
    max_message_bytes: int


def model_info_response(
    model: ModelDescription,
    *,
    defaults: SamplingParams,
    limits: ServiceLimits,
    supports_media_inputs: bool,
    accepts_shared_memory: bool = False,
) -> llm_service_pb2.LlmServiceGetModelInfoResponse:
    response = llm_service_pb2.LlmServiceGetModelInfoResponse(
        model_family=FAMILY_ENUMS.get(model.family, common_pb2.MODEL_FAMILY_UNSPECIFIED),
        model_id=model.model_id,
        model_fingerprint=model.fingerprint,
        max_model_len=model.max_model_len,
        vocab_size=model.vocab_size,
        eos_token_ids=model.eos_token_ids,
        image_placeholder=model.image_placeholder,
        video_placeholder=model.video_placeholder,
        supports_chat_template=model.supports_chat_template,
        embedding_kind=_KIND_ENUMS[model.embedding_kind],
        hidden_size=model.hidden_size,
        model_dtype=data_type_for_name(model.dtype),
        kv_cache_dtype=model.kv_cache_dtype,
        supports_media_inputs=supports_media_inputs,
        accepts_shared_memory=accepts_shared_memory,
        default_sampling=sampling_to_proto(defaults),
        limits=llm_service_pb2.LlmLimits(
            max_multimodal_inputs_per_request=limits.max_multimodal_inputs,
            max_stop_strings=MAX_STOP_STRINGS,
            max_stop_token_ids=0,
            max_top_log_probs=MAX_TOP_LOGPROBS,
            max_num_seqs=limits.max_num_seqs,
            max_queue_size=limits.max_queue_size,
            max_embedding_cache_bytes=limits.max_embedding_cache_bytes,
            max_receive_message_bytes=limits.max_message_bytes,
            max_send_message_bytes=limits.max_message_bytes,
        ),
    )
    for name in ("bos_token_id", "pad_token_id", "image_token_id", "video_token_id"):
        value = getattr(model, name)
        if value is not None:
            setattr(response, name, value)
    return response
