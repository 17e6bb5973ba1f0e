"""The SDK's only protobuf <-> Python conversions: keyword arguments -> requests, responses -> dataclasses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vlm.v1 import common_pb2, llm_service_pb2

from client_sdk.errors import InvalidArgumentError
from client_sdk.types import GenerateResult, PositionLogProbs, StreamDelta, Timings, TokenLogProb, Usage
from vlm_protocol.media_ids import PreprocessingIdentity

# Keyword -> (message, expected Python type). Names are the proto's field names; `stop` is an alias
# of `stop_strings` that also takes a single string.
_SAMPLING_FIELDS: dict[str, type] = {
    "max_tokens": int,
    "min_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "seed": int,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "stop_strings": list,
    "stop_token_ids": list,
    "end_id": int,
    "pad_id": int,
    "ignore_eos": bool,
    "include_stop_str_in_output": bool,
}
_OUTPUT_FIELDS: dict[str, type] = {
    "log_probs": bool,
    "top_log_probs": int,
    "prompt_log_probs": bool,
    "echo_prompt": bool,
    "skip_special_tokens": bool,
}
SAMPLING_KEYWORDS: tuple[str, ...] = (*_SAMPLING_FIELDS, "stop", *_OUTPUT_FIELDS)

_FINISH_REASONS = {
    llm_service_pb2.FINISH_REASON_LENGTH: "length",
    llm_service_pb2.FINISH_REASON_STOP: "stop",
    llm_service_pb2.FINISH_REASON_STOP_STRING: "stop_string",
    llm_service_pb2.FINISH_REASON_STOP_TOKEN: "stop_token",
    llm_service_pb2.FINISH_REASON_ABORTED: "aborted",
}
_PROMPT_FORMATS = {
    None: llm_service_pb2.PROMPT_FORMAT_UNSPECIFIED,
    "": llm_service_pb2.PROMPT_FORMAT_UNSPECIFIED,
    "raw": llm_service_pb2.PROMPT_FORMAT_UNSPECIFIED,
    "triton": llm_service_pb2.PROMPT_FORMAT_TRITON_ENSEMBLE,
    "triton_ensemble": llm_service_pb2.PROMPT_FORMAT_TRITON_ENSEMBLE,
}
PROMPT_FORMATS = tuple(name for name in _PROMPT_FORMATS if name)

# The source of one MultimodalInput: a content id, an embedding sent whole, or raw media (one-call mode).
LlmInput = str | common_pb2.Embedding | common_pb2.MediaItem


def _check_type(name: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected is bool and isinstance(value, bool):
        return value
    raise InvalidArgumentError(f"{name} must be {expected.__name__}, got {type(value).__name__} {value!r}")


def _string_list(name: str, value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) and v for v in values):
        raise InvalidArgumentError(f"{name} must be a string or a list of non-empty strings, got {value!r}")
    return values


def _int_list(name: str, value: Any) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    for v in values:
        _check_type(name, v, int)
    return values


def build_sampling(
    options: Mapping[str, Any],
) -> tuple[llm_service_pb2.SamplingParams, llm_service_pb2.OutputOptions]:
    """SamplingParams + OutputOptions from keyword arguments named after the proto fields.

    ``None`` values are treated as not given (server defaults). Unknown keywords raise ``TypeError``
    naming the valid ones; wrong types raise ``InvalidArgumentError``. Ranges are the server's call.
    """
    unknown = sorted(set(options) - set(SAMPLING_KEYWORDS))
    if unknown:
        raise TypeError(
            f"unknown generation keyword(s) {', '.join(unknown)}; valid ones: {', '.join(SAMPLING_KEYWORDS)}"
        )
    given = {k: v for k, v in options.items() if v is not None}
    if "stop" in given:
        if "stop_strings" in given:
            raise TypeError("pass either stop or stop_strings, not both")
        given["stop_strings"] = given.pop("stop")
    sampling = llm_service_pb2.SamplingParams()
    output = llm_service_pb2.OutputOptions()
    for name, value in given.items():
        if name == "stop_strings":
            sampling.stop_strings.extend(_string_list(name, value))
        elif name == "stop_token_ids":
            sampling.stop_token_ids.extend(_int_list(name, value))
        elif name in _SAMPLING_FIELDS:
            setattr(sampling, name, _check_type(name, value, _SAMPLING_FIELDS[name]))
        else:
            setattr(output, name, _check_type(name, value, _OUTPUT_FIELDS[name]))
    return sampling, output


def prompt_format_value(prompt_format: str | None) -> int:
    key = prompt_format.lower() if isinstance(prompt_format, str) else prompt_format
    if key not in _PROMPT_FORMATS:
        raise InvalidArgumentError(
            f"prompt_format must be one of {PROMPT_FORMATS} or None, got {prompt_format!r}"
        )
    return _PROMPT_FORMATS[key]


def _content_part(part: Any) -> llm_service_pb2.ContentPart:
    if isinstance(part, str):
        return llm_service_pb2.ContentPart(text=part)
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            return llm_service_pb2.ContentPart(text=part["text"])
        if kind == "image":
            return llm_service_pb2.ContentPart(image=llm_service_pb2.MediaRef())
        if kind == "video":
            return llm_service_pb2.ContentPart(video=llm_service_pb2.MediaRef())
    raise InvalidArgumentError(
        f"chat content parts are strings or {{'type': 'text', 'text': ...}} / {{'type': 'image'}} / "
        f"{{'type': 'video'}}; got {part!r}"
    )


def chat_prompt(messages: Sequence[Mapping[str, Any]]) -> llm_service_pb2.ChatPrompt:
    """ChatPrompt from ``[{"role": "user", "content": "text" | [part, ...]}, ...]`` (HF/OpenAI style)."""
    chat = llm_service_pb2.ChatPrompt()
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidArgumentError(
                f"chat messages are {{'role': str, 'content': ...}} mappings, got {message!r}"
            )
        content = message.get("content", "")
        parts = [content] if isinstance(content, (str, Mapping)) else list(content)
        chat.messages.add(role=message["role"], content=[_content_part(p) for p in parts])
    if not chat.messages:
        raise InvalidArgumentError("a chat prompt needs at least one message")
    return chat


def add_multimodal_input(request: Any, source: LlmInput) -> None:
    """Append one MultimodalInput to a Generate(Stream)Request.

    Embeddings are copied straight into the request: the one copy of their tensor bytes before
    serialization (building a MultimodalInput first and passing it to the request would copy twice).
    """
    entry = request.multimodal_inputs.add()
    if isinstance(source, str):
        entry.content_id = source
    elif isinstance(source, common_pb2.Embedding):
        entry.embedding.CopyFrom(source)
    elif isinstance(source, common_pb2.MediaItem):
        entry.media.CopyFrom(source)
    else:
        raise TypeError(f"a multimodal input is a content id, an Embedding or a MediaItem, got {source!r}")


def build_generate_request(
    request_cls: type,
    prompt: str | Sequence[Mapping[str, Any]],
    inputs: Iterable[LlmInput],
    sampling: llm_service_pb2.SamplingParams,
    output: llm_service_pb2.OutputOptions,
    *,
    request_id: str,
    prompt_format: int,
    add_special_tokens: bool | None,
) -> Any:
    """A GenerateRequest or GenerateStreamRequest (same fields) for one attempt."""
    request = request_cls(request_id=request_id, prompt_format=prompt_format)
    for source in inputs:
        add_multimodal_input(request, source)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.chat.CopyFrom(chat_prompt(prompt))
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    if sampling.ByteSize():
        request.sampling.CopyFrom(sampling)
    if output.ByteSize():
        request.output_options.CopyFrom(output)
    return request


def family_name(model_family: int) -> str:
    """``MODEL_FAMILY_LLAVA_ONEVISION`` -> ``"llava_onevision"`` (the family string in content ids)."""
    name = (
        common_pb2.ModelFamily.Name(model_family) if model_family in common_pb2.ModelFamily.values() else ""
    )
    return name.removeprefix("MODEL_FAMILY_").lower() or "unspecified"


def preprocessing_identity(info: Any) -> PreprocessingIdentity:
    """From an EncoderServiceGetModelInfoResponse."""
    return PreprocessingIdentity(
        family_name(info.model_family), info.model_fingerprint, info.processor_config_hash
    )


def _token(message: llm_service_pb2.TokenLogProb) -> TokenLogProb:
    return TokenLogProb(message.token_id, message.token, message.log_prob)


def log_probs(messages: Iterable[llm_service_pb2.PositionLogProbs]) -> tuple[PositionLogProbs, ...]:
    return tuple(
        PositionLogProbs(m.position, _token(m.token), tuple(_token(t) for t in m.top_alternatives))
        for m in messages
    )


def usage(message: llm_service_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        cached_prompt_tokens=message.cached_prompt_tokens,
        multimodal_prompt_tokens=message.multimodal_prompt_tokens,
    )


def timings(
    message: llm_service_pb2.GenerateTimings,
    *,
    encode_ms: float,
    time_to_first_token_ms: float,
    total_ms: float,
) -> Timings:
    return Timings(
        encode_ms=encode_ms,
        time_to_first_token_ms=time_to_first_token_ms,
        total_ms=total_ms,
        queue_ms=message.queue_ms,
        prefill_ms=message.prefill_ms,
        decode_ms=message.decode_ms,
        time_per_output_token_ms=message.time_per_output_token_ms,
        server_time_to_first_token_ms=message.time_to_first_token_ms,
        server_total_ms=message.total_ms,
        server_tokenize_ms=message.tokenize_ms,
        server_inputs_ms=message.inputs_ms,
    )


def finish_reason(value: int) -> str | None:
    return _FINISH_REASONS.get(value) if value else None


def result(response: llm_service_pb2.GenerateResponse, *, timing: Timings, **extras: Any) -> GenerateResult:
    """GenerateResult from a unary response; ``extras`` are the SDK's counters (cache hits, ...)."""
    return GenerateResult(
        text=response.text,
        token_ids=tuple(response.token_ids),
        finish_reason=finish_reason(response.finish_reason) or "unknown",
        usage=usage(response.usage),
        timings=timing,
        log_probs=log_probs(response.log_probs),
        stop_string=response.stop_string,
        stop_token_id=response.stop_token_id if response.HasField("stop_token_id") else None,
        request_id=response.request_id,
        prompt_text=response.prompt_text,
        prompt_token_ids=tuple(response.prompt_token_ids),
        prompt_log_probs=log_probs(response.prompt_log_probs),
        **extras,
    )


def delta(
    message: llm_service_pb2.GenerateStreamResponse, *, timing: Timings | None, **extras: Any
) -> StreamDelta:
    """StreamDelta from one stream message; pass ``timing`` and ``extras`` for the final one."""
    reason = finish_reason(message.finish_reason)
    last = reason is not None
    return StreamDelta(
        text=message.text,
        token_ids=tuple(message.token_ids),
        log_probs=log_probs(message.log_probs),
        finish_reason=reason,
        usage=usage(message.usage) if last else None,
        timings=timing if last else None,
        stop_string=message.stop_string,
        stop_token_id=message.stop_token_id if message.HasField("stop_token_id") else None,
        request_id=message.request_id,
        prompt_text=message.prompt_text,
        prompt_token_ids=tuple(message.prompt_token_ids),
        prompt_log_probs=log_probs(message.prompt_log_probs),
        **(extras if last else {}),
    )
