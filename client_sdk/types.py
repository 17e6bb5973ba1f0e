"""Result types returned by the SDK: plain frozen dataclasses, no protobuf, no numpy.

Client-side timings (``encode_ms``, ``time_to_first_token_ms``, ``total_ms``) are measured by the SDK
from the moment ``generate`` was called, so they include network time and the encoder round trips;
the ``server_*`` fields are what the LLM service reported for its own part.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

FINISH_REASONS = ("length", "stop", "stop_string", "stop_token", "aborted")


@dataclass(frozen=True)
class TokenLogProb:
    """Log probability of one token (natural log, from the raw logits)."""

    token_id: int
    token: str
    log_prob: float


@dataclass(frozen=True)
class PositionLogProbs:
    """Log probabilities at one sequence position: the chosen token and the most likely alternatives."""

    position: int
    token: TokenLogProb
    top_alternatives: tuple[TokenLogProb, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one request. ``cached_prompt_tokens`` came from the KV prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    multimodal_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Where the time of one ``generate`` call went, in milliseconds.

    Client side: ``encode_ms`` (content ids, encoder look-up and encoding, before the LLM call; 0
    for text-only requests; with ``encoder_skipped`` only the local content-id hashing; a fallback
    after NOT_FOUND counts in ``time_to_first_token_ms``),
    ``time_to_first_token_ms`` (streaming: until the first token arrived; unary: until the LLM call
    was sent plus the server's time to first token) and ``total_ms``. Server side (LLM service):
    ``queue_ms``, ``prefill_ms``, ``decode_ms``, ``time_per_output_token_ms``,
    ``server_time_to_first_token_ms``, ``server_total_ms``, and two parts of the server's time before
    queueing: ``server_tokenize_ms`` (template and tokenizer) and ``server_inputs_ms`` (checking and
    decoding the multimodal inputs: embeddings sent whole, shared-memory reads, content-id look-ups).
    """

    encode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    time_per_output_token_ms: float = 0.0
    server_time_to_first_token_ms: float = 0.0
    server_total_ms: float = 0.0
    server_tokenize_ms: float = 0.0
    server_inputs_ms: float = 0.0


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation.

    ``encoder_cache_hits``: distinct media the encoder already held when it was asked (found by
    look-up or fetch, or reported cached by ``Encode``); media it was not asked about do not count.
    ``encoder_skipped``: the LLM-first shortcut sent ids straight to the LLM service, which held every
    one of them, so the encoder was not called at all and ``encoder_cache_hits`` is 0 (the client had
    seen the LLM service accept these ids before; see ``Client(held_ids_capacity=)``). When the LLM
    service answered NOT_FOUND to the shortcut, the call fell back to the encoder for the ids it
    lacked (fetched from its cache: counted as hits; or encoded again), ``encoder_skipped`` is False.
    ``tensors_uploaded``: embeddings sent whole to the LLM service, because the encoder had just
    computed them or the LLM service did not hold their content ids (0 when every id was known).
    ``content_ids`` lists the media's ids in order.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    log_probs: tuple[PositionLogProbs, ...] = ()
    stop_string: str = ""
    stop_token_id: int | None = None
    request_id: str = ""
    encoder_cache_hits: int = 0
    tensors_uploaded: int = 0
    content_ids: tuple[str, ...] = ()
    prompt_text: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    prompt_log_probs: tuple[PositionLogProbs, ...] = ()
    encoder_skipped: bool = False


@dataclass(frozen=True)
class StreamDelta:
    """One message of a streamed generation: the text and tokens produced since the previous one.

    Text can lag tokens (partial UTF-8, a possible stop string), so a delta may carry tokens and no
    text. Only the last delta has ``finish_reason`` set; it also carries ``usage``, ``timings``, the
    cache counters (as ``GenerateResult``'s) and the stop details. The prompt echo fields come with the
    first delta.
    """

    text: str
    token_ids: tuple[int, ...]
    log_probs: tuple[PositionLogProbs, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    stop_string: str = ""
    stop_token_id: int | None = None
    request_id: str = ""
    encoder_cache_hits: int = 0
    tensors_uploaded: int = 0
    content_ids: tuple[str, ...] = ()
    prompt_text: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    prompt_log_probs: tuple[PositionLogProbs, ...] = ()
    encoder_skipped: bool = False

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


def join_deltas(deltas: Iterable[StreamDelta]) -> GenerateResult:
    """Concatenate a finished stream into the ``GenerateResult`` a unary call would have returned.

    Raises ``ValueError`` when the stream has no final delta (it was cut short).
    """
    text: list[str] = []
    token_ids: list[int] = []
    log_probs: list[PositionLogProbs] = []
    first: StreamDelta | None = None
    last: StreamDelta | None = None
    for delta in deltas:
        first = first or delta
        text.append(delta.text)
        token_ids.extend(delta.token_ids)
        log_probs.extend(delta.log_probs)
        last = delta
    if first is None or last is None or last.finish_reason is None:
        raise ValueError("the stream ended without a final delta (finish_reason unset)")
    return GenerateResult(
        text="".join(text),
        token_ids=tuple(token_ids),
        finish_reason=last.finish_reason,
        usage=last.usage or Usage(),
        timings=last.timings or Timings(),
        log_probs=tuple(log_probs),
        stop_string=last.stop_string,
        stop_token_id=last.stop_token_id,
        request_id=last.request_id,
        encoder_cache_hits=last.encoder_cache_hits,
        tensors_uploaded=last.tensors_uploaded,
        content_ids=last.content_ids,
        encoder_skipped=last.encoder_skipped,
        prompt_text=first.prompt_text,
        prompt_token_ids=first.prompt_token_ids,
        prompt_log_probs=first.prompt_log_probs,
    )


__all__ = [
    "FINISH_REASONS",
    "GenerateResult",
    "PositionLogProbs",
    "StreamDelta",
    "Timings",
    "TokenLogProb",
    "Usage",
    "join_deltas",
]
