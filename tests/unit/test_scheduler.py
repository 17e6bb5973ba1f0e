"""Scheduler with a fake runner: budgets, chunked prefill, prefix reuse, preemption, aborts, stops.

The fake runner behaves like a causal model over a paged KV cache: the "KV" it writes at position p
is a digest of (the KV read back at p-1 through the block table, token p, the image row at p, the
cross-attention salt), and the sampled token is a function of the last digest. So a wrong block
table, a block shared between different images, an overwritten shared block or a skipped position
changes the tokens, and every stream can be checked against `reference_outputs`, computed with no
scheduler at all.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

_saved_torch = sys.modules.get("torch")
sys.modules["torch"] = None  # type: ignore[assignment]  # the engine core must not need torch
try:
    from llm_service.engine.outputs import ModelRunnerOutput, SchedulerOutput
    from llm_service.engine.request import FinishReason, MultimodalSpan, Request, RequestStatus
    from llm_service.engine.sampling_params import SamplingParams
    from llm_service.engine.scheduler import Scheduler, SchedulerConfig
    from vlm_protocol.errors import InvalidArgumentError, ResourceExhaustedError
finally:
    if _saved_torch is None:
        del sys.modules["torch"]
    else:
        sys.modules["torch"] = _saved_torch

REPO = Path(__file__).resolve().parents[2]
EOS = 2  # never produced by the digest sampler (tokens 100..999) unless scripted


def test_scheduler_imports_without_torch():
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch not blocked')\n"
        "import llm_service.engine.scheduler, llm_service.engine.outputs\n"
        "bad = [m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in ('torch', 'grpc', 'google')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# ---- fake model ---------------------------------------------------------------------------------


def _digest(prev: bytes, token: int, image: tuple[str, int] | None, salts: tuple[str, ...]) -> bytes:
    return hashlib.blake2b(repr((prev, token, image, salts)).encode(), digest_size=8).digest()


def _sample(digest: bytes) -> int:
    return 100 + int.from_bytes(digest[:4], "little") % 900


def _image_at(spans, pos: int) -> tuple[str, int] | None:
    return next(((s.content_id, pos - s.offset) for s in spans if s.offset <= pos < s.end), None)


def reference_outputs(prompt, max_tokens: int, spans=(), salts=()) -> list[int]:
    """The stream a correct engine produces for `prompt` (no stop tokens), with no scheduler."""
    prev, tokens, out = b"root", list(prompt), []
    for pos in range(len(prompt) + max_tokens - 1):
        prev = _digest(prev, tokens[pos], _image_at(spans, pos), tuple(salts))
        if pos >= len(prompt) - 1:
            out.append(_sample(prev))
            tokens.append(out[-1])
    return out


class FakeRunner:
    def __init__(self, block_size: int, scripts: dict[str, list[int]] | None = None) -> None:
        self.block_size = block_size
        self.kv: dict[tuple[int, int], bytes] = {}  # (block id, slot) -> digest
        self.scripts = scripts or {}
        self.num_sampled: dict[str, int] = defaultdict(int)
        self.chunks: dict[str, list] = defaultdict(list)  # every chunk run, per request

    def _slot(self, table: list[int], pos: int) -> tuple[int, int]:
        return table[pos // self.block_size], pos % self.block_size

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        sampled = {}
        for chunk in out.chunks:
            self.chunks[chunk.request_id].append(chunk)
            start = chunk.start_position
            # KeyError here = the scheduler claims KV that was never written.
            prev = self.kv[self._slot(chunk.block_table, start - 1)] if start else b"root"
            for i, token in enumerate(chunk.token_ids):
                pos = start + i
                prev = _digest(prev, token, _image_at(chunk.mm_spans, pos), chunk.cache_salt_keys)
                self.kv[self._slot(chunk.block_table, pos)] = prev
            if chunk.needs_sampling:
                rid = chunk.request_id
                n = self.num_sampled[rid]
                self.num_sampled[rid] += 1
                script = self.scripts.get(rid, [])
                sampled[rid] = script[n] if n < len(script) else _sample(prev)
        return ModelRunnerOutput(sampled)


def run(
    scheduler: Scheduler,
    runner: FakeRunner,
    arrivals: dict[int, list[Request]],
    max_steps: int = 2000,
) -> tuple[dict[str, list[int]], list[SchedulerOutput]]:
    """Drive schedule -> execute -> update until every request finished; check per-step limits."""
    cfg = scheduler.config
    streams: dict[str, list[int]] = defaultdict(list)
    outputs = []
    pending = dict(arrivals)
    for step in range(max_steps):
        for request in pending.pop(step, []):
            scheduler.add_request(request)
        if not pending and not scheduler.has_unfinished_requests():
            return streams, outputs
        out = scheduler.schedule()
        outputs.append(out)
        assert out.num_scheduled_tokens == sum(c.num_tokens for c in out.chunks)
        assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(out.chunks) <= cfg.max_num_seqs
        assert len({c.request_id for c in out.chunks}) == len(out.chunks)
        for update in scheduler.update_from_output(out, runner.execute(out)):
            streams[update.request_id] += update.new_token_ids
    raise AssertionError("requests did not finish")


def req(rid: str, prompt, max_tokens: int = 8, spans=(), salts=(), **params) -> Request:
    params.setdefault("ignore_eos", False)
    return Request(
        rid,
        prompt,
        SamplingParams(max_tokens=max_tokens, **params),
        eos_token_ids=(EOS,),
        mm_spans=tuple(spans),
        cache_salt_keys=tuple(salts),
    )


def make(**overrides) -> tuple[Scheduler, FakeRunner]:
    defaults = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 64, "max_num_seqs": 8}
    cfg = SchedulerConfig(**{**defaults, **overrides})
    return Scheduler(cfg), FakeRunner(cfg.block_size)


def prompt_of(n: int, seed: int = 0) -> list[int]:
    return [10 + (seed * 31 + i * 7) % 80 for i in range(n)]


# ---- config and admission -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"max_num_seqs": 0}, {"num_blocks": 0}, {"max_prefill_chunk_tokens": 0}, {"max_num_batched_tokens": 8}],
)
def test_config_rejects_inconsistent_limits(overrides):
    with pytest.raises(ValueError):
        SchedulerConfig(**{"max_num_seqs": 16, **overrides})


def test_waiting_queue_is_bounded():
    scheduler, _ = make(max_waiting_requests=2)
    scheduler.add_request(req("a", [1, 2, 3]))
    scheduler.add_request(req("b", [1, 2, 3]))
    with pytest.raises(ResourceExhaustedError, match="retry later"):
        scheduler.add_request(req("c", [1, 2, 3]))
    assert scheduler.num_waiting == 2
    scheduler.schedule()  # admits both
    scheduler.add_request(req("c", [1, 2, 3]))


def test_requests_that_can_never_fit_are_rejected_with_a_fix():
    scheduler, _ = make(max_model_len=64, num_blocks=8)  # pool: 32 tokens
    with pytest.raises(InvalidArgumentError, match=r"set max_tokens <= 4"):
        scheduler.add_request(req("a", prompt_of(60), max_tokens=10))
    with pytest.raises(InvalidArgumentError, match="shorten the prompt"):
        scheduler.add_request(req("b", prompt_of(64), max_tokens=1))
    with pytest.raises(InvalidArgumentError, match=r"KV cache.*set max_tokens <= 13"):
        scheduler.add_request(req("c", prompt_of(20), max_tokens=20))
    scheduler.add_request(req("d", prompt_of(20), max_tokens=13))  # 32 KV slots: fits exactly
    with pytest.raises(InvalidArgumentError, match="already in use"):
        scheduler.add_request(req("d", prompt_of(3)))
    assert scheduler.num_waiting == 1


# ---- scheduling ---------------------------------------------------------------------------------


def test_chunked_prefill_with_chunk_7_reconstructs_the_stream():
    scheduler, runner = make(max_prefill_chunk_tokens=7)
    span = MultimodalSpan("img-1", offset=5, length=20)
    prompt = prompt_of(30)
    request = req("a", prompt, max_tokens=5, spans=[span])
    streams, _ = run(scheduler, runner, {0: [request]})

    chunks = runner.chunks["a"]
    assert [(c.start_position, c.num_tokens) for c in chunks] == [
        (0, 7), (7, 7), (14, 7), (21, 7), (28, 2), (30, 1), (31, 1), (32, 1), (33, 1)
    ]  # fmt: skip
    assert [c.needs_sampling for c in chunks] == [False] * 4 + [True] * 5
    assert [len(c.mm_spans) for c in chunks] == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    fed = [t for c in chunks for t in c.token_ids]
    assert fed == prompt + streams["a"][:-1]  # the last sampled token is never fed back
    assert streams["a"] == request.output_token_ids == reference_outputs(prompt, 5, [span])
    assert request.finish_reason is FinishReason.LENGTH


def test_running_requests_go_first_and_budget_is_shared():
    scheduler, runner = make(max_num_batched_tokens=16)
    a = req("a", prompt_of(4), max_tokens=20)
    scheduler.add_request(a)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    scheduler.add_request(req("b", prompt_of(100, seed=1)))
    out = scheduler.schedule()
    assert [(c.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 15)]
    assert out.chunks[1].is_first_chunk and not out.chunks[0].is_first_chunk


def test_sixteen_staggered_requests_finish_with_exact_tokens():
    scheduler, runner = make(
        max_num_batched_tokens=40, max_num_seqs=6, max_prefill_chunk_tokens=16, num_blocks=96
    )
    requests, arrivals, expected = [], defaultdict(list), {}
    for i in range(16):
        n = 1 + (i * 13) % 45
        spans = [MultimodalSpan(f"img-{i % 3}", 0, min(n, 6))] if i % 4 == 0 else []
        r = req(f"r{i}", prompt_of(n, seed=i), max_tokens=1 + (i * 5) % 11, spans=spans)
        requests.append(r)
        arrivals[i // 3].append(r)
        expected[r.request_id] = reference_outputs(r.prompt_token_ids, r.sampling_params.max_tokens, spans)
    streams, outputs = run(scheduler, runner, arrivals)

    for r in requests:
        assert r.finish_reason is FinishReason.LENGTH
        assert r.num_output_tokens == r.sampling_params.max_tokens
        assert streams[r.request_id] == r.output_token_ids == expected[r.request_id]
    assert max(o.num_scheduled_tokens for o in outputs) == 40  # the budget was binding at times
    assert scheduler.kv_cache.num_free_blocks == 96


def test_prefix_hit_reuses_kv_only_for_the_same_image():
    scheduler, runner = make()
    prompt = prompt_of(22)
    image_a = MultimodalSpan("b3:aaaa", offset=2, length=12)
    image_b = MultimodalSpan("b3:bbbb", offset=2, length=12)
    first = req("first", prompt, max_tokens=3, spans=[image_a])
    same = req("same", prompt, max_tokens=3, spans=[image_a])
    other = req("other", prompt, max_tokens=3, spans=[image_b])
    streams, _ = run(scheduler, runner, {0: [first], 5: [same], 10: [other]})

    # 22 prompt tokens: 5 full blocks of 4 are cached, 2 tokens computed.
    assert same.num_cached_prompt_tokens == 20 and runner.chunks["same"][0].start_position == 20
    assert runner.chunks["same"][0].prefix_token_ids == prompt[:20]
    # A different image at the same position: blocks 0..3 hold its rows, only block 4+ could
    # match, and chaining rules that out too.
    assert other.num_cached_prompt_tokens == 0 and runner.chunks["other"][0].start_position == 0
    stats = scheduler.stats()
    assert stats.prefix_hit_tokens == 20 and stats.prefix_queries == 3
    assert sum(c.num_tokens for c in runner.chunks["same"]) == 2 + 2  # only new tokens computed
    assert streams["same"] == streams["first"] == reference_outputs(prompt, 3, [image_a])
    assert streams["other"] == reference_outputs(prompt, 3, [image_b]) != streams["first"]


def test_partial_prefix_hit_and_cross_attention_salt():
    scheduler, runner = make()
    base = prompt_of(20)
    forked = base[:10] + prompt_of(10, seed=5)  # shares 2 full blocks
    a, b = req("a", base, max_tokens=2), req("b", forked, max_tokens=2)
    c = req("c", base, max_tokens=2, salts=["b3:cross"])  # same tokens, cross-attn image
    streams, _ = run(scheduler, runner, {0: [a], 3: [b], 6: [c]})
    assert (b.num_cached_prompt_tokens, c.num_cached_prompt_tokens) == (8, 0)
    assert streams["b"] == reference_outputs(forked, 2)
    assert streams["c"] == reference_outputs(base, 2, salts=["b3:cross"])


def test_running_requests_share_prefix_blocks_with_ref_counts():
    scheduler, runner = make()
    prompt = prompt_of(17)
    a, b = req("a", prompt, max_tokens=30), req("b", prompt, max_tokens=4)
    scheduler.add_request(a)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    scheduler.add_request(b)
    out = scheduler.schedule()
    kv = scheduler.kv_cache
    shared = kv.get_block_table("a")[:4]
    assert kv.get_block_table("b")[:4] == shared
    assert [kv.blocks[i].ref_count for i in shared] == [2, 2, 2, 2]
    scheduler.update_from_output(out, runner.execute(out))
    assert scheduler.abort("a")
    assert [kv.blocks[i].ref_count for i in shared] == [1, 1, 1, 1]
    run(scheduler, runner, {})
    assert b.output_token_ids == reference_outputs(prompt, 4)
    assert kv.num_free_blocks == kv.num_blocks


# ---- aborts and preemption ----------------------------------------------------------------------


def test_abort_in_every_state_frees_all_blocks():
    scheduler, runner = make(max_prefill_chunk_tokens=7, max_num_seqs=2)
    kv = scheduler.kv_cache
    start_free = kv.num_free_blocks

    def step():
        out = scheduler.schedule()
        scheduler.update_from_output(out, runner.execute(out))
        return out

    prefilling, decoding, waiting = (
        req("p", prompt_of(40)),
        req("d", prompt_of(5), max_tokens=50),
        req("w", [1]),
    )
    scheduler.add_request(decoding)
    step()
    scheduler.add_request(prefilling)
    scheduler.add_request(waiting)
    step()
    step()
    assert prefilling.status is RequestStatus.RUNNING and 0 < prefilling.num_computed_tokens < 40
    assert decoding.num_output_tokens >= 2 and waiting.status is RequestStatus.WAITING
    assert kv.num_free_blocks < start_free

    assert scheduler.abort("p") and scheduler.abort("d") and scheduler.abort("w")
    assert kv.num_free_blocks == start_free
    assert (scheduler.num_running, scheduler.num_waiting) == (0, 0)
    assert all(r.finish_reason is FinishReason.ABORT for r in (prefilling, decoding, waiting))
    assert not scheduler.abort("p") and not scheduler.abort("unknown")  # idempotent
    assert sorted(scheduler.schedule().finished_request_ids) == ["d", "p", "w"]  # runner drops state


def test_abort_between_schedule_and_update_is_skipped():
    scheduler, runner = make()
    scheduler.add_request(req("a", prompt_of(9)))
    out = scheduler.schedule()
    result = runner.execute(out)
    scheduler.abort("a")
    assert scheduler.update_from_output(out, result) == []
    assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.num_blocks


def test_preempted_request_keeps_outputs_and_restarts_first():
    # 16 KV slots of block size 4; 2-token chunks so the restart is chunked after a prefix hit.
    scheduler, runner = make(num_blocks=4, max_num_seqs=2, max_prefill_chunk_tokens=2)
    a, b = req("a", prompt_of(4), max_tokens=8), req("b", prompt_of(4, seed=1), max_tokens=8)
    c = req("c", prompt_of(4, seed=2), max_tokens=8)  # waits: max_num_seqs
    for request in (a, b, c):
        scheduler.add_request(request)
    preempting = None
    for _ in range(20):
        out = scheduler.schedule()
        if out.preempted_request_ids:
            preempting = out
            break
        scheduler.update_from_output(out, runner.execute(out))
    assert preempting is not None and preempting.preempted_request_ids == ["b"]  # admitted last
    assert b.status is RequestStatus.PREEMPTED and list(scheduler.waiting) == [b, c]
    assert [chunk.request_id for chunk in preempting.chunks] == ["a"]  # nothing admitted
    assert b.num_computed_tokens == 0 and b.num_output_tokens > 0 and b.num_preemptions == 1
    scheduler.update_from_output(preempting, runner.execute(preempting))
    streams, _ = run(scheduler, runner, {})
    restart = next(c for c in runner.chunks["b"][1:] if c.is_first_chunk)
    assert restart.prefix_token_ids == b.all_token_ids[: restart.start_position]
    assert a.output_token_ids == reference_outputs(a.prompt_token_ids, 8)
    assert b.output_token_ids == reference_outputs(b.prompt_token_ids, 8)
    assert c.output_token_ids == reference_outputs(c.prompt_token_ids, 8)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_tiny_pool_preempts_and_streams_match_the_unconstrained_run(prefix_caching):
    def workload():
        return {
            0: [req(f"r{i}", prompt_of(6 + 5 * i, seed=i), max_tokens=24) for i in range(4)],
            3: [req(f"s{i}", prompt_of(9, seed=9), max_tokens=16) for i in range(3)],  # shared prefix
        }

    big, big_runner = make(num_blocks=200)
    expected, _ = run(big, big_runner, workload())
    tiny, tiny_runner = make(num_blocks=16, enable_prefix_caching=prefix_caching)  # 64 KV slots
    arrivals = workload()
    streams, _ = run(tiny, tiny_runner, arrivals)

    assert big.num_preemptions == 0 and tiny.num_preemptions > 0
    assert tiny.stats().num_preemptions == tiny.num_preemptions
    assert streams == expected
    for request in (r for rs in arrivals.values() for r in rs):
        assert request.output_token_ids == expected[request.request_id]
        assert request.finish_reason is FinishReason.LENGTH
    assert tiny.kv_cache.num_free_blocks == 16


# ---- stop conditions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "params", "eos_ids", "expected_tokens", "reason"),
    [
        ([], {"max_tokens": 3}, (EOS,), 3, FinishReason.LENGTH),
        ([5, EOS, 6], {}, (EOS,), 2, FinishReason.STOP),
        ([7, 7, 7, 7, 7, EOS], {"max_tokens": 6}, (EOS,), 6, FinishReason.STOP),  # EOS beats LENGTH
        ([EOS, 5, 6, EOS], {"min_tokens": 3}, (EOS,), 4, FinishReason.STOP),  # early EOS ignored
        ([5, 6, EOS], {"min_tokens": 3}, (EOS,), 3, FinishReason.STOP),  # the 3rd token may stop
        ([EOS, EOS, EOS], {"max_tokens": 4, "ignore_eos": True}, (EOS,), 4, FinishReason.LENGTH),
        ([EOS, 9, 5], {"end_id": 9}, (EOS,), 2, FinishReason.STOP),  # end_id replaces EOS
        ([5, 42, 6], {"stop_token_ids": (42,)}, (EOS,), 2, FinishReason.STOP_TOKEN),
        ([42, 5, 42], {"stop_token_ids": (42,), "min_tokens": 2}, (EOS,), 3, FinishReason.STOP_TOKEN),
        ([42, 5], {"stop_token_ids": (42,), "ignore_eos": True}, (EOS,), 1, FinishReason.STOP_TOKEN),
        ([EOS, 3, 4], {}, (3, 4), 2, FinishReason.STOP),  # any checkpoint EOS id stops
    ],
)
def test_stop_conditions(script, params, eos_ids, expected_tokens, reason):
    params = {"max_tokens": 10, **params}
    scheduler, runner = make()
    runner.scripts["a"] = script
    request = Request("a", prompt_of(5), SamplingParams(**params), eos_token_ids=eos_ids)
    streams, _ = run(scheduler, runner, {0: [request]})
    assert len(request.output_token_ids) == expected_tokens
    assert streams["a"] == request.output_token_ids
    assert request.finish_reason is reason and request.is_finished
    assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.num_blocks


def test_finish_request_for_a_stop_string_frees_blocks():
    scheduler, runner = make()
    request = req("a", prompt_of(9), max_tokens=50)
    scheduler.add_request(request)
    out = scheduler.schedule()
    updates = scheduler.update_from_output(out, runner.execute(out))
    assert len(updates) == 1 and not updates[0].is_finished
    assert scheduler.finish_request("a", FinishReason.STOP_STRING)
    assert request.status is RequestStatus.FINISHED_STOPPED
    assert request.finish_reason is FinishReason.STOP_STRING
    assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.num_blocks
    assert not scheduler.finish_request("a", FinishReason.STOP_STRING)
    assert not scheduler.has_unfinished_requests()
