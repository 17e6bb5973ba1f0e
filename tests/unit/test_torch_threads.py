"""--torch-threads: the per-operator CPU thread count both services set before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from encoder_service.__main__ import parse_config
from encoder_service.config import ENCODER_CUDA_THREADS
from llm_service.__main__ import build_parser, config_from_args
from llm_service.config import LlmServiceConfig
from vlm_protocol.errors import InvalidArgumentError
from vlm_protocol.torch_threads import apply_torch_threads

ROOT = Path(__file__).resolve().parents[2]

# Each case in a fresh interpreter: the count is process state. The probe first sets torch's count to
# START (0: leave torch's own) so that every case means the same on any number of cores. Prints:
# returned, main thread's count after, a thread started afterwards.
START = 3
_PROBE = textwrap.dedent(
    """
    import sys, threading, torch
    from vlm_protocol.torch_threads import apply_torch_threads
    if int(sys.argv[4]):
        torch.set_num_threads(int(sys.argv[4]))
    got = apply_torch_threads(int(sys.argv[1]), sys.argv[2], service="test", cuda_auto=int(sys.argv[3]))
    seen = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start(); worker.join()
    print(got, torch.get_num_threads(), seen[0])
    """
)


def _probe(
    requested: int, device: str, omp_num_threads: str | None = None, cuda_auto: int = 1, start: int = START
) -> tuple[int, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(requested), device, str(cuda_auto), str(start)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def test_auto_is_one_thread_for_a_cuda_model_in_every_later_thread():
    assert _probe(0, "cuda") == (1, 1, 1)
    assert _probe(0, "cuda:1") == (1, 1, 1)


def test_the_encoders_auto_is_at_most_its_cap():
    assert _probe(0, "cuda", cuda_auto=ENCODER_CUDA_THREADS) == (min(ENCODER_CUDA_THREADS, START),) * 3
    assert _probe(0, "cuda", cuda_auto=2) == (2, 2, 2)


def test_auto_keeps_torch_default_on_cpu_and_an_explicit_omp_setting():
    assert _probe(0, "cpu") == (START, START, START)
    assert _probe(0, "cuda", omp_num_threads="2", start=0) == (2, 2, 2)  # torch read OMP_NUM_THREADS


def test_an_explicit_count_wins():
    assert _probe(2, "cuda") == (2, 2, 2)
    assert _probe(1, "cpu") == (1, 1, 1)


def test_negative_counts_are_refused_everywhere(tiny_checkpoint):
    with pytest.raises(ValueError, match=">= 0"):
        apply_torch_threads(-1, "cuda", service="test")
    ckpt = str(tiny_checkpoint("llava"))
    with pytest.raises(InvalidArgumentError, match="torch_threads"):
        LlmServiceConfig(model_dir=ckpt, torch_threads=-2)
    with pytest.raises(SystemExit):
        parse_config(["--model", ckpt, "--torch-threads", "-1"])


def test_the_flag_reaches_both_services_configs(tiny_checkpoint):
    ckpt = str(tiny_checkpoint("llava"))
    llm = config_from_args(build_parser().parse_args(["--model", ckpt, "--torch-threads", "3"]))
    assert llm.torch_threads == 3 and llm.engine_config().torch_threads == 3
    assert config_from_args(build_parser().parse_args(["--model", ckpt])).torch_threads == 0
    encoder, _ = parse_config(["--model", ckpt, "--torch-threads", "4"])
    assert encoder.torch_threads == 4
