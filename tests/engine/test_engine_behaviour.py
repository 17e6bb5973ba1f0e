"""Engine behaviour beyond parity: prefix reuse by content, seeded sampling, abort, preemption, async API."""

from __future__ import annotations

import asyncio

import pytest

from llm_service.engine.async_engine import AsyncLLMEngine
from llm_service.engine.engine_core import EngineConfig, EngineCore, GenerationInput
from llm_service.engine.prompt import MultimodalItem
from llm_service.engine.request import FinishReason
from llm_service.engine.sampling_params import SamplingParams
from tests.engine.hf_reference import HFReference
from tests.engine.test_engine_parity import _images

PROMPT = "USER: <image>\nWhat is shown in this picture? Please answer in detail. ASSISTANT:"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    ckpt = tiny_checkpoint("llava")
    hf = HFReference("llava", ckpt)
    ref_a = hf.run(PROMPT, _images(0, 1), 8)
    ref_b = hf.run(PROMPT, _images(1, 1), 8)
    return ckpt, ref_a, ref_b


def _engine(ckpt, **kwargs) -> EngineCore:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("max_num_batched_tokens", 64)
    return EngineCore(EngineConfig(model_dir=str(ckpt), **kwargs))


def _drain(engine: EngineCore) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs


def _add(engine, rid, ref, sampling=GREEDY):
    return engine.add_request(GenerationInput(rid, prompt=PROMPT, embeddings=ref.embeddings, sampling=sampling))


def test_prefix_reuse_same_image_hits_and_different_image_never_does(llava):
    ckpt, ref_a, ref_b = llava
    engine = _engine(ckpt)
    _add(engine, "first", ref_a)
    assert _drain(engine)["first"] == ref_a.output_token_ids
    hits_before = engine.scheduler.stats().prefix_hit_tokens

    second = _add(engine, "second", ref_a)
    out = _drain(engine)["second"]
    assert out == ref_a.output_token_ids
    prompt_len = len(second.prompt_token_ids)
    # everything but the last partial block (and at least the last token) came from the cache
    assert second.num_cached_prompt_tokens == (prompt_len - 1) // 4 * 4
    assert engine.scheduler.stats().prefix_hit_tokens - hits_before == second.num_cached_prompt_tokens

    # same text, different image: the blocks holding image rows (and all after) must not be reused
    other = _add(engine, "other", ref_b)
    assert _drain(engine)["other"] == ref_b.output_token_ids
    first_image_position = other.mm_spans[0].offset
    assert other.num_cached_prompt_tokens <= first_image_position


def test_seeded_sampling_is_reproducible_across_batch_compositions(llava):
    ckpt, ref_a, ref_b = llava
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    engine = _engine(ckpt)
    _add(engine, "alone", ref_a, seeded)
    alone = _drain(engine)["alone"]

    engine = _engine(ckpt)
    _add(engine, "noise-1", ref_b, SamplingParams(max_tokens=12, temperature=1.0))
    engine.step()
    _add(engine, "together", ref_a, seeded)
    _add(engine, "noise-2", ref_a, SamplingParams(max_tokens=5, temperature=0.7, seed=7))
    together = _drain(engine)["together"]
    assert together == alone

    engine = _engine(ckpt)
    _add(engine, "other-seed", ref_a, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=99))
    assert _drain(engine)["other-seed"] != alone


@pytest.mark.parametrize("abort_after_steps", [1, 6])  # mid-prefill (7-token chunks), mid-decode
def test_abort_frees_every_block(llava, abort_after_steps):
    ckpt, ref_a, _ = llava
    engine = _engine(ckpt, max_prefill_chunk_tokens=7, enable_prefix_caching=False)
    free_at_start = engine.scheduler.kv_cache.num_free_blocks
    _add(engine, "victim", ref_a, SamplingParams(max_tokens=20, temperature=0.0))
    for _ in range(abort_after_steps):
        engine.step()
    request = engine.scheduler.get_request("victim")
    assert request is not None and request.num_computed_tokens > 0
    in_decode = request.num_computed_tokens >= len(request.prompt_token_ids)
    assert in_decode == (abort_after_steps == 6)
    assert engine.scheduler.kv_cache.num_free_blocks < free_at_start
    assert engine.abort("victim")
    assert engine.scheduler.kv_cache.num_free_blocks == free_at_start
    assert not engine.has_unfinished_requests()
    assert "victim" not in engine.runner._prompt_tables


