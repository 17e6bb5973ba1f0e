"""One generation request as the scheduler sees it: tokens, progress, status and image placement.

Pure Python: no torch, grpc or protobuf. The engine builds a `Request` after tokenization (image
placeholders already expanded into `MultimodalSpan`s) and hands it to the scheduler, which owns its
mutable fields (`num_computed_tokens`, `status`, ...) from then on.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from llm_service.engine.sampling_params import SamplingParams
from vlm_protocol.errors import InvalidArgumentError


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed from position 0
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence token (checkpoint EOS or `end_id`)
    STOP_TOKEN = "stop_token"  # one of `sampling_params.stop_token_ids`
    STOP_STRING = "stop_string"  # found by the detokenizer; reported via `Scheduler.finish_request`
    LENGTH = "length"  # `max_tokens` reached
    ABORT = "abort"  # cancelled by the client, a deadline or the engine

    @property
    def status(self) -> RequestStatus:
        if self is FinishReason.LENGTH:
            return RequestStatus.FINISHED_LENGTH
        if self is FinishReason.ABORT:
            return RequestStatus.FINISHED_ABORTED
        return RequestStatus.FINISHED_STOPPED


@dataclass(frozen=True)
class MultimodalSpan:
    """Prompt positions `[offset, offset + length)` whose embeddings are rows `0..length-1` of the
    prompt table of image (or video) `content_id`, instead of the token embedding table."""

    content_id: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlap(self, start: int, end: int) -> tuple[int, int] | None:
        """Rows of this span's prompt table that land in positions `[start, end)`, or None.

        Row `r` sits at position `offset + r`, so the runner injects rows `[lo, hi)` at positions
        `[offset + lo, offset + hi)`.
        """
        lo, hi = max(start, self.offset), min(end, self.end)
        if lo >= hi:
            return None
        return lo - self.offset, hi - self.offset


@dataclass(eq=False)
class Request:
    """A request's tokens and progress. Identity equality: two requests are never "the same".

    Invariants the scheduler keeps: `0 <= num_computed_tokens <= num_tokens`; a request holds KV
    blocks only while RUNNING; output tokens survive preemption and are recomputed as part of
    `all_token_ids`.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    # The checkpoint's end-of-sequence ids; `sampling_params.end_id` replaces them when set.
    eos_token_ids: tuple[int, ...] = ()
    mm_spans: tuple[MultimodalSpan, ...] = ()
    # Content ids that change the KV of EVERY token (mllama cross-attention images): mixed into
    # every block hash so two requests with different images never share any block.
    cache_salt_keys: tuple[str, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list, init=False)
    # Tokens whose KV is written in the cache (prefix hits included).
    num_computed_tokens: int = field(default=0, init=False)
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    # Prompt tokens served from the prefix cache at first admission (reported as usage).
    num_cached_prompt_tokens: int = field(default=0, init=False)
    num_preemptions: int = field(default=0, init=False)
    # Chained hashes of this request's full blocks, filled lazily by the KV cache manager (one
    # manager, one block size per engine). Kept across preemption: full blocks never change.
    block_hashes: list[bytes] = field(default_factory=list, init=False, repr=False)
    _all_token_ids: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        self.eos_token_ids = tuple(self.eos_token_ids)
        self.mm_spans = tuple(self.mm_spans)
        self.cache_salt_keys = tuple(self.cache_salt_keys)
        if not self.request_id:
            raise InvalidArgumentError("request_id must not be empty")
        if not self.prompt_token_ids:
            raise InvalidArgumentError("prompt is empty: send at least one token or some text")
        if min(self.prompt_token_ids) < 0:
            raise InvalidArgumentError("prompt token ids must be non-negative")
        previous_end = 0
        for span in self.mm_spans:
            if not span.content_id or span.length < 1:
                raise InvalidArgumentError(f"multimodal span {span} needs a content id and length >= 1")
            if span.offset < previous_end or span.end > len(self.prompt_token_ids):
                raise InvalidArgumentError(
                    f"multimodal span {span} overlaps another span or runs past the prompt "
                    f"({len(self.prompt_token_ids)} tokens); spans must be sorted and disjoint"
                )
            previous_end = span.end
        if any(not key for key in self.cache_salt_keys):
            raise InvalidArgumentError("cache_salt_keys must not contain empty content ids")
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + outputs. The last one's KV is computed by the next step."""
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs (what a recompute after preemption feeds). Do not mutate."""
        return self._all_token_ids

    @property
    def stop_eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids in force: `end_id` if the caller set one, else the checkpoint's."""
        end_id = self.sampling_params.end_id
        return (end_id,) if end_id is not None else self.eos_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        assert not self.is_finished, f"{self.request_id}: token appended after finish"
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def mark_finished(self, reason: FinishReason) -> None:
        self.status = reason.status
        self.finish_reason = reason
