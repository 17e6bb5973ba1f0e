"""``vlm-demo`` / ``python -m vlm_demo``: the whole stack in one command.

Makes (or reuses) a tiny random-weight checkpoint under ~/.cache/vlm-serving/tiny/<family>, starts the
encoder and LLM services on free loopback ports, streams an answer about a bundled sample picture,
sends the same request again to show the caches at work, and shuts both services down.
``--model DIR`` serves a real checkpoint instead. This process never imports torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import client_sdk
from client_sdk.cli import print_summary
from client_sdk.types import GenerateResult, join_deltas
from vlm_demo.sample_image import sample_png_bytes
from vlm_demo.services import ServiceError, ServiceProcess, child_env, wait_until_serving

FAMILIES = ("blip2", "llava", "vila", "llava_onevision", "mllama")  # mirrors vlm_tiny.FAMILIES
DEFAULT_QUESTION = "What is shown in this picture?"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
_BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "build" / "make_tiny_checkpoint.py"
_BUILD_SNIPPET = (
    "import sys, logging; logging.basicConfig(level=logging.INFO, format='%(message)s');"
    "from vlm_tiny import make_tiny_checkpoint; make_tiny_checkpoint(sys.argv[1], sys.argv[2], seed=0)"
)


def say(message: str = "", *, end: str = "\n") -> None:
    sys.stdout.write(message + end)
    sys.stdout.flush()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm-serving" / "tiny"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-demo",
        description="Start the encoder and LLM services, ask about a sample picture twice, shut down.",
    )
    parser.add_argument(
        "--family", choices=FAMILIES, default="llava", help="tiny checkpoint family (default llava)"
    )
    parser.add_argument("--model", type=Path, default=None, help="serve this checkpoint directory instead")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where tiny checkpoints live (default ~/.cache/vlm-serving/tiny)",
    )
    parser.add_argument(
        "--image", type=Path, default=None, help="picture to ask about (default: the bundled one)"
    )
    parser.add_argument(
        "--question", default=DEFAULT_QUESTION, help="the question (Triton-ensemble template)"
    )
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens to generate (default 24)")
    parser.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for the services"
    )
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="service logs (default: a temporary directory)"
    )
    return parser


def ensure_tiny_checkpoint(family: str, cache_dir: Path) -> Path:
    """Build (or reuse, the builder is idempotent) the tiny checkpoint, in a child process."""
    out = cache_dir / family
    say(f"[1/4] tiny {family} checkpoint: {out}")
    if _BUILD_SCRIPT.is_file():
        command = [sys.executable, str(_BUILD_SCRIPT), "--family", family, "--out", str(out)]
    else:
        command = [sys.executable, "-c", _BUILD_SNIPPET, family, str(out)]
    started = time.monotonic()
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise ServiceError(
            f"could not build the tiny {family} checkpoint (exit {result.returncode}):\n{tail}"
        )
    reused = "reusing" in (result.stdout + result.stderr)
    say(f"      {'reused' if reused else 'built'} in {time.monotonic() - started:.1f} s")
    return out


def start_services(model_dir: Path, log_dir: Path, timeout_s: float) -> list[ServiceProcess]:
    services = [
        ServiceProcess("encoder", "encoder_service", model_dir, log_dir / "encoder.log"),
        ServiceProcess("llm", "llm_service", model_dir, log_dir / "llm.log"),
    ]
    for service in services:
        service.start()
    say(
        f"[2/4] starting encoder_service on {services[0].address} and llm_service on {services[1].address} "
        f"(logs in {log_dir})"
    )
    started = time.monotonic()

    def progress(elapsed: float, statuses: dict[str, str]) -> None:
        say(
            f"      waiting for health SERVING ({elapsed:.0f} s): "
            + ", ".join(f"{k} {v}" for k, v in statuses.items())
        )

    try:
        wait_until_serving(services, timeout_s, progress=progress)
    except BaseException:
        stop_services(services, quiet=True)
        raise
    say(f"      both services SERVING after {time.monotonic() - started:.1f} s")
    return services


def stop_services(services: Sequence[ServiceProcess], *, quiet: bool = False) -> None:
    if not quiet:
        say("[4/4] stopping the services (SIGTERM, drain)")
    for service in services:
        code = service.stop()
        if not quiet:
            say(f"      {service.name} exited with code {code}")


def ask(
    client: client_sdk.Client, image: bytes, question: str, max_tokens: int, label: str
) -> GenerateResult:
    say(f"\n--- {label} ---")
    say(f"Q: {question}")
    say("A: ", end="")
    deltas = []
    for delta in client.generate(
        question, images=[image], stream=True, prompt_format="triton", max_tokens=max_tokens, temperature=0.0
    ):
        deltas.append(delta)
        say(delta.text, end="")
    say()
    result = join_deltas(deltas)
    print_summary(result, sys.stdout, log_probs=False)
    return result


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        model_dir = args.model.expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            say(f"error: {model_dir} is not a checkpoint directory (no config.json)")
            return EXIT_FAILED
        say(f"[1/4] serving the checkpoint at {model_dir}")
    else:
        say(
            "NOTE: the tiny demo model has random weights, so its answers are meaningless text; the demo shows"
        )
        say("      the plumbing (encoding, streaming, caching). Use --model DIR to serve a real checkpoint.")
        model_dir = ensure_tiny_checkpoint(args.family, (args.cache_dir or default_cache_dir()).expanduser())
    image = args.image.read_bytes() if args.image is not None else sample_png_bytes()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vlm-demo-logs-"))
    services = start_services(model_dir, log_dir, args.startup_timeout)
    try:
        encoder, llm = services
        say("[3/4] asking about the picture")
        with client_sdk.Client(encoder.address, llm.address, timeout_s=args.request_timeout) as client:
            first = ask(
                client, image, args.question, args.max_tokens, "request 1 (cold: encode, upload, prefill)"
            )
            second = ask(
                client, image, args.question, args.max_tokens, "request 2 (same picture and question)"
            )
        say()
        say(
            f"cache check: encoder: {_encoder_outcome(second)}; "
            f"embeddings uploaded: {first.tensors_uploaded} then {second.tensors_uploaded}; "
            f"cached prompt tokens: {second.usage.cached_prompt_tokens} of {second.usage.prompt_tokens}; "
            f"same answer: {'yes' if first.token_ids == second.token_ids else 'no'}"
        )
        if second.usage.cached_prompt_tokens == 0:
            say("(the KV prefix cache reuses whole blocks, 16 tokens by default: this prompt is shorter)")
    finally:
        stop_services(services)
    return EXIT_OK


def _encoder_outcome(result) -> str:
    """How request 2's image got to the LLM service without being encoded again."""
    if result.encoder_skipped:
        return "skipped (the LLM service still held the embedding)"
    return "cache hit" if result.encoder_cache_hits else "encoded again"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        say("\ninterrupted")
        return EXIT_INTERRUPTED
    except (ServiceError, client_sdk.VlmClientError, OSError) as exc:
        say(f"\nerror: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
