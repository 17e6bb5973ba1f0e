"""CUDA-graph decode on a GPU: greedy ids with graphs equal the eager engine's and HF's (fp32), and decode
steps really replay captured graphs. Requests arrive every other step, so decode batches of 1..16 rows
are padded to the 1/2/4/8/16 buckets. (tests/gpu/test_engine_gpu.py runs with graphs on too: they are
the default on CUDA.)"""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import references  # noqa: F401 - the shared HF reference fixture
from tests.engine.test_engine_parity import _run_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FAMILIES = ["llava", "blip2", "vila", "llava_onevision"]  # mllama decodes eagerly (cross-attention)


class _Replays:
    """Counts the steps one graph path (`decode_graphs` or `prefill_graphs` of the runner) serves."""

    def __init__(self, attr: str = "decode_graphs") -> None:
        self.attr = attr
        self.calls = 0

    def __call__(self, engine) -> None:
        graphs = getattr(engine.runner, self.attr)
        assert graphs is not None and graphs.graphs, f"no {self.attr} graph was captured"
        if self.attr == "prefill_graphs":
            assert set(graphs.graphs) == set(graphs.buckets), "a token bucket was not captured"
        run = graphs.run

        def counted(*args, **kwargs):
            self.calls += 1
            return run(*args, **kwargs)

        graphs.run = counted


def _outputs(ckpt, cases, dtype: str, backend: str, *, enforce_eager: bool, prepare=None) -> dict[str, list[int]]:
    _, outputs = _run_engine(
        ckpt, cases, 16, prepare=prepare, device="cuda", dtype=dtype, num_kv_blocks=512, enforce_eager=enforce_eager,
        attention_backend=backend,
    )
    return outputs


def _check_graphs_equal_eager_and_hf(references, family: str, backend: str, replays: _Replays) -> None:  # noqa: F811
    ckpt, cases = references(family)
    graphs = _outputs(ckpt, cases, "float32", backend, enforce_eager=False, prepare=replays)
    eager = _outputs(ckpt, cases, "float32", backend, enforce_eager=True)
    assert replays.calls > 0
    assert graphs == eager
    for i in range(16):
        assert graphs[f"req-{i}"] == cases[i % len(cases)][1].output_token_ids, f"{family} req-{i}"


@pytest.mark.parametrize("backend", ["batched", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_equal_eager_fp32_and_hf(references, family, backend):  # noqa: F811
    _check_graphs_equal_eager_and_hf(references, family, backend, _Replays("decode_graphs"))


@pytest.mark.parametrize("backend", ["batched", "triton"])
@pytest.mark.parametrize("family", ["llava", "vila", "llava_onevision"])
def test_prefill_graphs_equal_eager_fp32_and_hf(references, family, backend):  # noqa: F811
    """Prefill chunks, image rows and mixed steps replay the piecewise graphs (on by default with
    CUDA graphs), every token bucket captured; greedy ids equal the eager engine's and HF's."""
    _check_graphs_equal_eager_and_hf(references, family, backend, _Replays("prefill_graphs"))
