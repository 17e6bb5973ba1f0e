"""vlm-health-probe against real in-process gRPC servers, run as the container health check runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from vlm.v1 import encoder_service_pb2_grpc

from vlm_protocol.grpc_server import RunningServer, ServerConfig, ServiceRegistration, start_server
from vlm_protocol.health_probe import EXIT_NOT_SERVING, EXIT_SERVING, EXIT_UNREACHABLE, main

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "vlm.v1.EncoderService"


async def _probe(*args: str, timeout_s: float = 20.0) -> tuple[int, str, str]:
    """Run the probe CLI in a fresh interpreter (as Docker's HEALTHCHECK does) while this loop serves."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vlm_protocol.health_probe",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    return process.returncode, stdout.decode(), stderr.decode()


@contextlib.asynccontextmanager
async def _server() -> AsyncIterator[RunningServer]:
    registration = ServiceRegistration(
        encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server,
        encoder_service_pb2_grpc.EncoderServiceServicer(),
        SERVICE,
    )
    running = await start_server(ServerConfig(host="127.0.0.1", port=0, grace_period_s=0.5), [registration])
    try:
        yield running
    finally:
        await running.stop_now()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_probe_follows_the_server_from_warm_up_to_serving_to_stopped():
    async def scenario():
        async with _server() as running:
            address = running.address

            code, _, stderr = await _probe("--address", address)
            assert code == EXIT_NOT_SERVING, stderr
            assert "NOT_SERVING" in stderr
            code, _, _ = await _probe("--address", address, "--service", SERVICE)
            assert code == EXIT_NOT_SERVING

            await running.set_serving()
            code, stdout, stderr = await _probe("--address", address)
            assert code == EXIT_SERVING, stderr
            assert stdout.strip() == f"{address}: SERVING"
            code, _, _ = await _probe("--address", address, "--service", SERVICE, "--quiet")
            assert code == EXIT_SERVING

            # A reachable server that does not know the service is unhealthy, not unreachable.
            code, _, stderr = await _probe("--address", address, "--service", "vlm.v1.NoSuchService")
            assert code == EXIT_NOT_SERVING
            assert "NOT_FOUND" in stderr

            await running.drain()
            code, _, stderr = await _probe("--address", address, "--timeout", "2")
            assert code == EXIT_UNREACHABLE, stderr
            assert "UNAVAILABLE" in stderr

    asyncio.run(scenario())


def test_probe_reports_a_port_nobody_listens_on_as_unreachable():
    assert main(["--address", f"127.0.0.1:{_free_port()}", "--timeout", "2", "--quiet"]) == EXIT_UNREACHABLE


def test_probe_times_out_on_a_listener_that_never_speaks_grpc():
    # The kernel completes the TCP handshake for a listening socket nobody accepts from, so the
    # probe connects but never gets an HTTP/2 answer: only the deadline can end it.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        assert main(["--address", f"127.0.0.1:{port}", "--timeout", "0.5", "--quiet"]) == EXIT_UNREACHABLE


def test_probe_in_process_against_a_serving_server():
    async def scenario():
        async with _server() as running:
            await running.set_serving()
            # main() blocks on a sync channel; keep this loop free to answer it.
            code = await asyncio.to_thread(main, ["--address", running.address, "--quiet"])
            assert code == EXIT_SERVING

    asyncio.run(scenario())


def test_probe_does_not_import_torch():
    code = (
        "import sys\n"
        "from vlm_protocol import health_probe\n"
        "health_probe.main(['--address', '127.0.0.1:1', '--timeout', '0.2', '--quiet'])\n"
        "heavy = sorted(name for name in ('torch', 'numpy', 'transformers') if name in sys.modules)\n"
        "assert not heavy, heavy\n"
    )

    async def scenario():
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=REPO_ROOT)
        assert await asyncio.wait_for(process.wait(), 20) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("timeout", ["0", "-1", "soon"])
def test_probe_rejects_a_bad_timeout(timeout, capsys):
    with pytest.raises(SystemExit):
        main(["--address", "127.0.0.1:1", "--timeout", timeout])
    assert "--timeout" in capsys.readouterr().err


def test_console_script_is_registered():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vlm-health-probe"] == "vlm_protocol.health_probe:main"
