"""Per-row sampling over a batch of logits for the in-flight batching engine.

One call per engine step, one host sync (the final `.tolist()`):

    logits [B, V] -> float32 copy
      -> raw log probs (only if a row asks, `logprobs_mode="raw"`)
      -> min_tokens ban: EOS / end_id / stop_token_ids -> -inf until min_tokens are generated
      -> penalties: repetition (HF, prompt + output), frequency and presence (OpenAI, output only)
      -> processed log probs (only if a row asks, `logprobs_mode="processed"`)
      -> greedy rows: argmax
      -> random rows: temperature -> top-k -> top-p -> min-p (Hugging Face's order) -> exponential race
      -> token ids, the sampled token's log prob and the top-n alternatives, packed into one transfer

Conventions, chosen on purpose:
- Log probs follow vLLM v1's default (`raw`): the log-softmax of the model's own logits, before
  penalties, bans, temperature and truncation, so they describe the model and not the request's knobs.
  `logprobs_mode="processed"` gives the log-softmax after the min_tokens ban and penalties instead
  (still before temperature and truncation).
- `ignore_eos` means EOS never ends the request (the engine's stop check), not that EOS is banned; so
  min_tokens bans EOS only for rows without `ignore_eos`, and always bans `stop_token_ids`.
- A seeded row's random draw depends only on (seed, number of tokens generated so far): each step it
  gets a fresh generator seeded with a hash of both, so its tokens are the same whatever else is in the
  batch, at any row position, and after preemption by recompute. Unseeded rows share one generator.
- A temperature below 1e-5 is greedy: dividing by ~0 only amplifies rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from llm_service.engine.sampling_params import SamplingParams

LogprobsMode = Literal["raw", "processed"]

_GREEDY_TEMPERATURE = 1e-5
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingRow:
    """One request as the sampler sees it this step.

    `output_token_ids` are the tokens generated so far (their count is the step index used for seeded
    draws and min_tokens). `eos_token_ids` are the checkpoint's EOS ids; `params.end_id` replaces them.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SamplerOutput:
    """Plain Python results, one entry per row.

    `logprobs` and `top_logprobs` are None when no row asked for log probs; otherwise every row has a
    value (rows that did not ask get theirs anyway: it is free) and `top_logprobs[i]` holds that row's
    `top_logprobs` best (token_id, logprob) pairs, most likely first.
    """

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling metadata: per-row tensors on the logits' device, plus host-side flags that
    choose which stages run (so no stage has to look at device values to decide)."""

    num_rows: int
    vocab_size: int
    is_all_greedy: bool
    is_all_random: bool
    temperature: torch.Tensor  # [B] f32, raw values; < 1e-5 means greedy
    top_k: torch.Tensor | None  # [B] i64, 0 = off; None when no row uses it
    max_top_k: int
    top_p: torch.Tensor | None  # [B] f32, 1 = off
    min_p: torch.Tensor | None  # [B] f32, 0 = off
    repetition_penalty: torch.Tensor | None  # [B] f32, 1 = off
    frequency_penalty: torch.Tensor | None  # [B] f32, 0 = off
    presence_penalty: torch.Tensor | None  # [B] f32, 0 = off
    prompt_token_ids: torch.Tensor | None  # [B, Lp] i64, padded with vocab_size
    output_token_ids: torch.Tensor | None  # [B, Lo] i64, padded with vocab_size
    banned: torch.Tensor | None  # [N] i64: flat indices (row * V + token) forced to -inf
    seeded_rows: tuple[tuple[int, int], ...]  # (row, generator seed for this step)
    has_unseeded_random: bool  # whether the shared generator is needed
    num_top_logprobs: tuple[int, ...]  # per row
    needs_logprobs: bool

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], *, vocab_size: int, device: torch.device | str
    ) -> SamplingBatch:
        """Gather per-row settings into tensors. Host work is O(B), plus O(tokens) for rows that use
        repetition/frequency/presence penalties."""
        assert rows, "empty batch"
        device = torch.device(device)
        params = [row.params for row in rows]
        is_greedy = [p.temperature < _GREEDY_TEMPERATURE for p in params]
        # Truncation only matters on random rows; penalties and bans on every row.
        uses_top_k = [not g and 0 < p.top_k < vocab_size for p, g in zip(params, is_greedy, strict=True)]
        uses_top_p = [not g and p.top_p < 1.0 for p, g in zip(params, is_greedy, strict=True)]
        uses_min_p = [not g and p.min_p > 0.0 for p, g in zip(params, is_greedy, strict=True)]
        uses_rep = [p.repetition_penalty != 1.0 for p in params]
        uses_freq = [p.frequency_penalty != 0.0 for p in params]
        uses_pres = [p.presence_penalty != 0.0 for p in params]
        uses_output = [any(u) for u in zip(uses_rep, uses_freq, uses_pres, strict=True)]

        # One [7, B] transfer for every per-row scalar (top_k < 2**24 is exact in f32).
        scalars = torch.tensor(
            [
                [p.temperature for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.repetition_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.top_k if on else 0 for p, on in zip(params, uses_top_k, strict=True)],
            ],
            dtype=torch.float32,
        )
        scalars = to_device(scalars, device)  # [7, B]

        banned: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            if len(row.output_token_ids) >= p.min_tokens:
                continue
            eos = () if p.ignore_eos else ((p.end_id,) if p.end_id is not None else row.eos_token_ids)
            # Ids outside the vocab can't be sampled anyway.
            banned += [i * vocab_size + t for t in sorted({*eos, *p.stop_token_ids}) if t < vocab_size]

        seeded_rows = tuple(
            (i, _step_seed(row.params.seed, len(row.output_token_ids)))
            for i, (row, g) in enumerate(zip(rows, is_greedy, strict=True))
            if row.params.seed is not None and not g
        )
        prompt_ids = [r.prompt_token_ids if on else () for r, on in zip(rows, uses_rep, strict=True)]
        output_ids = [r.output_token_ids if on else () for r, on in zip(rows, uses_output, strict=True)]
        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            is_all_greedy=all(is_greedy),
            is_all_random=not any(is_greedy),
            temperature=scalars[0],
            top_k=scalars[6].long() if any(uses_top_k) else None,
            max_top_k=max((p.top_k for p, on in zip(params, uses_top_k, strict=True) if on), default=0),
            top_p=scalars[1] if any(uses_top_p) else None,
            min_p=scalars[2] if any(uses_min_p) else None,
            repetition_penalty=scalars[3] if any(uses_rep) else None,
            frequency_penalty=scalars[4] if any(uses_freq) else None,
            presence_penalty=scalars[5] if any(uses_pres) else None,
            prompt_token_ids=_padded(prompt_ids, vocab_size, device) if any(uses_rep) else None,
            output_token_ids=_padded(output_ids, vocab_size, device) if any(uses_output) else None,
            banned=to_device(torch.tensor(banned, dtype=torch.long), device) if banned else None,
            seeded_rows=seeded_rows,
            has_unseeded_random=len(seeded_rows) < is_greedy.count(False),
            num_top_logprobs=tuple(min(p.top_logprobs, vocab_size) for p in params),
            needs_logprobs=any(p.logprobs or p.top_logprobs > 0 for p in params),
        )


def sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    *,
    generator: torch.Generator | None = None,
    logprobs_mode: LogprobsMode = "raw",
) -> SamplerOutput:
    """Pick one token per row. `logits` [B, V] is not modified. `generator` drives unseeded rows
    (None: torch's default generator for the device)."""
    return launch_sample(logits, batch, generator=generator, logprobs_mode=logprobs_mode).result()


class PendingSample:
    """Sampling whose kernels are queued: `result()` waits for them and returns plain Python values.

    On CUDA the packed results are copied into pinned host memory without blocking, so the host can
    do other work (e.g. the previous step's detokenization) while the GPU finishes the step."""

    def __init__(
        self, token_ids: torch.Tensor, packed: torch.Tensor, batch: SamplingBatch, has_logprobs: bool, max_n: int
    ) -> None:
        self.token_ids = token_ids  # [B] int64 on the device: a following step may read it there
        self._batch, self._has_logprobs, self._max_n = batch, has_logprobs, max_n
        self._event = None
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()  # the one host sync of a step
        packed = self._host.tolist()
        if not self._has_logprobs:
            return SamplerOutput(token_ids=[int(r[0]) for r in packed])
        max_n = self._max_n
        return SamplerOutput(
            token_ids=[int(r[0]) for r in packed],
            logprobs=[r[1] for r in packed],
            top_logprobs=[
                [(int(r[2 + j]), r[2 + max_n + j]) for j in range(n)]
                for r, n in zip(packed, self._batch.num_top_logprobs, strict=True)
            ],
        )


def launch_sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    *,
    generator: torch.Generator | None = None,
    logprobs_mode: LogprobsMode = "raw",
) -> PendingSample:
    """`sample` without waiting: the kernels are queued and the result comes from `.result()`."""
    assert logits.dim() == 2 and logits.shape[0] == batch.num_rows, (tuple(logits.shape), batch.num_rows)
    assert logits.shape[1] == batch.vocab_size, (tuple(logits.shape), batch.vocab_size)
    logits = logits.to(torch.float32, copy=True)  # [B, V]; every stage below works in place on it
    logprobs = logits.log_softmax(-1) if batch.needs_logprobs and logprobs_mode == "raw" else None

    if batch.banned is not None:
        logits.view(-1).index_fill_(0, batch.banned, float("-inf"))
    apply_penalties(logits, batch)
    if batch.needs_logprobs and logprobs_mode == "processed":
        logprobs = logits.log_softmax(-1)  # [B, V]

    if batch.is_all_greedy:
        token_ids = logits.argmax(-1)  # [B]
    else:
        greedy = None if batch.is_all_random else logits.argmax(-1)  # [B]
        token_ids = _sample_random(logits, batch, generator)  # [B]
        if greedy is not None:
            token_ids = torch.where(batch.temperature < _GREEDY_TEMPERATURE, greedy, token_ids)

    columns = [token_ids.to(torch.float64)[:, None]]  # [B, 1]; ids < 2**53 are exact
    max_n = max(batch.num_top_logprobs)
    if logprobs is not None:
        columns.append(logprobs.gather(1, token_ids[:, None]).to(torch.float64))  # [B, 1]
        if max_n:
            top_values, top_ids = logprobs.topk(max_n, dim=-1)  # [B, n], most likely first
            columns += [top_ids.to(torch.float64), top_values.to(torch.float64)]
    packed = torch.cat(columns, dim=1)  # [B, 1 (+ 1 + 2n)]
    return PendingSample(token_ids, packed, batch, logprobs is not None, max_n)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place on `logits` [B, V]. Repetition (HF): over prompt and output tokens, divide positive
    logits and multiply negative ones. Frequency and presence (OpenAI): subtract `frequency * count`
    and `presence * (count > 0)` over output tokens."""
    if batch.output_token_ids is None:
        return
    output_counts = _token_counts(batch.output_token_ids, batch.vocab_size)  # [B, V] f32
    if batch.repetition_penalty is not None:
        is_seen = output_counts > 0  # [B, V]
        if batch.prompt_token_ids is not None:
            is_seen |= _token_counts(batch.prompt_token_ids, batch.vocab_size) > 0
        penalty = batch.repetition_penalty[:, None]  # [B, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
        logits.copy_(torch.where(is_seen, penalised, logits))
    if batch.frequency_penalty is not None:
        logits -= batch.frequency_penalty[:, None] * output_counts
    if batch.presence_penalty is not None:
        logits -= batch.presence_penalty[:, None] * (output_counts > 0)


def _sample_random(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
) -> torch.Tensor:
    """Temperature and truncation, then one draw per row. Greedy rows go through with temperature 1
    and are overwritten by the caller. Returns [B] i64."""
    is_greedy = batch.temperature < _GREEDY_TEMPERATURE  # [B]
    logits /= torch.where(is_greedy, 1.0, batch.temperature)[:, None]
    if batch.top_k is not None:
        _apply_top_k(logits, batch.top_k, batch.max_top_k)
    if batch.top_p is not None:
        _apply_top_p(logits, batch.top_p)
    probs = logits.softmax(-1)  # [B, V]
    if batch.min_p is not None:
        is_low = probs < batch.min_p[:, None] * probs.amax(-1, keepdim=True)  # [B, V]
        probs = probs.masked_fill_(is_low, 0.0)  # the race below needs no renormalisation

    # Exponential race (Gumbel-max in disguise): argmax(p / q), q ~ Exp(1), picks i with probability
    # p_i / sum(p), with no host sync (unlike torch.multinomial's checks).
    q = torch.empty_like(probs)  # [B, V]
    if batch.has_unseeded_random:
        q.exponential_(generator=generator)
    for row, seed in batch.seeded_rows:
        row_generator = torch.Generator(device=probs.device)
        row_generator.manual_seed(seed)
        q[row].exponential_(generator=row_generator)
    # q == 0 would make 0/0 = NaN, which argmax treats as the maximum.
    return probs.div_(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(-1)


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keep each row's top_k logits (ties with the k-th kept too); top_k == 0 keeps all. In place."""
    top_values = logits.topk(max_top_k, dim=-1).values  # [B, K], descending
    kth = top_values.gather(1, (top_k.clamp(1, max_top_k) - 1)[:, None])  # [B, 1]
    kth.masked_fill_((top_k == 0)[:, None], float("-inf"))
    logits.masked_fill_(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (HF's rule: drop a token
    when the mass of it and everything less likely is <= 1 - top_p; the best token always stays)."""
    # Stable, so tokens with equal logits are cut in index order whatever the batch looks like.
    sorted_logits, sorted_ids = logits.sort(dim=-1, stable=True)  # [B, V], ascending
    cumulative = sorted_logits.softmax(-1).cumsum_(-1)  # [B, V]
    is_dropped = cumulative <= (1.0 - top_p)[:, None]  # [B, V]
    is_dropped[:, -1] = False
    logits.masked_fill_(torch.empty_like(is_dropped).scatter_(1, sorted_ids, is_dropped), float("-inf"))


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with vocab_size -> [B, V] f32 occurrence counts."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _padded(token_lists: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(ids) for ids in token_lists))
    padded = np.full((len(token_lists), width), pad_id, dtype=np.int64)  # [B, L]
    for i, ids in enumerate(token_lists):
        padded[i, : len(ids)] = ids  # numpy converts a list of ints ~5x faster than torch
    return to_device(torch.from_numpy(padded), device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to `device` without blocking the host on CUDA (pinned, non-blocking copy)."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        # A pageable host->device copy blocks the host until the GPU queue drains; pinned +
        # non_blocking does not (the caching host allocator keeps the buffer alive until it is read).
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _step_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): a counter-based per-step seed, so a seeded row's draw depends on
    nothing but its own seed and how many tokens it has generated."""
    x = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # 63 bits: fits every generator's manual_seed
