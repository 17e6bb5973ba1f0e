"""Run the encoder and LLM services as child processes on free loopback ports (demo and e2e tests).

Nothing here imports torch: the services and the checkpoint builder run in their own processes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_SERVING = health_pb2.HealthCheckResponse.SERVING
_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child only calls it (Linux only; elsewhere a killed parent leaves its
# services running, as before)
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM this service when the thread that started it dies, even by
    SIGKILL, so a demo or benchmark killed by a timeout leaves no service holding the GPU."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ServiceError(RuntimeError):
    """A service could not be started or died; the message includes the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (another process could still take it before the service binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: ours, unbuffered, with this checkout's packages importable."""
    import vlm  # the generated stubs' package (protos/gen/python in a checkout)

    import vlm_demo

    roots = [str(Path(vlm_demo.__file__).resolve().parents[1]), str(Path(vlm.__file__).resolve().parents[1])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([*roots, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class ServiceProcess:
    """One service child process (``python -m <module> --model DIR --port P ...``) and its log file.

    On Linux the child gets SIGTERM when the thread that called ``start`` dies (``PR_SET_PDEATHSIG``):
    call ``start`` from a thread that outlives the service, e.g. the main thread."""

    name: str
    module: str
    model_dir: Path
    log_path: Path
    port: int = 0
    extra_args: Sequence[str] = ()
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            self.module,
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]

    def start(self) -> None:
        self.port = self.port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env or child_env(),
                start_new_session=True,  # a Ctrl-C in the terminal reaches only the demo, which then stops us
                preexec_fn=_terminate_with_parent if _PRCTL is not None else None,
            )

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def health(self, timeout_s: float = 1.0) -> str:
        """grpc.health.v1 status name (SERVING, NOT_SERVING, ...) or the gRPC error code name."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout_s
                )
            except grpc.RpcError as exc:
                return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def log_tail(self, num_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:]) or "(empty log)"

    def failure(self, reason: str) -> ServiceError:
        return ServiceError(
            f"{self.name} service {reason}.\ncommand: {' '.join(self.command)}\nlog ({self.log_path}), last lines:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (the services drain), then SIGKILL after ``timeout_s``. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.exit_code()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def wait_until_serving(
    services: Sequence[ServiceProcess],
    timeout_s: float,
    *,
    progress: Callable[[float, dict[str, str]], None] | None = None,
    poll_s: float = 0.5,
    progress_every_s: float = 5.0,
) -> None:
    """Poll health until every service is SERVING; raise ``ServiceError`` if one exits or time runs out."""
    started = time.monotonic()
    last_report = started
    while True:
        statuses = {}
        for service in services:
            code = service.exit_code()
            if code is not None:
                raise service.failure(f"exited with code {code} while starting")
            statuses[service.name] = service.health()
        if all(
            status == health_pb2.HealthCheckResponse.ServingStatus.Name(_SERVING)
            for status in statuses.values()
        ):
            return
        now = time.monotonic()
        if now - started > timeout_s:
            slow = next(s for s in services if statuses[s.name] != "SERVING")
            raise slow.failure(f"was not SERVING after {timeout_s:.0f} s (health: {statuses[slow.name]})")
        if progress is not None and now - last_report >= progress_every_s:
            progress(now - started, statuses)
            last_report = now
        time.sleep(poll_s)
