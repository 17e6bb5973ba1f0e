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
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, engine) -> None:
        graphs = engine.runner.decode_graphs
        assert graphs is not None and graphs.graphs, "no decode graph was captured"
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


@pytest.mark.parametrize("backend", ["batched", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_equal_eager_fp32_and_hf(references, family, backend):  # noqa: F811
    ckpt, cases = references(family)
    replays = _Replays()
    graphs = _outputs(ckpt, cases, "float32", backend, enforce_eager=False, prepare=replays)
    eager = _outputs(ckpt, cases, "float32", backend, enforce_eager=True)
    assert replays.calls > 0
    assert graphs == eager
    for i in range(16):
        assert graphs[f"req-{i}"] == cases[i % len(cases)][1].output_token_ids, f"{family} req-{i}"



class _PrefillReplays:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, engine) -> None:
        graphs = engine.runner.prefill_graphs
        assert graphs is not None and graphs.graphs, "no prefill graph was captured"
        assert set(graphs.graphs) == set(graphs.buckets)
        run = graphs.run

        def counted(*args, **kwargs):
            self.calls += 1
            return run(*args, **kwargs)

        graphs.run = counted


@pytest.mark.parametrize("backend", ["batched", "triton"])
@pytest.mark.parametrize("family", ["llava", "vila", "llava_onevision"])
def test_prefill_graphs_equal_eager_fp32_and_hf(references, family, backend):  # noqa: F811
    """Prefill chunks, image rows and mixed steps replay the piecewise graphs (on by default with
    CUDA graphs); greedy ids equal the eager engine's and HF's."""
    ckpt, cases = references(family)
    replays = _PrefillReplays()
    graphs = _outputs(ckpt, cases, "float32", backend, enforce_eager=False, prepare=replays)
    eager = _outputs(ckpt, cases, "float32", backend, enforce_eager=True)
    assert replays.calls > 0
    assert graphs == eager
    for i in range(16):
        assert graphs[f"req-{i}"] == cases[i % len(cases)][1].output_token_ids, f"{family} req-{i}"
