"""The CUDA fast path, checked on the CPU: flags and config, batch buckets (padding, chunking) against
unpadded eager, the warm-up that compiles every bucket before SERVING, the graph-break-free layer
walk and fused q/k/v against HF, and the host side of `encode` (dtype upload, per-image rows).

Compilation itself is faked here (CI has no GPU); tests/gpu/test_encoder_compile_gpu.py compiles.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from encoder_service.__main__ import parse_config
from encoder_service.config import EncoderConfig, default_batch_buckets
from encoder_service.engines import MediaInput, load_visual_engine
from encoder_service.engines.base import PreparedInput, rows_to_host, tensors_to_host
from encoder_service.engines.compiled import BucketedCompute, CompileSettings, parse_buckets
from encoder_service.engines.patch_embedding import PatchLinear
from encoder_service.engines.towers import LayerSelectingTower
from encoder_service.server import build_server, fast_path_settings
from tests.encoder.fakes import FakeEngine, fake_checkpoint
from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.grpc_server import ServerConfig

# -- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_batch", "buckets"),
    [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8)), (64, (1, 2, 4, 8, 16, 32, 64))],
)
def test_default_buckets_are_powers_of_two_up_to_the_batch_limit(max_batch, buckets):
    assert default_batch_buckets(max_batch) == buckets


def test_compile_is_on_by_default_with_buckets_from_the_batch_limit(tmp_path):
    config, _ = parse_config(
        ["--model", str(fake_checkpoint(tmp_path / "m")), "--max-batch-size", "16"], environ={}
    )
    assert config.compile and config.compile_mode == "default" and config.sdpa_backend == "auto"
    assert config.compile_buckets is None and config.batch_buckets == (1, 2, 4, 8, 16)


def test_compile_flags(tmp_path):
    model = str(fake_checkpoint(tmp_path / "m"))
    config, _ = parse_config(
        [
            "--model", model, "--no-compile", "--compile-mode", "max-autotune-no-cudagraphs",
            "--compile-buckets", "8,1,4,4", "--sdpa-backend", "cudnn",
        ],
        environ={},
    )  # fmt: skip
    assert not config.compile and config.compile_mode == "max-autotune-no-cudagraphs"
    assert config.compile_buckets == (1, 4, 8) == config.batch_buckets and config.sdpa_backend == "cudnn"

    assert config.compile_scope == "model"  # the default: one graph of the whole compute

    config, _ = parse_config(
        ["--model", model, "--compile-scope", "layer", "--compile-mode", "max-autotune-no-cudagraphs"],
        environ={},
    )
    assert config.compile_scope == "layer" and config.compile_mode == "max-autotune-no-cudagraphs"
    config, _ = parse_config(["--model", model], environ={"VLM_ENCODER_COMPILE_SCOPE": "layer"})
    assert config.compile_scope == "layer"

    environ = {"VLM_ENCODER_COMPILE": "false", "VLM_ENCODER_COMPILE_BUCKETS": "2,16"}
    config, _ = parse_config(["--model", model], environ=environ)
    assert not config.compile and config.batch_buckets == (2, 16)
    config, _ = parse_config(["--model", model, "--compile"], environ=environ)  # the command line wins
    assert config.compile


@pytest.mark.parametrize(
    "argv",
    [
        ["--compile-buckets", "0,2"],
        ["--compile-buckets", "two"],
        ["--compile-mode", "fast"],
        ["--sdpa-backend", "x"],
        ["--compile-scope", "block"],
        ["--compile-scope", "layer", "--compile-mode", "reduce-overhead"],  # no CUDA graphs per layer
    ],
)
def test_bad_compile_flags_are_usage_errors(tmp_path, argv, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--model", str(fake_checkpoint(tmp_path / "m")), *argv], environ={})


def test_fast_path_only_on_cuda_and_never_for_an_exported_engine(tmp_path):
    model = fake_checkpoint(tmp_path / "m")
    assert fast_path_settings(EncoderConfig(model_dir=model, device="cpu")) is None  # CI: eager
    settings = fast_path_settings(EncoderConfig(model_dir=model, device="cuda:1", max_batch_size=4))
    assert settings == CompileSettings(
        compile=True, mode="default", buckets=(1, 2, 4), sdpa_backend="auto", cuda_graphs=True
    )
    no_graphs = fast_path_settings(EncoderConfig(model_dir=model, device="cuda", cuda_graphs=False))
    assert no_graphs is not None and not no_graphs.cuda_graphs
    assert fast_path_settings(EncoderConfig(model_dir=model, device="cuda", compile=False)) is None
    layer = fast_path_settings(EncoderConfig(model_dir=model, device="cuda", compile_scope="layer"))
    assert layer is not None and layer.scope == "layer" and not layer.cuda_graphs  # no graphs per layer
    pinned = fast_path_settings(
        EncoderConfig(model_dir=model, device="cuda", compile=False, sdpa_backend="flash")
    )
    assert pinned == CompileSettings(compile=False, buckets=(), sdpa_backend="flash")  # eager, SDPA pinned
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    assert fast_path_settings(EncoderConfig(model_dir=model, device="cuda", engine_dir=engine_dir)) is None


def test_compile_settings_validate(tmp_path):
    assert parse_buckets("4, 1,2") == (1, 2, 4)
    for text in ("", "a", "0"):
        with pytest.raises(ValueError):
            parse_buckets(text)
    with pytest.raises(ValueError):
        CompileSettings(mode="turbo")
    with pytest.raises(ValueError):
        CompileSettings(compile=True, buckets=())
    with pytest.raises(ValueError):
        CompileSettings(scope="block")
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="without CUDA graphs"):
            CompileSettings(scope="layer", mode=mode)
    with pytest.raises(InvalidArgumentError):
        EncoderConfig(
            model_dir=fake_checkpoint(tmp_path / "m"), compile_scope="layer", compile_mode="max-autotune"
        )


# -- BucketedCompute --------------------------------------------------------------------------------------


class RowWise(nn.Module):
    """out[i] = f(x[i]) (like the towers); records the batch sizes it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return torch.tanh(x @ self.weight)


