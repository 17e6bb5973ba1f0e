"""The contract between scheduler, model runner and engine: small dataclasses of plain Python values.

One step is `schedule() -> SchedulerOutput`, `runner.execute(SchedulerOutput) -> ModelRunnerOutput`,
`update_from_output(...) -> list[RequestOutputUpdate]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_service.engine.request import FinishReason, MultimodalSpan
from llm_service.engine.sampling_params import SamplingParams

# Token id of a continuation decode chunk (`Scheduler.schedule_continuation`): the real id is being
# sampled by the step before and is read on the device.
CONTINUATION_TOKEN = -1


@dataclass(frozen=True)
class ScheduledChunk:
    """Positions `[start_position, start_position + num_tokens)` of one request to run this step.

    The runner writes their KV into `block_table` (position `p` lives in block
    `block_table[p // block_size]`, slot `p % block_size`), attends over positions
    `[0, start_position + num_tokens)`, and samples one token iff `needs_sampling`.
    """

    request_id: str
    start_position: int
    num_tokens: int
    token_ids: list[int]  # the chunk's tokens (prompt and/or earlier outputs)
    block_table: list[int]
    # Spans overlapping the chunk; `span.overlap(start, end)` gives the prompt-table rows to inject.
    mm_spans: tuple[MultimodalSpan, ...]
    # The chunk reaches the end of the known tokens: sample the next one from its last logits.
    needs_sampling: bool
    sampling_params: SamplingParams
    # Content ids feeding every position through cross-attention (mllama); empty otherwise.
    cache_salt_keys: tuple[str, ...] = ()
    # True for the first chunk since the request was (re)admitted: drop any per-request state
    # (e.g. token history for penalties) kept from before a preemption.
    is_first_chunk: bool = False
    # Only on a first chunk: tokens before `start_position` (served from the prefix cache), so the
    # runner knows the full history without having computed it.
    prefix_token_ids: list[int] = field(default_factory=list)

    @property
    def end_position(self) -> int:
        return self.start_position + self.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    num_scheduled_tokens: int  # sum of chunk lengths, <= max_num_batched_tokens
    # Requests that lost their KV this step; they come back later with a first chunk.
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the previous step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class ModelRunnerOutput:
    """One sampled token per chunk that `needs_sampling`, keyed by request id (plain ints)."""

    sampled_token_ids: dict[str, int]
    # Log-prob payload per request, passed through to the engine untouched.
    logprobs: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestOutputUpdate:
    """What one step produced for one request: at most one new token, and maybe a finish."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: object | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
