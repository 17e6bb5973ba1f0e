"""The command line: flags and environment -> EncoderConfig; a real process that serves and drains on SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vlm.v1 import encoder_service_pb2, encoder_service_pb2_grpc

from encoder_service.__main__ import parse_bytes, parse_config
from tests.encoder.fakes import fake_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_flags_build_the_config(tmp_path):
    model = fake_checkpoint(tmp_path / "m")
    config, log_level = parse_config(
        [
            "--model",
            str(model),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--dtype",
            "bfloat16",
            "--max-batch-size",
            "4",
            "--max-queue-delay-ms",
            "1.5",
            "--cache-bytes",
            "2MiB",
            "--max-media-bytes",
            "1MB",
            "--max-image-pixels",
            "1000",
            "--no-url-fetch",
            "--url-allow-private",
            "127.0.0.1,media.local",
            "--url-allow-private",
            "10.0.0.0/8",
            "--media-root",
            str(tmp_path),
            "--url-timeout-s",
            "3",
            "--log-level",
            "debug",
        ],
        environ={},
    )
    assert config.model_dir == model and config.server.port == 0 and config.server.host == "127.0.0.1"
    assert config.dtype == "bfloat16" and config.default_output_dtype == "bfloat16"
    assert (config.max_batch_size, config.max_queue_delay_ms, config.cache_bytes) == (4, 1.5, 2 * 1024**2)
    assert config.limits.max_media_bytes == 1_000_000 and config.limits.max_image_pixels == 1000
    policy = config.url_policy
    assert not policy.allow_fetch and policy.allowed_hosts == ("media.local",)
    assert policy.allowed_networks == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert policy.media_root == tmp_path and policy.total_timeout_s == 3.0
    assert log_level == "DEBUG"


def test_environment_fills_flags_and_the_command_line_wins(tmp_path):
    model = fake_checkpoint(tmp_path / "m")
    environ = {
        "VLM_ENCODER_MODEL": str(model),
        "VLM_ENCODER_MAX_BATCH_SIZE": "3",
        "VLM_ENCODER_CACHE_BYTES": "1GiB",
        "VLM_ENCODER_URL_FETCH": "false",
        "VLM_ENCODER_URL_ALLOW_PRIVATE": "192.168.0.0/16,nas.lan",
    }
    config, _ = parse_config(["--max-batch-size", "5"], environ=environ)
    assert config.model_dir == model and config.max_batch_size == 5 and config.cache_bytes == 1024**3
    assert not config.url_policy.allow_fetch
    assert config.url_policy.allowed_hosts == ("nas.lan",)
    # no batching delay unless asked for: a lone image must not wait for companions at low load
    assert config.max_queue_delay_ms == 0.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-batch-size", "0"],
        ["--dtype", "int8"],
        ["--cache-bytes", "lots"],
        ["--url-allow-private", "not a host/xx"],
        ["--url-timeout-s", "0"],
    ],
)
def test_bad_flags_are_usage_errors(tmp_path, argv, capsys):
    model = fake_checkpoint(tmp_path / "m")
    with pytest.raises(SystemExit) as info:
        parse_config(["--model", str(model), *argv], environ={})
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        parse_config(["--model", str(tmp_path / "missing")], environ={})


def test_parse_bytes():
    assert parse_bytes("1024") == 1024
    assert parse_bytes("2KiB") == 2048 and parse_bytes("2kb") == 2000
    assert parse_bytes("1.5GiB") == 3 * 1024**3 // 2


@pytest.mark.slow
def test_process_serves_and_drains_on_sigterm(tiny_checkpoint):
    checkpoint = tiny_checkpoint("llava")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos/gen/python")])}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "encoder_service",
            "--model",
            str(checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--grace-period-s",
            "2",
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            address = match.group(1) if match else None
        assert address, "".join(lines)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING
            info = encoder_service_pb2_grpc.EncoderServiceStub(channel).GetModelInfo(
                encoder_service_pb2.EncoderServiceGetModelInfoRequest(), timeout=5
            )
            assert info.model_id == checkpoint.name
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert "draining" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
