"""Token-budget scheduler: which request positions run in the next model step.

There are no prefill and decode phases. Each request has `num_computed_tokens`; each step spends a
budget of `max_num_batched_tokens` on running requests first (a decode is 1 token, an unfinished
prompt continues with its next chunk), then admits waiting requests in arrival order while budget,
KV blocks and `max_num_seqs` allow. Chunked prefill therefore needs no special case. When a running
request cannot get a block, the most recently admitted running request is preempted by recompute.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from llm_service.engine.kv_cache_manager import KVCacheManager
from llm_service.engine.outputs import (
    CONTINUATION_TOKEN,
    ModelRunnerOutput,
    RequestOutputUpdate,
    ScheduledChunk,
    SchedulerOutput,
)
from llm_service.engine.request import FinishReason, Request, RequestStatus
from vlm_protocol.errors import InvalidArgumentError, ResourceExhaustedError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling limits, built once from CLI flags. Raises ValueError when inconsistent."""

    max_num_seqs: int = 64  # running requests per step
    max_num_batched_tokens: int = 2048  # token budget per step
    max_model_len: int = 4096  # prompt + max_tokens limit per request
    max_waiting_requests: int = 1024  # bounded queue: RESOURCE_EXHAUSTED beyond it
    # Longest prefill chunk of one request per step, so one long prompt cannot hold the whole
    # budget and stall other requests' decodes. None: up to the budget.
    max_prefill_chunk_tokens: int | None = None
    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "max_waiting_requests",
            "block_size",
            "num_blocks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"scheduler {name} must be >= 1, got {getattr(self, name)}")
        if self.max_prefill_chunk_tokens is not None and self.max_prefill_chunk_tokens < 1:
            raise ValueError(
                f"max_prefill_chunk_tokens must be >= 1 or None, got {self.max_prefill_chunk_tokens}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise some running requests could not even decode one token per step.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}); raise the budget or lower max_num_seqs"
            )


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    prefix_queries: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int