class FakeCompiler:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, module, **kwargs):
        self.calls.append(kwargs)
        return module


@pytest.mark.parametrize(
    ("rows", "runs"), [(1, [2]), (2, [2]), (3, [4]), (4, [4]), (9, [4, 4, 2]), (12, [4, 4, 4])]
)
def test_batches_are_padded_to_a_bucket_and_split_above_the_largest(rows, runs):
    module, compiler = RowWise(), FakeCompiler()
    bucketed = BucketedCompute(module, CompileSettings(mode="default", buckets=(2, 4)), compiler=compiler)
    assert compiler.calls == [{"mode": "default", "dynamic": False}]  # compiled once, static shapes
    x = torch.randn(rows, 3)
    out = bucketed(x)
    assert module.calls == runs
    assert torch.equal(out, torch.tanh(x @ module.weight))  # padding never leaks into real rows


def test_warm_up_runs_every_bucket_once():
    module = RowWise()
    bucketed = BucketedCompute(module, CompileSettings(buckets=(1, 4, 16)), compiler=FakeCompiler())
    from encoder_service.engines.base import ComputeInput

    bucketed.warm_up([ComputeInput("x", (3,), torch.float32)], torch.device("cpu"))
    assert module.calls == [1, 4, 16] and sorted(bucketed.compile_seconds) == [1, 4, 16]


def test_a_failing_compile_falls_back_to_eager(caplog):
    module = RowWise()

    def broken(*inputs):
        raise RuntimeError("inductor exploded")

    bucketed = BucketedCompute(module, CompileSettings(buckets=(2, 4)), compiler=lambda m, **kw: broken)
    from encoder_service.engines.base import ComputeInput

    bucketed.warm_up([ComputeInput("x", (3,), torch.float32)], torch.device("cpu"))
    assert not bucketed.compiled and "inductor exploded" in bucketed.fallback_reason
    assert "runs eager" in caplog.text
    x = torch.randn(3, 3)
    assert torch.equal(bucketed(x), torch.tanh(x @ module.weight))


def test_without_buckets_inputs_run_as_they_are():
    module = RowWise()
    bucketed = BucketedCompute(module, CompileSettings(compile=False, buckets=(), sdpa_backend="math"))
    bucketed(torch.randn(5, 3))
    assert module.calls == [5]


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    return load_visual_engine(tiny_checkpoint("llava"))