def test_preemption_keeps_results_identical(llava):
    ckpt, ref_a, ref_b = llava
    prompt_len = len(ref_a.prompt_token_ids)
    # room for two prompts but not for both to decode 8 tokens: running requests must preempt
    prompt_blocks = -(-prompt_len // 4)
    engine = _engine(ckpt, num_kv_blocks=2 * prompt_blocks + 1, enable_prefix_caching=False)
    refs = [ref_a, ref_b] * 3
    for i, ref in enumerate(refs):
        _add(engine, f"r{i}", ref)
    outputs = _drain(engine)
    assert engine.scheduler.stats().num_preemptions > 0
    for i, ref in enumerate(refs):
        assert outputs[f"r{i}"] == ref.output_token_ids


def test_stop_string_ends_request_and_is_not_emitted(llava):
    ckpt, ref_a, _ = llava
    engine = _engine(ckpt)
    _add(engine, "full", ref_a)
    full_text = ""
    while engine.has_unfinished_requests():
        full_text += "".join(o.text_delta for o in engine.step())
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    engine = _engine(ckpt)
    _add(engine, "stopped", ref_a, SamplingParams(max_tokens=8, temperature=0.0, stop=(stop,)))
    text, reason = "", None
    while engine.has_unfinished_requests():
        for o in engine.step():
            text += o.text_delta
            reason = o.finish_reason or reason
    assert reason is FinishReason.STOP_STRING
    assert text == full_text[: full_text.index(stop)]
    assert engine.scheduler.kv_cache.num_used_blocks == 0 or engine.config.enable_prefix_caching


def test_async_engine_streams_and_aborts_on_close(llava):
    ckpt, ref_a, ref_b = llava

    async def main():
        engine = AsyncLLMEngine(_engine(ckpt))
        try:
            async def collect(rid, ref):
                tokens = []
                async for out in engine.generate(GenerationInput(rid, prompt=PROMPT, embeddings=ref.embeddings, sampling=GREEDY)):
                    tokens += out.new_token_ids
                return tokens

            a, b = await asyncio.gather(collect("a", ref_a), collect("b", ref_b))
            assert a == ref_a.output_token_ids and b == ref_b.output_token_ids

            # a client that goes away after the first delta: the request is aborted, blocks freed
            stream = engine.generate(
                GenerationInput("gone", prompt=PROMPT, embeddings=ref_a.embeddings, sampling=SamplingParams(max_tokens=200, temperature=0.0))
            )
            await stream.__anext__()
            await stream.aclose()
            for _ in range(100):
                if engine.stats().num_running == 0 and engine.stats().num_waiting == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.stats().num_running == 0

            # bad input is reported to the caller, and the engine keeps serving
            with pytest.raises(Exception, match="placeholder"):
                async for _ in engine.generate(GenerationInput("bad", prompt="no image here", embeddings=ref_a.embeddings)):
                    pass
            assert await collect("after", ref_a) == ref_a.output_token_ids
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_chat_messages_use_the_checkpoint_template(llava, tiny_checkpoint):
    ckpt, ref_a, _ = llava
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    hf = HFReference("llava", ckpt)
    rendered = hf.processor.apply_chat_template(messages, add_generation_prompt=True)
    ref = hf.run(rendered, _images(0, 1), 8)
    engine = _engine(ckpt)
    request = engine.add_request(GenerationInput("chat", messages=messages, embeddings=ref.embeddings, sampling=GREEDY))
    assert list(request.prompt_token_ids) == ref.prompt_token_ids
    assert _drain(engine)["chat"] == ref.output_token_ids


def test_triton_ensemble_prompt_format(llava):
    ckpt, ref_a, _ = llava
    engine = _engine(ckpt)
    request = engine.add_request(
        GenerationInput("ens", prompt="Which city is this?", embeddings=ref_a.embeddings, sampling=GREEDY, triton_ensemble_format=True)
    )
    item = MultimodalItem(ref_a.embeddings[0].content_id, "image", ref_a.embeddings[0].num_rows)
    expected = engine.prompt_builder.tokenize("USER:\n<image>Which city is this? ASSISTANT:", [item]).token_ids
    assert list(request.prompt_token_ids) == expected


def test_placeholder_count_mismatch_is_a_clear_error(llava):
    ckpt, ref_a, ref_b = llava
    engine = _engine(ckpt)
    with pytest.raises(Exception, match="1 image and 0 video placeholder.*2 image and 0 video input"):
        engine.add_request(GenerationInput("bad", prompt=PROMPT, embeddings=ref_a.embeddings + ref_b.embeddings))
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache.num_used_blocks == 0


def _transcript(engine: EngineCore) -> tuple[dict, dict, list[tuple[str, int]]]:
    """(ids per request, text per request, (request, step) of every output), draining the engine."""
    ids: dict[str, list[int]] = {}
    text: dict[str, str] = {}
    seen: list[tuple[str, int]] = []
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids.setdefault(out.request_id, []).extend(out.new_token_ids)
            text[out.request_id] = text.get(out.request_id, "") + out.text_delta
            seen.append((out.request_id, step))
        step += 1
    return ids, text, seen


def test_async_output_defers_mid_stream_text_but_changes_nothing_else(llava):
    ckpt, ref_a, ref_b = llava
    results = {}
    for async_output in (False, True):
        engine = _engine(ckpt, async_output=async_output)
        _add(engine, "a", ref_a)
        _add(engine, "b", ref_b, SamplingParams(max_tokens=8, temperature=0.0, stop=("zzz-never",)))
        _add(engine, "c", ref_a, SamplingParams(max_tokens=1, temperature=0.0))
        results[async_output] = _transcript(engine)
        assert engine.scheduler.kv_cache.num_used_blocks == 0 or engine.config.enable_prefix_caching
    (ids_sync, text_sync, seen_sync), (ids_async, text_async, seen_async) = results[False], results[True]
    assert ids_async == ids_sync and text_async == text_sync
    assert ids_sync["a"] == ref_a.output_token_ids
    # same number of outputs per request; a's mid-stream tokens arrive one step later, its first and
    # last on time; b (stop strings need the text at once) and c (one token) are never deferred
    for rid in "abc":
        sync_steps = [s for r, s in seen_sync if r == rid]
        async_steps = [s for r, s in seen_async if r == rid]
        assert len(sync_steps) == len(async_steps), rid
        if rid == "a":
            assert async_steps[0] == sync_steps[0] and async_steps[-1] == sync_steps[-1]
            assert async_steps[1:-1] == [s + 1 for s in sync_steps[1:-1]]
        else:
            assert async_steps == sync_steps, rid


def test_abort_with_a_deferred_output_pending(llava):
    ckpt, ref_a, ref_b = llava
    engine = _engine(ckpt, async_output=True)
    _add(engine, "a", ref_a)
    _add(engine, "b", ref_b)
    while not engine._deferred:
        engine.step()
    assert engine.abort("a")
    ids, _, _ = _transcript(engine)
    assert "a" not in ids and len(ids["b"]) > 0  # nothing of a arrives after its abort, b goes on
    assert all(b.ref_count == 0 for b in engine.scheduler.kv_cache.blocks)
    assert not engine._deferred



def _pipelined(ckpt, **kwargs) -> EngineCore:
    """CUDA's default decode pipeline, on CPU: the graph path's static buffers run eagerly."""
    engine = _engine(ckpt, pipeline_decode=True, **kwargs)
    engine.runner.enable_decode_graphs(capture=False)
    return engine


def test_pipelined_decode_with_stops_and_aborts_matches_sync(llava):
    ckpt, ref_a, ref_b = llava
    stop_id = ref_a.output_token_ids[4]  # a stop token a produces mid-stream, while a step is queued
    full_text = {}
    engine = _engine(ckpt)
    _add(engine, "t", ref_a)
    full_text = "".join(o.text_delta for _ in range(20) for o in engine.step())
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 2]
    requests = {
        "plain": (ref_a, GREEDY),
        "stop-id": (ref_a, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_id,))),
        "stop-str": (ref_a, SamplingParams(max_tokens=8, temperature=0.0, stop=(stop,))),
        "short": (ref_b, SamplingParams(max_tokens=3, temperature=0.0)),
    }
    results = {}
    for name, engine in (("sync", _engine(ckpt)), ("pipelined", _pipelined(ckpt))):
        continued: list[str] = []
        schedule = engine.scheduler.schedule_continuation

        def recorded(previous, schedule=schedule, continued=continued):
            following = schedule(previous)
            continued.extend(c.request_id for c in following.chunks) if following else None
            return following

        engine.scheduler.schedule_continuation = recorded
        for rid, (ref, params) in requests.items():
            _add(engine, rid, ref, params)
        results[name] = _transcript(engine)[:2]
        assert all(b.ref_count == 0 for b in engine.scheduler.kv_cache.blocks), name
        assert not engine.has_unfinished_requests()
        # the pipelined run queued steps for the requests that stop early, past their stop
        assert (set(continued) >= {"stop-id", "stop-str"}) == (name == "pipelined")
    assert results["pipelined"] == results["sync"]
    ids = results["sync"][0]
    assert ids["stop-id"][-1] == stop_id and len(ids["stop-id"]) < 8
    assert len(ids["short"]) == 3


def test_no_continuation_where_sampling_reads_the_output_history(llava):
    ckpt, ref_a, _ = llava
    for params in (
        SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(max_tokens=8, temperature=0.7, seed=3),
        SamplingParams(max_tokens=8, temperature=0.0, min_tokens=6),
    ):
        engine = _pipelined(ckpt)
        _add(engine, "r", ref_a, params)
        queued = 0
        while engine.has_unfinished_requests():
            engine.step()
            queued += engine._in_flight is not None
        assert queued == 0 if params.min_tokens == 0 else queued > 0, params  # min_tokens: once reached


def test_pipelined_decode_really_queues_steps_and_survives_an_abort(llava):
    ckpt, ref_a, ref_b = llava
    engine = _pipelined(ckpt)
    _add(engine, "a", ref_a)
    _add(engine, "b", ref_b)
    queued = 0
    while engine.has_unfinished_requests():
        engine.step()
        queued += engine._in_flight is not None
        if queued == 2 and engine.scheduler.get_request("a") is not None:
            assert engine.abort("a")  # a has a step queued on the device: its token is dropped
    assert queued >= 2
    assert all(b.ref_count == 0 for b in engine.scheduler.kv_cache.blocks)
