"""The encoder's CUDA fast path on a GPU: compiled (static batch buckets) features equal eager's within
the bf16 tolerance, no compile happens after warm-up, and the host side of `encode` (pinned bf16
upload, per-image download) gives owned, pageable CPU tensors.

bf16 tolerance, as for the exported engines (tests/deploy/test_export_visual_engine.py): against
eager fp32 on the same weights, the compiled engine's relative L2 error is at most twice eager
bf16's own (floor 1e-2), and it is within 5e-2 of eager bf16. Inductor fuses and reorders
reductions, so bit equality with eager bf16 is not expected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.engines import MediaInput, load_visual_engine
from encoder_service.engines.compiled import BucketedCompute, CompileSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BUCKETS = (1, 2, 4)


def _images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(count)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _features(engine, batch) -> torch.Tensor:
    outputs = engine.encode(batch)
    for output in outputs:
        features = output.features
        assert features.device.type == "cpu" and not features.is_pinned()
        assert features.untyped_storage().nbytes() == features.numel() * features.element_size()
    return torch.stack([o.features for o in outputs])


def _assert_matches_eager(fast, eager, reference, *, seed: int) -> None:
    """`fast`'s features equal eager bf16's within the bf16 tolerance (fp32 as the reference) for
    batches that hit a bucket, pad up to one, and run in chunks (6 = 4 + 2)."""
    for count in (1, 3, 4, 6):
        batch = [eager.preprocess(MediaInput(images=_images(count, seed=seed + count)))]
        ours, bf16, fp32 = (_features(e, batch) for e in (fast, eager, reference))
        assert ours.dtype == torch.bfloat16 and ours.shape == bf16.shape == (count, 16, 64)
        assert _relative(ours, fp32) <= max(2 * _relative(bf16, fp32), 1e-2), (
            _relative(ours, fp32),
            _relative(bf16, fp32),
        )
        assert _relative(ours, bf16) <= 5e-2, _relative(ours, bf16)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    checkpoint = tiny_checkpoint("llava")
    eager = load_visual_engine(checkpoint, device="cuda", dtype=torch.bfloat16)
    reference = load_visual_engine(checkpoint, device="cuda", dtype=torch.float32)
    fast = load_visual_engine(checkpoint, device="cuda", dtype=torch.bfloat16)
    assert fast.enable_fast_path(CompileSettings(mode="default", buckets=BUCKETS))
    torch._dynamo.reset()
    fast.warm_up()
    return eager, reference, fast


def test_compiled_features_equal_eager_within_bf16_tolerance(engines):
    from torch._dynamo.utils import counters

    eager, reference, fast = engines
    assert sorted(fast.compute.compile_seconds) == list(BUCKETS)
    graphs = counters["stats"]["unique_graphs"]
    _assert_matches_eager(fast, eager, reference, seed=0)
    assert counters["stats"]["unique_graphs"] == graphs  # every shape was compiled during warm-up


def test_layer_scope_features_equal_eager_within_bf16_tolerance(engines, tiny_checkpoint):
    """Regional compile (each layer and the projector apart, one graph shared by the layers) gives
    eager's features within the bf16 tolerance, compiles two graphs per bucket, none after warm-up."""
    from torch._dynamo.utils import counters

    eager, reference, _ = engines
    fast = load_visual_engine(tiny_checkpoint("llava"), device="cuda", dtype=torch.bfloat16)
    assert fast.enable_fast_path(CompileSettings(mode="default", scope="layer", buckets=BUCKETS))
    before = counters["stats"]["unique_graphs"]
    fast.warm_up()
    assert fast.compute.compiled and sorted(fast.compute.compile_seconds) == list(BUCKETS)
    assert counters["stats"]["unique_graphs"] - before == 2 * len(BUCKETS)  # (layer, projector) per bucket
    graphs = counters["stats"]["unique_graphs"]
    _assert_matches_eager(fast, eager, reference, seed=20)
    assert counters["stats"]["unique_graphs"] == graphs


def test_onevision_host_path_matches_cpu(tiny_checkpoint):
    """OneVision packs every item on the device and downloads them all after one wait."""
    checkpoint = tiny_checkpoint("llava_onevision")
    cpu = load_visual_engine(checkpoint)
    cuda = load_visual_engine(checkpoint, device="cuda")
    images = _images(3, seed=30)
    batch = [
        cpu.preprocess(MediaInput(images=images[:1])),  # one image: anyres tiles
        cpu.preprocess(MediaInput(images=images[1:])),  # two images: one crop each
    ]
    got, expected = cuda.encode(batch), cpu.encode(batch)
    assert [(o.input_index, o.item_index, o.num_rows) for o in got] == [
        (o.input_index, o.item_index, o.num_rows) for o in expected
    ]
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.features.device.type == "cpu" and not ours.features.is_pinned()
        assert _relative(ours.features, theirs.features) <= 1e-2