class Scheduler:
    """Owns the waiting queue, the running list and the KV cache manager. Not thread-safe: the
    engine thread calls every method (aborts from the gRPC side are forwarded to that thread)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is preempted first
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # since the previous schedule(), for the runner

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def stats(self) -> SchedulerStats:
        kv = self.kv_cache
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_used_blocks=kv.num_used_blocks,
            num_free_blocks=kv.num_free_blocks,
            num_cached_blocks=kv.num_cached_blocks,
            prefix_queries=kv.prefix_queries,
            prefix_query_tokens=kv.prefix_query_tokens,
            prefix_hit_tokens=kv.prefix_hit_tokens,
            num_preemptions=self.num_preemptions,
        )

    # ---- admission -----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request.

        Raises InvalidArgumentError if it could never run (too long for `max_model_len` or for the
        whole KV pool), ResourceExhaustedError if the waiting queue is full (retry later).
        """
        assert request.status is RequestStatus.WAITING and request.num_computed_tokens == 0
        cfg = self.config
        num_prompt = request.num_prompt_tokens
        max_tokens = request.sampling_params.max_tokens
        if request.request_id in self.requests:
            raise InvalidArgumentError(f"request id {request.request_id!r} is already in use")
        if num_prompt + max_tokens > cfg.max_model_len:
            if num_prompt >= cfg.max_model_len:
                raise InvalidArgumentError(
                    f"prompt is {num_prompt} tokens but the model accepts at most {cfg.max_model_len} "
                    f"(prompt + max_tokens); shorten the prompt or send fewer images"
                )
            raise InvalidArgumentError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {num_prompt + max_tokens} "
                f"exceeds the model's limit of {cfg.max_model_len} tokens; "
                f"set max_tokens <= {cfg.max_model_len - num_prompt} or shorten the prompt"
            )
        # The last sampled token is never fed back, so its KV slot is never needed.
        max_kv_tokens = num_prompt + max_tokens - 1
        pool_tokens = cfg.num_blocks * cfg.block_size
        if self.kv_cache.num_blocks_for_tokens(max_kv_tokens) > cfg.num_blocks:
            raise InvalidArgumentError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) needs more KV cache than "
                f"this server has in total ({pool_tokens} tokens); "
                f"set max_tokens <= {max(pool_tokens - num_prompt + 1, 0)} or shorten the prompt"
            )
        if len(self.waiting) >= cfg.max_waiting_requests:
            raise ResourceExhaustedError(
                f"server busy: {len(self.waiting)} requests already waiting (limit "
                f"{cfg.max_waiting_requests}); retry later"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks. Must be followed by `update_from_output` with the runner's result."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, budget)
            while not self.kv_cache.allocate_slots(request, num_new):
                # Victims come from the tail, i.e. after `index`: none of them is scheduled yet.
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._make_chunk(request, num_new, is_first=False))
                budget -= num_new
                index += 1

        # No admissions in a step that had to preempt: the pool is known to be short, and a new
        # request would only be preempted in turn (vLLM does the same).
        while not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            request.num_computed_tokens = self.kv_cache.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, budget)
            if not self.kv_cache.allocate_slots(request, num_new):
                self.kv_cache.free(request)  # give back the prefix hit; retry next step (FCFS)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if request.status is RequestStatus.WAITING:  # first admission, not a restart
                request.num_cached_prompt_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._make_chunk(request, num_new, is_first=True))
            budget -= num_new

        finished, self._finished_ids = self._finished_ids, []
        num_scheduled = cfg.max_num_batched_tokens - budget
        assert len(self.running) <= cfg.max_num_seqs
        return SchedulerOutput(chunks, num_scheduled, preempted, finished)

    def schedule_continuation(self, previous: SchedulerOutput) -> SchedulerOutput | None:
        """The decode step after `previous`, scheduled before `previous` has run: each request of
        `previous` (all of them decode rows) adds the token `previous` is sampling for it, whose value
        the runner takes on the device. None where that cannot be done exactly, and the engine then
        waits for `previous` and schedules normally: new requests are waiting (admission and
        preemption need settled state), a row's sampling depends on its output history (penalties,
        a seed, min_tokens not yet reached), or blocks run out.

        Rows whose `previous` token is their last (max_tokens) are left out. A row that turns out to
        stop at `previous` (EOS, stop id or string) or is aborted meanwhile computes one token that
        `update_from_output` drops (the request is gone by then); the slot it writes is past the
        request's computed tokens, in a block that is not cached.
        """
        if self.waiting or not previous.chunks:
            return None
        chunks = []
        for prev in previous.chunks:
            request = self.requests.get(prev.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or finished since
            params = request.sampling_params
            if prev.num_tokens != 1 or not prev.needs_sampling or prev.mm_spans:
                return None
            if (
                params.repetition_penalty != 1.0
                or params.frequency_penalty != 0.0
                or params.presence_penalty != 0.0
                or (params.seed is not None and params.temperature > 0)
                or request.num_output_tokens < params.min_tokens
            ):
                return None
            if request.num_output_tokens + 1 >= params.max_tokens:
                continue  # `previous` samples its last token
            position = prev.end_position  # where the token sampled by `previous` goes
            if not self.kv_cache.reserve_position(request, position):
                return None  # blocks reserved so far stay with their requests; they need them next
            chunks.append(
                ScheduledChunk(
                    request_id=request.request_id,
                    start_position=position,
                    num_tokens=1,
                    token_ids=[CONTINUATION_TOKEN],
                    block_table=self.kv_cache.get_block_table(request.request_id),
                    mm_spans=(),
                    needs_sampling=True,
                    sampling_params=params,
                    cache_salt_keys=request.cache_salt_keys,
                )
            )
        if not chunks:
            return None
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(chunks, len(chunks), [], finished)

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        if self.config.max_prefill_chunk_tokens is not None:
            num_new = min(num_new, self.config.max_prefill_chunk_tokens)
        assert num_new > 0, f"{request.request_id} has nothing to compute"
        return num_new

    def _make_chunk(self, request: Request, num_new: int, *, is_first: bool) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        tokens = request.all_token_ids
        return ScheduledChunk(
            request_id=request.request_id,
            start_position=start,
            num_tokens=num_new,
            token_ids=tokens[start:end],
            block_table=self.kv_cache.get_block_table(request.request_id),
            mm_spans=tuple(s for s in request.mm_spans if s.overlap(start, end)),
            needs_sampling=end == request.num_tokens,
            sampling_params=request.sampling_params,
            cache_salt_keys=request.cache_salt_keys,
            is_first_chunk=is_first,
            prefix_token_ids=tokens[:start] if is_first else [],
        )

    def _preempt(self, request: Request) -> None:
        """Free all of a running request's KV; it restarts from position 0 (outputs kept)."""
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Front of the queue: it was admitted before anything still waiting. Preempted requests
        # may push the queue past max_waiting_requests; that bound only applies to new arrivals.
        self.waiting.appendleft(request)
        logger.debug("preempted %s (%d tokens to recompute)", request.request_id, request.num_tokens)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestOutputUpdate]:
        """Advance progress, append sampled tokens, apply stop rules and free finished requests.

        Chunks of requests aborted since `schedule()` are skipped.
        """
        updates: list[RequestOutputUpdate] = []
        for chunk in scheduler_output.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            assert request.num_computed_tokens == chunk.start_position, "schedule/update out of step"
            request.num_computed_tokens = chunk.end_position
            self.kv_cache.cache_computed_blocks(request)
            if not chunk.needs_sampling:
                continue  # a prefill chunk short of the prompt's end: its logits are not used
            token_id = runner_output.sampled_token_ids[request.request_id]
            request.append_output_token(token_id)
            reason = self._check_stop(request, token_id)
            if reason is not None:
                self._finish(request, reason)
            updates.append(
                RequestOutputUpdate(
                    request.request_id, [token_id], reason, runner_output.logprobs.get(request.request_id)
                )
            )
        return updates

    @staticmethod
    def _check_stop(request: Request, token_id: int) -> FinishReason | None:
        params = request.sampling_params
        # min_tokens holds back every stop token, not just EOS (the sampler also masks them).
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.stop_eos_token_ids:
                return FinishReason.STOP
            if token_id in params.stop_token_ids:
                return FinishReason.STOP_TOKEN
        if request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    # ---- ending requests ---------------------------------------------------------------------

    def finish_request(self, request_id: str, reason: FinishReason) -> bool:
        """End a request in any state (e.g. a stop string found by the detokenizer) and free its
        blocks now. Returns False if the id is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, reason)
        return True

    def abort(self, request_id: str) -> bool:
        """Cancel a request in any state, freeing its blocks immediately. Idempotent."""
        return self.finish_request(request_id, FinishReason.ABORT)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.mark_finished(reason)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
