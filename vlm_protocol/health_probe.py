"""A tiny ``grpc.health.v1`` probe for container health checks and readiness probes.

    python -m vlm_protocol.health_probe --address HOST:PORT [--service NAME] [--timeout S]
    vlm-health-probe --address 127.0.0.1:50051

Exit status: 0 when the server answers SERVING, 1 when it answers anything else (NOT_SERVING while
warming up or draining, an unknown service name, a server without the health service), 2 when it
cannot be reached within the timeout. Docker reserves exit status 2 in ``HEALTHCHECK``, so image and
compose health checks run it as ``vlm-health-probe ... || exit 1``.

Imports only grpc and the health stubs (no torch), so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_UNREACHABLE = 2

DEFAULT_TIMEOUT_S = 3.0
# Status codes that mean "nobody answered in time", as opposed to a server answering "not healthy".
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def probe(address: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, str]:
    """Ask ``address`` for the health of ``service`` ("" = the whole server).

    Returns (exit status, one-line description). Never raises for network or server errors.
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            status = EXIT_UNREACHABLE if code in _UNREACHABLE_CODES else EXIT_NOT_SERVING
            return status, f"{code.name}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    is_serving = response.status == health_pb2.HealthCheckResponse.SERVING
    return (EXIT_SERVING if is_serving else EXIT_NOT_SERVING), name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-health-probe",
        description="Check a gRPC server's grpc.health.v1 status. "
        "Exit 0: SERVING; 1: NOT_SERVING or unknown service; 2: unreachable or timed out.",
    )
    parser.add_argument(
        "--address", required=True, help="gRPC target, e.g. 127.0.0.1:50051 or dns:///encoder:50051"
    )
    parser.add_argument(
        "--service",
        default="",
        help="service to check, e.g. vlm.v1.EncoderService (default: the whole server)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for an answer (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing; the exit status says it all")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status, description = probe(args.address, args.service, args.timeout)
    if not args.quiet:
        target = f"{args.address} ({args.service})" if args.service else args.address
        print(f"{target}: {description}", file=sys.stdout if status == EXIT_SERVING else sys.stderr)
    return status


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"timeout must be > 0 seconds, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
