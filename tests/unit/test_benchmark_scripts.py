"""The LLM benchmark scripts run end to end on CPU (`--tiny`), write their JSON, and `summary.py`
picks the headline figures out of them (nulls with a reason for what is missing)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their shared llm_setup module
    return lambda name: importlib.import_module(name)


def test_decode_throughput_and_summary_smoke(scripts, tmp_path):
    out = tmp_path / "results"
    assert scripts("bench_decode").main([
        "--tiny", "--device", "cpu", "--out", str(out), "--systems", "engine_eager,hf_dynamic",
        "--inputs", "8", "--outputs", "4", "--repeats", "1",
    ]) == 0
    decode = json.loads((out / "decode_bs1.json").read_text())
    assert {r["system"] for r in decode["results"]} == {"engine_eager", "hf_dynamic"}
    assert decode["headline"]["decode_bs1_ms_per_token"] > 0 and decode["hbm_floor_ms_per_token"] > 0

    assert scripts("bench_throughput").main([
        "--tiny", "--device", "cpu", "--out", str(out), "--systems", "engine,hf_static",
        "--scenarios", "8/4", "--concurrency", "2",
    ]) == 0
    points = json.loads((out / "throughput.json").read_text())["points"]
    assert {(p["system"], p["output_tokens"]) for p in points} == {("engine", 16), ("hf_static", 16)}
    # the HF baselines can run at fewer concurrencies and with fewer requests than our engine
    assert scripts("bench_throughput").main([
        "--tiny", "--device", "cpu", "--out", str(out), "--systems", "engine,hf_static", "--merge",
        "--scenarios", "8/4", "--concurrency", "1,2", "--hf-concurrency", "2",
        "--hf-requests-per-concurrency", "1", "--hf-min-requests", "1",
    ]) == 0
    points = json.loads((out / "throughput.json").read_text())["points"]
    assert sorted((p["system"], p["concurrency"], p["num_requests"]) for p in points) == [
        ("engine", 1, 4), ("engine", 2, 4), ("hf_static", 2, 2)
    ]

    summary = scripts("summary").summarize(out)
    assert summary["decode_bs1_ms_per_token"] == decode["headline"]["decode_bs1_ms_per_token"]
    assert summary["throughput_128_128_c256_tok_s"] is None  # the smoke run has no 128/128 c256 point
    assert "128/128" in summary["sources"]["throughput_128_128_c256_tok_s"]["reason"]
    assert summary["targets"]["decode_bs1_ms_per_token"]["target"].startswith("<= 5.5 ms/token")
    assert summary["targets"]["decode_bs1_ms_per_token"]["met"] is None  # not judged off an H100


def test_throughput_step_timeline_smoke(scripts, tmp_path):
    """`--step-timeline`: one row per engine step that ran work, split into prefill and decode-only
    steps that add up to the run; GPU columns are absent on CPU; the engine is left unwrapped."""
    assert scripts("bench_throughput").main([
        "--tiny", "--device", "cpu", "--out", str(tmp_path), "--systems", "engine",
        "--scenarios", "8/4", "--concurrency", "2", "--step-timeline", "--no-gc-freeze",
    ]) == 0
    (point,) = json.loads((tmp_path / "throughput.json").read_text())["points"]
    assert point["system"] == "engine_gc"  # the variant without the freeze keeps its own name
    timeline = point["step_timeline"]
    steps = timeline["steps"]
    assert len(steps) == timeline["with_prefill"]["steps"] + timeline["decode_only"]["steps"] <= point["num_steps"]
    columns = timeline["steps_columns"]
    rows = [dict(zip(columns, step, strict=True)) for step in steps]
    # 4 requests of 8 prompt tokens each: every prompt token is prefilled exactly once
    assert sum(r["prefill_tokens"] for r in rows) == timeline["with_prefill"]["prefill_tokens"] == 4 * 8
    assert all(r["step_ms"] >= r["wait_ms"] >= 0 and r["gpu_ms"] == 0 for r in rows)
    assert timeline["decode_only"]["mean_gpu_ms"] is None  # no CUDA events off the GPU
    assert set(timeline["gc_passes"]) == {"0", "1", "2"}
    import torch

    llm_setup = scripts("llm_setup")
    models = llm_setup.build_models(tiny=True, device="cpu", dtype=torch.float32)
    engine = llm_setup.build_engine(models, max_num_seqs=2, max_num_batched_tokens=64, freeze_gc=False)
    launch = engine.runner.launch
    timeline = llm_setup.StepTimeline(engine)
    assert engine.runner.launch is not launch
    timeline.close()
    assert engine.runner.launch == launch  # the engine is left as it was


def test_profile_prefill_smoke(scripts, tmp_path, tiny_checkpoint):
    """The engine-side TTFT profile on the tiny llava: image, repeat (prefix hit) and text cases."""
    assert scripts("profile_prefill").main([
        "--model", str(tiny_checkpoint("llava")), "--device", "cpu", "--out", str(tmp_path), "--runs", "1",
        "--image-rows", "16",
    ]) == 0
    point = json.loads((tmp_path / "profile_prefill.json").read_text())["variants"]["default"]
    assert point["image"]["prompt_tokens"] == point["image_repeat"]["prompt_tokens"] == point["text"]["prompt_tokens"]
    assert point["image"]["cached_tokens"] == 0 and point["image_repeat"]["cached_tokens"] > 0
    assert point["profile_image"]["wall_ms_profiled"] > 0


def test_profile_prefill_trace_smoke(scripts, tmp_path, tiny_checkpoint):
    """--trace: Chrome traces of an image and a repeat prefill, and a cProfile of a repeat."""
    assert scripts("profile_prefill").main([
        "--model", str(tiny_checkpoint("llava")), "--device", "cpu", "--out", str(tmp_path), "--runs", "1",
        "--image-rows", "16", "--trace",
    ]) == 0
    point = json.loads((tmp_path / "profile_prefill.json").read_text())["variants"]["default"]
    assert point["trace_repeat"]["timing"]["cached_tokens"] > 0 == point["trace_image"]["timing"]["cached_tokens"]
    for name in ("trace_prefill_default_image.json", "trace_prefill_default_repeat.json"):
        assert json.loads((tmp_path / name).read_text())["traceEvents"], name
    assert "cumulative" in (tmp_path / "profile_prefill_default_repeat_host.txt").read_text()


def test_gpu_only_scripts_import_and_classify(scripts):
    """What runs only on a GPU is at least importable here: the skinny GEMM tuner (its grid includes
    every config the engine's calibration may pick) and the encoder kernel-profile classifier."""
    from llm_service.layers.triton_skinny import CANDIDATES

    tuner = scripts("tune_skinny_gemm")
    for rows, configs in CANDIDATES.items():
        assert set(configs) <= set(tuner.GRID[rows])
    category = scripts("bench_encoder").kernel_category
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == "attention"
    assert category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT") == "gemm"
    assert category("triton_poi_fused_mul_sigmoid_view_2") == "triton_fused"
    assert category("void cudnn::engines_precompiled::nchwToNhwcKernel<...>") == "patch_conv"
    assert category("Memcpy DtoD (Device -> Device)") == "copy"
    assert callable(scripts("profile_host_upload").main)
    # the decode-kernel sweep covers the launch shape the engine picks at every batch
    from llm_service.layers.triton_decode import config_for

    swept = scripts("tune_decode_kernel").sweep_configs()
    assert all(config_for(b, 32) in swept for b in (1, 8, 64, 256))
    fp8 = scripts("tune_decode_kernel").sweep_configs("fp8")  # a superset, with 256-key tiles
    assert set(swept) < set(fp8) and {c.block_n for c in fp8} - {c.block_n for c in swept} == {256}


def test_profile_decode_step_with_a_prefill_wave_smoke(scripts, tmp_path):
    """Decode steps at a batch and a prefill wave of new prompts: every request of the wave gets its
    first token, over more than one step when the wave exceeds the step budget."""
    assert scripts("profile_decode_step").main([
        "--tiny", "--device", "cpu", "--out", str(tmp_path), "--batches", "2", "--steps", "2",
        "--context", "8", "--prefill-wave", "6x16", "--max-num-batched-tokens", "32",
    ]) == 0
    result = json.loads((tmp_path / "profile_decode_step.json").read_text())
    wave = result["prefill_wave"]
    assert wave["requests"] == 6 and wave["max_num_batched_tokens"] == 32
    assert len(wave["step_ms"]) >= 3  # 96 prompt tokens at 32 per step
    assert [p["batch"] for p in result["points"]] == [2]
    assert "self_cpu_time_total" in (tmp_path / "profile_wave_6x16_kernels.txt").read_text()
    assert "engine_core.py" in (tmp_path / "profile_wave_6x16_host.txt").read_text()  # cProfile of a step


def test_shared_memory_read_profile_smoke(scripts, tmp_path):
    assert scripts("profile_shm_read").main([
        "--out", str(tmp_path), "--bytes", str(3 << 20), "--reads", "3", "--region-mb", "16",
    ]) == 0
    variants = json.loads((tmp_path / "profile_shm_read.json").read_text())["variants"]
    assert set(variants) == {"neither", "populate", "huge_pages", "both", "reader"}
    assert all(v["median_ms"] > 0 for v in variants.values())


def test_attention_micro_benchmark_smoke(scripts, tmp_path):
    assert scripts("bench_attention").main([
        "--device", "cpu", "--out", str(tmp_path), "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--iters", "1", "--layouts", "mixed_31dec_1x256",
    ]) == 0
    row = json.loads((tmp_path / "attention_micro.json").read_text())["layouts"]["mixed_31dec_1x256"]
    for variant in ("batched", "one_group", "gqa_enable", "gqa_repeat"):
        assert row[variant]["rel_err_vs_reference"] < 1e-5, variant


def test_prefill_attention_benchmark_smoke(scripts, tmp_path, monkeypatch):
    """Tiny shapes on CPU: the batched path and the SDPA bound checked and timed; the Triton variants
    skipped off CUDA (the interpreter cases cover the kernel), varlen recorded as unavailable."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "prefill_attention.json"
    assert scripts("bench_prefill_attention").main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["shapes"]) == {"1x37", "3x16", "2x20_prefix9"}
    for name, row in data["shapes"].items():
        variants = row["variants"]
        assert variants["batched"]["status"] == "ok" and variants["batched"]["max_abs_diff"] < 1e-4, name
        assert variants["triton"]["status"] == "skipped" and variants["varlen"]["status"] == "unavailable"
    assert data["shapes"]["3x16"]["variants"]["sdpa_causal"]["status"] == "ok"
    assert data["shapes"]["2x20_prefix9"]["variants"]["sdpa_causal"]["status"] == "n/a"  # cached prefix
    assert out.with_suffix(".png").is_file() or importlib.util.find_spec("matplotlib") is None


def test_multimodal_benchmark_smoke(scripts, tmp_path):
    """Both services as child processes on the tiny llava checkpoint, the SDK from two threads."""
    out = tmp_path / "results"
    assert scripts("bench_multimodal").main([
        "--tiny", "--out", str(out), "--concurrency", "1,2", "--outputs", "3", "--min-requests", "2",
        "--requests-per-concurrency", "1", "--text-tokens", "24",
    ]) == 0
    s3 = json.loads((out / "scenario3_multimodal.json").read_text())
    s5 = json.loads((out / "scenario5_repeat.json").read_text())
    assert (out / "scenario3_multimodal.png").is_file() or importlib.util.find_spec("matplotlib") is None
    assert {(p["concurrency"], p["output"]) for p in s3["points"]} == {(1, 3), (2, 3)}
    for point in s3["points"]:
        for key in ("ttft_ms_p50", "ttft_ms_p90", "preprocess_ms_p50", "encode_ms_p50", "transfer_ms_p50",
                    "queue_ms_p50", "prefill_ms_p50", "output_tok_s", "cached_prompt_tokens_median"):
            assert point[key] is not None, key
        assert point["output_tokens"] == 3 * point["num_requests"]
        assert point["encoder_cache_hits"] == 0 and point["encode_calls"] == point["num_requests"]  # all distinct
        # default transport auto, both services on loopback: every embedding went through /dev/shm
        assert point["shared_memory_requests"] == point["num_requests"]
    assert s3["embedding_transport"] == "auto" and "--shared-memory-mb" in s3["encoder_args"]
    assert s3["llm_engine_process"] is False  # CPU: the engine runs in the service's process
    assert set(s3["columns"]) >= {"preprocess_ms", "encode_ms", "transfer_ms", "prefill_ms"}
    assert s3["headline"]["image_ttft_ms_c1"] > 0
    repeat = next(p for p in s5["points"] if p["concurrency"] == 1)
    assert repeat["cached_prompt_tokens_min"] > 0
    # the SDK's LLM-first shortcut: the LLM service accepted these ids in scenario 3, so a repeat asks
    # it first and never the encoder (no look-up hit, no Encode) and uploads no embedding
    assert repeat["encode_calls"] == 0 and repeat["tensors_uploaded"] == 0
    assert repeat["requests_with_encoder_cache_hit"] == 0
    assert repeat["requests_encoder_skipped"] == repeat["num_requests"]
    assert s5["headline"]["requests_encoder_skipped_c1"] == repeat["num_requests"]
    assert s5["headline"]["image_ttft_repeat_ms_c1"] > 0 and s5["headline"]["encoder_cache_hits_c1"] == 0

    summary = scripts("summary").summarize(out)
    assert summary["image_ttft_ms_c1"] == s3["headline"]["image_ttft_ms_c1"]
    assert summary["image_ttft_repeat_ms_c1"] == s5["headline"]["image_ttft_repeat_ms_c1"]
    assert summary["grpc_overhead_pct_c64"] is None and "reason" in summary["sources"]["grpc_overhead_pct_c64"]


def test_grpc_overhead_benchmark_smoke(scripts, tmp_path):
    """One engine in-process and behind the real gRPC servicer (clients in a spawned process), and the
    service with its engine in its own process (--engine-process), alternated A B C A B C."""
    out = tmp_path / "results"
    assert scripts("bench_grpc_overhead").main([
        "--tiny", "--device", "cpu", "--out", str(out), "--concurrency", "4", "--input", "8", "--output", "4",
        "--requests-per-concurrency", "2", "--rounds", "2", "--engine-process",
    ]) == 0
    path = out / "grpc_overhead.json"
    data = json.loads(path.read_text())
    assert [r["variant"] for r in data["runs"]] == ["in_process", "grpc_stream", "grpc_engine_process"] * 2
    assert isinstance(data["headline"]["grpc_engine_process_overhead_pct"], float)
    assert all(r["output_tokens"] == 8 * 4 and r["output_tok_s"] > 0 for r in data["runs"])
    headline = data["headline"]
    assert isinstance(headline["grpc_overhead_pct_c64"], float) and headline["concurrency"] == 4
    assert headline["grpc_overhead_pct_c64"] == pytest.approx(
        100 * (1 - headline["grpc_stream_tok_s"] / headline["in_process_tok_s"])
    )
    assert (out / "grpc_overhead.png").is_file() or importlib.util.find_spec("matplotlib") is None

    summary = scripts("summary")
    assert "concurrency 4" in summary.summarize(out)["sources"]["grpc_overhead_pct_c64"]["reason"]
    headline["concurrency"] = 64  # the summary takes the figure only from a concurrency-64 run
    path.write_text(json.dumps(data))
    # the service's default on CUDA runs the engine in its own process: the summary reports that mode
    assert summary.summarize(out)["grpc_overhead_pct_c64"] == headline["grpc_engine_process_overhead_pct"]
    del headline["grpc_engine_process_overhead_pct"]  # a run without that variant: the in-process service
    path.write_text(json.dumps(data))
    assert summary.summarize(out)["grpc_overhead_pct_c64"] == headline["grpc_overhead_pct_c64"]


def test_encoder_benchmark_smoke(scripts, tmp_path):
    """The tiny llava on CPU: eager variants against the reference (HF's forward), encode(), and the
    stage-by-stage breakdown of encode(); --variants sets the run order."""
    argv = [
        "--tiny", "--device", "cpu", "--out", str(tmp_path), "--iters", "1", "--batch-sizes", "4,8,1",
        "--variants", "eager@4/8,encode_breakdown@1,eager_unfused,eager_sdpa_flash,encode_call_eager@4/8,"
        "compiled,eager@4", "--time-budget-s", "120",
    ]  # fmt: skip
    assert scripts("bench_encoder").main(argv) == 0
    data = json.loads((tmp_path / "encoder_llava15.json").read_text())
    assert data["plan"][:2] == ["eager@4/8", "encode_breakdown@1"]  # run in the order given
    assert set(data["eager"]) == {"4", "8"} and set(data["encode_call_eager"]) == {"4", "8"}
    for name in ("eager", "eager_unfused", "eager_sdpa_flash"):
        record = data["variants"][name]["results"]["4"]
        assert record["status"] == "ok" and record["cosine"] > 0.99999 and record["max_abs_diff"] < 1e-3, name
    encode = data["variants"]["encode_call_eager"]["results"]["8"]
    assert encode["max_abs_diff"] == 0 and encode["per_image_tensors_own_storage"]
    assert data["engine_fused_qkv"] and data["compiled"] == {}  # no compile on a CPU without --cpu-compile
    stages = data["encode_breakdown"]["1"]
    assert data["variants"]["encode_breakdown"]["results"]["1"]["compute"] == "eager"
    for stage in ("tower_batch", "compute", "rows_to_host", "fixed_row_outputs", "encode"):
        assert stages[stage] > 0, stage
    assert stages["encode_in_executor"] > 0
    assert stages["preprocess_one_image"] > 0 and "unaccounted" in stages


def test_encoder_benchmark_plan(scripts):
    bench = scripts("bench_encoder")
    plan = bench.parse_plan(bench.default_plan(64, max_autotune=False), [64, 1], skip={"compiled_hf"})
    names = [name for name, _ in plan]
    assert names[:3] == ["eager_hf", "eager", "compiled"]  # the baseline first,
    assert names[3:6] == ["compiled_cudagraph", "encode_breakdown", "compiled_regional"]  # then what it asks
    assert ("regional_max_autotune", [64]) in plan and ("regional_max_autotune", [64, 1]) in plan
    assert "compiled_hf" not in names and "max_autotune" not in names
    old_names = bench.parse_plan("compiled_sdpa_flash,eager_unfused", [8, 2], skip=set())
    assert old_names == [("compiled_sdpa", [8]), ("eager_unfused", [8])]
    for bad in ("turbo", "compiled@3"):
        with pytest.raises(ValueError):
            bench.parse_plan(bad, [64, 1], skip=set())


def test_multimodal_py_spy_needs_the_binary(scripts, monkeypatch, tmp_path):
    """--py-spy samples the services with the py-spy binary; without one the run stops with a clear
    message before any timed request (the timings would otherwise be mislabelled as sampled)."""
    bench = scripts("bench_multimodal")
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="no py-spy on PATH"), bench.py_spy([], tmp_path, "c1_out16"):
        pass


def test_pyspy_top_ranks_busy_stack_tails(scripts, tmp_path):
    frames = [{"name": n, "line": i} for i, n in enumerate(["run", "step", "copy", "EpollSelector.select", "wait"])]
    profile = {
        "shared": {"frames": frames},
        "profiles": [
            {"name": "Thread 1 engine", "samples": [[0, 1, 2], [0, 1, 2], [0, 1], [0, 3]], "weights": [0.5, 0.25, 0.5, 2.0]},
            {"name": "Thread 2 main", "samples": [[0, 4]], "weights": [1.0]},
        ],
    }
    path = tmp_path / "p.speedscope.json"
    path.write_text(json.dumps(profile))
    (engine,) = scripts("pyspy_top").top_stacks(path, thread="engine", depth=2)
    assert engine["seconds"] == 3.25 and engine["busy_seconds"] == 1.25  # the epoll wait is idle
    assert engine["stacks"] == [("step:1 > copy:2", 0.75), ("run:0 > step:1", 0.5)]
    assert [e["thread"] for e in scripts("pyspy_top").top_stacks(path)] == ["Thread 1 engine", "Thread 2 main"]


def test_engine_process_transport_profile_smoke(scripts, tmp_path):
    assert scripts("profile_engine_process_transport").main([
        "--out", str(tmp_path), "--ring-mb", "0,16", "--requests", "4", "--workdir", str(tmp_path),
    ]) == 0
    points = json.loads((tmp_path / "engine_process_transport.json").read_text())["points"]
    assert [(p["ring_mb"], p["staged_tensors"]) for p in points] == [(0, 0), (16, 4)]
    assert all(p["median_ms"] > 0 for p in points)


def test_decode_operand_experiment_matches_the_production_kernel():
    """The experiment kernel (keys as the MMA's rows) computes what the production decode kernel does,
    both ways of weighting the values, under Triton's interpreter (fp32, ragged contexts)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    check = """
import torch
from decode_operand_experiment import keys_as_rows_attention
from llm_service.layers.triton_decode import DecodeKernelConfig, paged_decode_attention
torch.manual_seed(0)
k, v = torch.randn(13, 16, 4, 32), torch.randn(13, 16, 4, 32)
tables, lens, q = torch.randperm(12).view(3, 4), torch.tensor([40, 17, 64]), torch.randn(3, 4, 32)
ref = paged_decode_attention(q, k, v, tables, lens, 32**-0.5)
for values_as_rows in (False, True):
    out = keys_as_rows_attention(q, k, v, tables, lens, 32**-0.5, DecodeKernelConfig(block_n=16), values_as_rows)
    assert float((out - ref).abs().max()) < 1e-5, values_as_rows
print("ok")
"""
    repo = BENCHMARKS.parent
    path = os.pathsep.join([str(repo), str(BENCHMARKS), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=repo, env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
