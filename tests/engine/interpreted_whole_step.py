"""Run by tests/engine/test_prefill_graphs.py in a subprocess with TRITON_INTERPRET=1 (it must be set before
the Triton kernels are defined): the whole-step prefill path (attention inside the step, static tile
table padded with -1) with the triton backend on CPU, without capture. Its file name keeps the normal
collection away from it."""

from __future__ import annotations

import os

import pytest

from tests.engine.test_engine_parity import _run_engine
from tests.engine.test_prefill_graphs import _Counting


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 from the start")
@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_whole_step_path_matches_hf(references, family):
    ckpt, cases = references(family)
    counter = _Counting(whole_steps=True)
    engine, outputs = _run_engine(ckpt, cases, 3, prepare=counter, attention_backend="triton", dtype="float32")
    graphs = engine.runner.prefill_graphs
    assert graphs is not None and graphs.whole is not None
    assert counter.whole_steps > 0, "no step took the whole-step path"
    assert counter.piecewise_steps > 0, "no step with decode rows took the piecewise path"
    for i, (rid, tokens) in enumerate(sorted(outputs.items(), key=lambda kv: int(kv[0].split("-")[1]))):
        assert tokens == cases[i % len(cases)][1].output_token_ids, f"{family} {rid}"
