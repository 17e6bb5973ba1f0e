"""The LLM benchmark scripts run end to end on CPU (`--tiny`), write their JSON, and `summary.py`
picks the headline figures out of them (nulls with a reason for what is missing)."""

from __future__ import annotations

import importlib
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

    summary = scripts("summary").summarize(out)
    assert summary["decode_bs1_ms_per_token"] == decode["headline"]["decode_bs1_ms_per_token"]
    assert summary["throughput_128_128_c256_tok_s"] is None  # the smoke run has no 128/128 c256 point
    assert "128/128" in summary["sources"]["throughput_128_128_c256_tok_s"]["reason"]
    assert summary["targets"]["decode_bs1_ms_per_token"]["target"].startswith("<= 5.5 ms/token")
    assert summary["targets"]["decode_bs1_ms_per_token"]["met"] is None  # not judged off an H100


def test_attention_micro_benchmark_smoke(scripts, tmp_path):
    assert scripts("bench_attention").main([
        "--device", "cpu", "--out", str(tmp_path), "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--iters", "1", "--layouts", "mixed_31dec_1x256",
    ]) == 0
    row = json.loads((tmp_path / "attention_micro.json").read_text())["layouts"]["mixed_31dec_1x256"]
    for variant in ("batched", "one_group", "gqa_enable", "gqa_repeat"):
        assert row[variant]["rel_err_vs_reference"] < 1e-5, variant
