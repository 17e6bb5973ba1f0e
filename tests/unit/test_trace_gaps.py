"""benchmarks/trace_gaps.py: GPU-idle gaps of a Chrome trace and the host work covering them."""

from __future__ import annotations

import pytest

from benchmarks.trace_gaps import analyze


def _event(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 0}


def test_gaps_busy_time_and_host_context():
    trace = {
        "traceEvents": [
            _event("python_function", "engine.step", 0, 1000),
            _event("python_function", "scheduler.schedule", 0, 300),
            _event("kernel", "gemm", 300, 200),
            _event("kernel", "overlapping", 350, 250),  # overlaps: busy counts the union
            _event("python_function", "sampler.to_host", 600, 390),
            _event("kernel", "sample", 900, 50),
            {"ph": "i", "name": "marker", "ts": 10},  # not a complete event: ignored
        ]
    }
    summary = analyze(trace, min_gap_us=20)
    assert summary["window_ms"] == pytest.approx(1.0)
    assert summary["gpu_busy_ms"] == pytest.approx(0.35)
    assert summary["idle_before_first_gpu_event_ms"] == pytest.approx(0.3)
    assert summary["idle_after_last_gpu_event_ms"] == pytest.approx(0.05)
    assert summary["idle_gaps_between_ms"] == pytest.approx(0.3)
    [gap] = summary["longest_gaps"]
    assert gap["at_ms"] == pytest.approx(0.6) and gap["ms"] == pytest.approx(0.3)
    assert gap["host"][0].startswith("sampler.to_host") and gap["host"][1].startswith("engine.step")
    assert summary["host_at_start"][0].startswith("scheduler.schedule")


def test_a_trace_without_gpu_events_is_an_error():
    with pytest.raises(ValueError, match="no GPU events"):
        analyze({"traceEvents": [_event("cpu_op", "aten::add", 0, 5)]})
