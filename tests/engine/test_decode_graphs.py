"""The CUDA-graph decode path on CPU: same static buffers, padding to buckets and scratch block, run
eagerly (`capture=False`). Greedy ids must still equal Hugging Face's; capture and replay themselves
are covered by tests/gpu."""

from __future__ import annotations

import pytest
import torch

from llm_service.engine.cuda_graphs import DecodeGraphs, batch_buckets, block_buckets
from llm_service.engine.engine_core import EngineConfig
from tests.engine.test_engine_parity import _run_engine


def test_buckets():
    assert batch_buckets(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(1) == [1]
    assert block_buckets(10) == [1, 2, 4, 8, 10]
    assert block_buckets(1) == [1]


def test_gather_budget_limits_buckets():
    graphs = DecodeGraphs(
        torch.nn.Identity(), [], block_size=16, scratch_block=0, max_batch_size=64, max_blocks_per_seq=64,
        hidden_size=4, device=torch.device("cpu"), dtype=torch.float32, capture=False, max_gather_tokens=16 * 256,
    )
    assert (1, 64) in graphs.keys and (4, 64) in graphs.keys and (8, 64) not in graphs.keys
    assert graphs.bucket_for(3, 16 * 40) == (4, 64)  # 3 rows -> 4, 40 blocks -> 64
    assert graphs.bucket_for(9, 16 * 10) == (16, 16)  # 10 blocks -> 16
    assert graphs.bucket_for(9, 16 * 40) is None  # 16 x 64 blocks is past the budget: eager
    assert graphs.bucket_for(65, 16) is None  # past the largest batch bucket


def test_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        EngineConfig(model_dir="x", device="cpu", enforce_eager=False)
    assert not EngineConfig(model_dir="x", device="cpu").use_cuda_graphs
    assert EngineConfig(model_dir="x", device="cuda").use_cuda_graphs  # the default on CUDA
    assert EngineConfig(model_dir="x", device="cuda:1").use_cuda_graphs
    assert EngineConfig(model_dir="x", device="cuda", enforce_eager=False).use_cuda_graphs
    assert not EngineConfig(model_dir="x", device="cuda", enforce_eager=True).use_cuda_graphs


class _CountingGraphs:
    """Counts the decode steps the runner sends to the padded static-buffer path."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, engine) -> None:
        engine.runner.enable_decode_graphs(capture=False)
        graphs = engine.runner.decode_graphs
        assert graphs is not None
        run = graphs.run

        def counted(*args, **kwargs):
            self.calls += 1
            return run(*args, **kwargs)

        graphs.run = counted


class _CountingContinuations(_CountingGraphs):
    """Also counts the decode steps queued behind a running one (`pipeline_decode`)."""

    def __init__(self) -> None:
        super().__init__()
        self.continuations = 0

    def __call__(self, engine) -> None:
        super().__call__(engine)
        schedule = engine.scheduler.schedule_continuation

        def counted(*args, **kwargs):
            following = schedule(*args, **kwargs)
            self.continuations += following is not None
            return following

        engine.scheduler.schedule_continuation = counted


@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("num_requests", [3, 16])
@pytest.mark.parametrize("family", ["llava", "blip2", "vila", "llava_onevision"])
def test_padded_decode_path_matches_hf(references, family, num_requests, pipeline):
    ckpt, cases = references(family)
    counter = _CountingContinuations()
    engine, outputs = _run_engine(ckpt, cases, num_requests, prepare=counter, pipeline_decode=pipeline)
    assert counter.calls > 0, "no decode step took the graph path"
    assert (counter.continuations > 0) == pipeline
    assert all(b.ref_count == 0 for b in engine.scheduler.kv_cache.blocks)
    for i, (rid, tokens) in enumerate(sorted(outputs.items(), key=lambda kv: int(kv[0].split("-")[1]))):
        assert tokens == cases[i % len(cases)][1].output_token_ids, f"{family} {rid}"


def test_mllama_keeps_eager_decode(references):
    ckpt, cases = references("mllama")
    engine, outputs = _run_engine(ckpt, cases[:1], 1, prepare=lambda e: e.runner.enable_decode_graphs(capture=False))
    assert engine.runner.decode_graphs is None  # cross-attention layers loop over sequences: no graphs
    assert outputs["req-0"] == cases[0][1].output_token_ids


def test_text_prefill_chunks_run_as_graph_rows(references):
    """A prefill chunk without image rows runs on the graph path as one row per token; the result
    still equals HF's."""
    ckpt, cases = references("llava")
    text_only = [case for case in cases if "<image>" not in case[0]]
    assert text_only
    multi_row_runs = 0

    def prepare(engine):
        engine.runner.enable_decode_graphs(capture=False)
        graphs = engine.runner.decode_graphs
        run = graphs.run

        def spy(token_ids, seq_lens, tables):
            nonlocal multi_row_runs
            multi_row_runs += any(a is b for a, b in zip(tables, tables[1:], strict=False))  # a chunk's rows
            return run(token_ids, seq_lens, tables)

        graphs.run = spy

    _, outputs = _run_engine(ckpt, text_only, 3, prepare=prepare)
    assert multi_row_runs > 0
    for rid, tokens in outputs.items():
        assert tokens == text_only[0][1].output_token_ids, rid
