"""The piecewise prefill-graph path on CPU: the same static buffers, token buckets, padding rows and
eager attention between the segments, run without capture (`capture=False`). Greedy ids must still
equal Hugging Face's, image rows included; capture and replay are covered by tests/gpu."""

from __future__ import annotations

import pytest

from llm_service.engine.prefill_graphs import token_buckets
from tests.engine.test_engine_parity import _run_engine


def test_token_buckets():
    assert token_buckets(2048) == [16, 32, 64, 128, *range(192, 513, 64), *range(640, 2049, 128)]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(16) == [16]
    assert token_buckets(10) == [10]


class _Counting:
    """Enables both graph paths without capture and counts the steps the prefill graphs serve."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.decode_runs = 0
        self.chunk_rows_in_decode_graphs = 0

    def __call__(self, engine) -> None:
        engine.runner.max_prefill_graph_tokens = 64
        engine.runner.enable_decode_graphs(capture=False)
        engine.runner.enable_prefill_graphs(capture=False)
        decode = engine.runner.decode_graphs
        if decode is not None:
            run_decode = decode.run

            def counted_decode(token_ids, seq_lens, tables):
                self.decode_runs += 1
                self.chunk_rows_in_decode_graphs += any(a is b for a, b in zip(tables, tables[1:], strict=False))
                return run_decode(token_ids, seq_lens, tables)

            decode.run = counted_decode
        graphs = engine.runner.prefill_graphs
        if graphs is None:
            return
        run = graphs.run

        def counted(embeds, positions, meta):
            self.rows.append(embeds.shape[0])
            return run(embeds, positions, meta)

        graphs.run = counted


@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("family", ["llava", "vila", "llava_onevision"])
def test_prefill_graph_path_matches_hf(references, family, pipeline):
    ckpt, cases = references(family)
    counter = _Counting()
    engine, outputs = _run_engine(ckpt, cases, 5, prepare=counter, pipeline_decode=pipeline)
    assert counter.rows, "no step took the prefill-graph path"
    # decode steps keep their own graphs; prefill chunks never run there as one row per token
    assert counter.decode_runs > 0 and counter.chunk_rows_in_decode_graphs == 0
    # padding: steps whose row count is not a bucket ran too
    assert any(n not in engine.runner.prefill_graphs.buckets for n in counter.rows), counter.rows
    assert all(b.ref_count == 0 for b in engine.scheduler.kv_cache.blocks)
    for i, (rid, tokens) in enumerate(sorted(outputs.items(), key=lambda kv: int(kv[0].split("-")[1]))):
        assert tokens == cases[i % len(cases)][1].output_token_ids, f"{family} {rid}"


@pytest.mark.parametrize("family", ["blip2", "mllama"])
def test_models_without_the_split_stay_eager(references, family):
    ckpt, cases = references(family)
    counter = _Counting()
    engine, outputs = _run_engine(ckpt, cases[:1], 1, prepare=counter)
    assert engine.runner.prefill_graphs is None and not counter.rows
    assert outputs["req-0"] == cases[0][1].output_token_ids