def _pixels(engine, rows: int, seed: int = 0) -> torch.Tensor:
    size = engine.image_size
    return torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_buckets_give_the_features_of_unpadded_eager(llava):
    bucketed = BucketedCompute(llava.compute, CompileSettings(compile=False, buckets=(2, 4)))
    for rows in (1, 3, 4, 5, 11):
        x = _pixels(llava, rows, seed=rows)
        expected = llava.compute(x)
        got = bucketed(x)
        assert got.shape == expected.shape
        # BLAS may block other batch sizes differently
        assert (got - expected).abs().max().item() <= 1e-5, rows


def test_engine_encode_through_buckets_equals_eager(tiny_checkpoint, llava):
    fast = load_visual_engine(tiny_checkpoint("llava"))
    assert fast.enable_fast_path(CompileSettings(compile=False, buckets=(2, 4)))
    assert not fast.enable_fast_path(CompileSettings(compile=False, buckets=(2, 4)))  # never wrapped twice
    images = [_image(seed) for seed in range(5)]
    media = [MediaInput(images=images[:3]), MediaInput(images=images[3:])]
    got = fast.encode([fast.preprocess(m) for m in media])
    expected = llava.encode([llava.preprocess(m) for m in media])
    assert [(o.input_index, o.item_index) for o in got] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    for ours, theirs in zip(got, expected, strict=True):
        assert (ours.features - theirs.features).abs().max().item() <= 1e-5
    # the wrapper keeps the engine's roles and weights
    assert (
        sorted(fast.submodules()) == sorted(llava.submodules()) == ["multi_modal_projector", "vision_tower"]
    )
    assert fast.num_parameters() == llava.num_parameters()