def test_cuda_eager_host_path_matches_cpu(tiny_checkpoint):
    """Pinned upload and chunked download on CUDA give what the CPU engine gives (fp32)."""
    checkpoint = tiny_checkpoint("llava")
    cpu = load_visual_engine(checkpoint)
    cuda = load_visual_engine(checkpoint, device="cuda")
    batch = [cpu.preprocess(MediaInput(images=_images(count, seed=10 + count))) for count in (2, 5)]
    assert _relative(_features(cuda, batch), _features(cpu, batch)) <= 1e-2  # cuDNN convs may use TF32


def test_reduce_overhead_mode_copes_with_chunks(engines, tiny_checkpoint):
    """CUDA-graph outputs are overwritten by the next replay: chunked calls must still be right."""
    eager, reference, _ = engines
    fast = load_visual_engine(tiny_checkpoint("llava"), device="cuda", dtype=torch.bfloat16)
    assert fast.enable_fast_path(CompileSettings(mode="reduce-overhead", buckets=(2,)))
    torch._dynamo.reset()
    fast.warm_up()
    batch = [eager.preprocess(MediaInput(images=_images(5, seed=5)))]  # 2 + 2 + 1 (padded to 2)
    ours, bf16 = _features(fast, batch), _features(eager, batch)
    assert _relative(ours, bf16) <= 5e-2, _relative(ours, bf16)
    for i in range(1, 5):  # no two images share a (replayed-over) buffer
        assert not torch.equal(ours[i], ours[0])


def test_the_service_config_turns_the_fast_path_on(tiny_checkpoint):
    from encoder_service.server import load_engine

    config = EncoderConfig(
        model_dir=tiny_checkpoint("llava"), device="cuda", dtype="bfloat16", max_batch_size=4
    )
    engine = load_engine(config)
    assert isinstance(engine.compute, BucketedCompute) and engine.compute.buckets == (1, 2, 4)
    off = load_engine(EncoderConfig(model_dir=tiny_checkpoint("llava"), device="cuda", compile=False))
    assert not isinstance(off.compute, BucketedCompute)


def test_cuda_graph_replay_equals_eager_and_outputs_survive_the_next_call(engines, tiny_checkpoint):
    """Compiled buckets captured in CUDA graphs (the service default): every bucket is captured, the
    features equal eager's within the bf16 tolerance (padded and chunked batches too), and a result
    is not overwritten by the next replay."""
    eager, reference, _ = engines
    fast = load_visual_engine(tiny_checkpoint("llava"), device="cuda", dtype=torch.bfloat16)
    assert fast.enable_fast_path(CompileSettings(mode="default", buckets=BUCKETS, cuda_graphs=True))
    fast.warm_up()
    assert sorted(fast.compute._graphs) == list(BUCKETS)
    replays = 0
    for _, (graph, _, _) in fast.compute._graphs.items():
        original = graph.replay

        def counted(original=original):
            nonlocal replays
            replays += 1
            original()

        graph.replay = counted
    first_batch = [eager.preprocess(MediaInput(images=_images(3, seed=40)))]
    first = _features(fast, first_batch)
    kept = first.clone()
    _assert_matches_eager(fast, eager, reference, seed=50)
    assert torch.equal(first, kept)
    assert replays >= 6  # 3, then 1, 3, 4, 6 (= 4 + 2): every call replayed


@pytest.mark.parametrize(("image", "bias"), [(336, False), (384, True)])  # CLIP-L/14-336; SigLIP-384/14
@torch.no_grad()
def test_patch_gemm_is_as_close_to_exact_as_the_convolution(image, bias):
    """`PatchLinear` (one cuBLAS GEMM) against the cuDNN convolution it replaces, both against a float64
    convolution on the host: in bf16 and fp32, its relative L2 error is at most twice the convolution's
    (floor 1e-5 for fp32, whose cuDNN convolution may run on TF32, 1e-2 for bf16)."""
    from torch import nn

    from encoder_service.engines.patch_embedding import PatchLinear

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 1024, 14, 14, bias=bias)
    pixels = torch.randn(4, 3, image, image)
    exact = conv.double()(pixels.double())
    for dtype, floor in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        cuda_conv = nn.Conv2d(3, 1024, 14, 14, bias=bias).to("cuda", dtype)
        cuda_conv.load_state_dict(conv.state_dict())
        x = pixels.to("cuda", dtype)
        expected, got = cuda_conv(x), PatchLinear(cuda_conv)(x)
        assert got.shape == expected.shape and got.dtype == dtype
        conv_error, gemm_error = (_relative(t.cpu().double(), exact) for t in (expected, got))
        assert gemm_error <= max(2 * conv_error, floor), (dtype, gemm_error, conv_error)