def _image(seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(30 + seed, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("family", "applies"),
    [("llava", True), ("vila", True), ("llava_onevision", True), ("blip2", False), ("mllama", False)],
)
def test_fast_path_is_for_the_llava_style_towers(tiny_checkpoint, family, applies):
    engine = load_visual_engine(tiny_checkpoint(family))
    assert engine.enable_fast_path(CompileSettings(compile=False, buckets=(1, 2))) is applies
    assert isinstance(engine.compute, BucketedCompute) is applies


def test_load_engine_stays_eager_on_cpu_with_compile_on(tiny_checkpoint):
    from encoder_service.server import load_engine

    engine = load_engine(EncoderConfig(model_dir=tiny_checkpoint("llava"), device="cpu", compile=True))
    assert not isinstance(engine.compute, BucketedCompute)


# -- regional compile (scope "layer") --------------------------------------------------------------------


def _dynamo_only(module, *, mode, dynamic):
    """torch.compile with Dynamo's tracing and caching but no Inductor: fast enough for CI."""
    assert mode == "default"
    return torch.compile(module, backend="eager", dynamic=dynamic)


def test_layer_scope_compiles_each_layer_and_the_projector_apart(llava):
    compute = llava.compute
    compiler = FakeCompiler()
    bucketed = BucketedCompute(compute, CompileSettings(scope="layer", buckets=(2, 4)), compiler=compiler)
    num_layers = len(compute.vision_tower.encoder_layers)
    assert num_layers == compute.vision_tower.num_layers_kept  # the truncated tower: layers after -2 are gone
    assert compiler.calls == [{"mode": "default", "dynamic": False}] * (num_layers + 1)  # layers + projector
    assert bucketed.compiled and bucketed.wrapped_module is compute
    x = _pixels(llava, 3, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(bucketed(x), compute(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_layer_scope_shares_one_graph_across_layers(tiny_checkpoint):
    """Dynamo traces the first layer once and every layer reuses that graph (weights are graph inputs):
    one bucket costs one layer graph plus one projector graph, whatever the depth."""
    from torch._dynamo.utils import counters

    engine = load_visual_engine(tiny_checkpoint("llava"))
    eager = engine.compute
    assert len(eager.vision_tower.encoder_layers) >= 2
    settings = CompileSettings(scope="layer", buckets=(1, 4))
    bucketed = engine.compute = BucketedCompute(eager, settings, compiler=_dynamo_only)
    torch._dynamo.reset()
    try:
        before = counters["stats"]["unique_graphs"]
        engine.warm_up()
        assert counters["stats"]["unique_graphs"] - before == 2 * 2  # (layer, projector) per bucket
        for rows in (1, 3):
            x = _pixels(engine, rows, seed=rows)
            torch.testing.assert_close(bucketed(x), eager(x), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] - before == 4  # no compile after warm-up
    finally:
        torch._dynamo.reset()
    # the eager modules are untouched: same weights, same names, nothing compiled in place
    assert sorted(engine.submodules()) == ["multi_modal_projector", "vision_tower"]
    assert all(type(layer).__name__ == "CLIPEncoderLayer" for layer in eager.vision_tower.encoder_layers)


def test_layer_scope_falls_back_to_eager_when_compiling_fails(llava, caplog):
    def broken(module, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded on a layer")

        return run

    bucketed = BucketedCompute(llava.compute, CompileSettings(scope="layer", buckets=(2,)), compiler=broken)
    assert bucketed.compiled
    bucketed.warm_up(llava.compute_inputs(), torch.device("cpu"))
    assert not bucketed.compiled and "exploded on a layer" in bucketed.fallback_reason
    assert "runs eager" in caplog.text
    x = _pixels(llava, 2, seed=5)
    with torch.no_grad():
        assert torch.equal(bucketed(x), llava.compute(x))


def test_layer_scope_needs_a_compute_with_regions():
    with pytest.raises(ValueError, match="per layer"):
        BucketedCompute(RowWise(), CompileSettings(scope="layer", buckets=(2,)), compiler=FakeCompiler())
    # without compile the scope does not matter
    BucketedCompute(RowWise(), CompileSettings(compile=False, scope="layer", buckets=(2,)))


@pytest.mark.parametrize("family", ["llava", "vila", "llava_onevision"])
def test_every_compilable_family_has_regions(tiny_checkpoint, family):
    engine = load_visual_engine(tiny_checkpoint(family))
    assert engine.enable_fast_path(CompileSettings(compile=False, scope="layer", buckets=(1, 2)))
    regions = engine.compute.module.compiled_regions(lambda module: module)  # identity "compiler"
    size = engine.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(regions(x), engine.compute.module(x))


# -- warm-up before SERVING ------------------------------------------------------------------------------


class WarmUpRecorder(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.warm_up_thread: str | None = None

    def warm_up(self) -> None:
        self.warm_up_thread = threading.current_thread().name
        self.release.wait(timeout=30)


def test_health_turns_serving_only_after_the_engine_warm_up(tmp_path):
    """The warm-up (where a compiled engine compiles its buckets) runs in the model thread, and
    health stays NOT_SERVING until it has finished."""
    engine = WarmUpRecorder()
    config = EncoderConfig(
        model_dir=fake_checkpoint(tmp_path / "m"),
        server=ServerConfig(host="127.0.0.1", port=0, grace_period_s=1.0),
    )

    async def scenario():
        import grpc

        server = build_server(config, engine)
        channel = grpc.aio.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            await server.start(warm_up=False)
            warm = asyncio.create_task(server.warm_up())
            for _ in range(100):
                if engine.warm_up_thread is not None:
                    break
                await asyncio.sleep(0.02)
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING and not server.pipeline.is_ready
            engine.release.set()
            await warm
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        finally:
            engine.release.set()
            await channel.close()
            await server.stop_now()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert engine.warm_up_thread.startswith("encoder-model")  # the thread that runs every batch
    assert engine.num_encode_calls == 1  # then the one dummy image


def test_engine_warm_up_compiles_each_bucket(llava, tiny_checkpoint):
    engine = load_visual_engine(tiny_checkpoint("llava"))
    compiler = FakeCompiler()
    engine.compute = BucketedCompute(engine.compute, CompileSettings(buckets=(1, 2, 4)), compiler=compiler)
    calls: list[tuple[int, ...]] = []
    inner = engine.compute.module
    handle = inner.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    try:
        engine.warm_up()
    finally:
        handle.remove()
    size = engine.image_size
    assert calls == [(1, 3, size, size), (2, 3, size, size), (4, 3, size, size)]
    assert len(compiler.calls) == 1


# -- the tower: layer walk, fused q/k/v, no graph breaks -------------------------------------------------


def _tiny_tower_configs():
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4}
    return {
        "clip": CLIPVisionConfig(image_size=28, patch_size=14, **common),
        "siglip": SiglipVisionConfig(image_size=28, patch_size=14, **common),
    }


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("layers", [-2, -1, [-3, 1]])
@pytest.mark.parametrize("fuse", [True, False])
@torch.no_grad()
def test_layer_walk_returns_hf_hidden_states(kind, layers, fuse):
    from transformers import AutoModel

    torch.manual_seed(0)
    config = _tiny_tower_configs()[kind]
    reference = AutoModel.from_config(config).eval()
    x = torch.randn(3, 3, 28, 28)
    hidden_states = reference(pixel_values=x, output_hidden_states=True).hidden_states
    tower = AutoModel.from_config(config).eval()
    tower.load_state_dict(reference.state_dict())
    selecting = LayerSelectingTower(tower, layers, fuse_qkv=fuse, unfold_patches=fuse)
    assert selecting.walks_layers and selecting.fused_qkv is fuse and selecting.unfolds_patches is fuse
    assert isinstance(tower.embeddings.patch_embedding, PatchLinear) is fuse
    indices = [layers] if isinstance(layers, int) else layers
    expected = torch.cat([hidden_states[i] for i in indices], dim=-1)
    torch.testing.assert_close(selecting(x), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_an_unknown_tower_runs_hf_forward_with_hooks():
    from transformers import AutoModel, CLIPVisionModel

    class OtherVisionModel(CLIPVisionModel):
        pass

    config = _tiny_tower_configs()["clip"]
    reference = AutoModel.from_config(config).eval()
    other = OtherVisionModel(config).eval()
    other.load_state_dict(reference.state_dict())
    selecting = LayerSelectingTower(other, -2)
    assert not selecting.walks_layers and not selecting.fused_qkv and not selecting.unfolds_patches
    x = torch.randn(2, 3, 28, 28)
    expected = reference(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(selecting(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "vila", "llava_onevision"])
def test_compute_traces_as_one_graph(tiny_checkpoint, family):
    """No graph breaks: torch.compile sees the whole tower + projector (the hooks and the lock of the
    old forward split it)."""
    import torch._dynamo

    engine = load_visual_engine(tiny_checkpoint(family))
    assert engine.compute.vision_tower.fused_qkv and engine.compute.vision_tower.unfolds_patches
    size = engine.image_size
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(engine.compute)(torch.randn(2, 3, size, size))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


# -- host side of encode -----------------------------------------------------------------------------------


def test_rows_to_host_gives_each_row_its_own_storage():
    features = torch.randn(3, 4, 5)
    rows = rows_to_host(features)
    assert len(rows) == 3
    for row, original in zip(rows, features, strict=True):
        assert torch.equal(row, original) and row.is_contiguous()
        assert row.untyped_storage().nbytes() == row.numel() * row.element_size()
    single = torch.randn(1, 4, 5)
    [only] = rows_to_host(single)
    assert only.data_ptr() == single.data_ptr()  # already its own: no copy
    assert rows_to_host(torch.empty(0, 4)) == []


def test_tensors_to_host_keeps_owned_tensors_and_copies_views():
    owned, base = torch.randn(3, 4), torch.randn(6, 4)
    view = base[2:5]
    got = tensors_to_host([owned, view])
    assert got[0] is owned  # already its own storage on the CPU: no copy
    assert torch.equal(got[1], view)
    assert got[1].untyped_storage().nbytes() == view.numel() * view.element_size()
    assert tensors_to_host([]) == []


def test_tower_batch_is_in_the_engine_dtype(tiny_checkpoint):
    engine = load_visual_engine(tiny_checkpoint("llava"), dtype=torch.bfloat16)
    a, b = _pixels(engine, 2, seed=1), _pixels(engine, 1, seed=2)
    batch = [PreparedInput("llava", "image", p, (1,) * len(p), (None,) * len(p)) for p in (a, b)]
    pixels = engine._tower_batch(batch)
    assert pixels.dtype == torch.bfloat16 and torch.equal(pixels, torch.cat([a, b]).to(torch.bfloat16))
