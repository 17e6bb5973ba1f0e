"""``vlm-client`` / ``python -m client_sdk``: one request from the command line, like the Triton client tool.

    vlm-client --text "Question: which city is this? Answer:" --image merlion.png --streaming \\
        --request-output-len 32 --llm-address localhost:50052 --encoder-address localhost:50051

Prints the answer (as it arrives with ``--streaming``), then time to first token and total latency.
Exit codes: 0 success, 1 the request failed (the message says which service and why), 2 bad arguments,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, TextIO

from client_sdk.client import Client
from client_sdk.errors import InvalidArgumentError, VlmClientError
from client_sdk.settings import ENCODER_ADDRESS_ENV, LLM_ADDRESS_ENV
from client_sdk.types import GenerateResult, join_deltas

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PLACEHOLDERS = ("<image>", "<video>", "<|image|>")


def split_media_list(value: str) -> list[str]:
    """Split ``--image a.png,https://x/b.jpg`` on commas, keeping ``data:...;base64,<payload>`` whole."""
    parts, pending = [], None
    for piece in value.split(","):
        if pending is not None:
            parts.append(f"{pending},{piece}")
            pending = None
        elif piece.startswith("data:") and piece.endswith(";base64"):
            pending = piece
        elif piece.strip():
            parts.append(piece.strip())
    if pending is not None:
        raise argparse.ArgumentTypeError(f"data URI without a payload: {pending!r}")
    return parts


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-client",
        description="Send one request to the VLM services and print the answer, TTFT and latency.",
    )
    parser.add_argument("--text", required=True, help="prompt text; put <image>/<video> where media go")
    parser.add_argument(
        "--image",
        action="append",
        type=split_media_list,
        default=[],
        help="comma-separated image paths, http(s) URLs or data: URIs (repeatable)",
    )
    parser.add_argument("--video", help="video path or http(s) URL (LLaVA-OneVision)")
    parser.add_argument(
        "--video-num-frames",
        "--video_num_frames",
        type=int,
        default=None,
        help="frames to sample from --video (default: the encoder's)",
    )
    parser.add_argument(
        "--prompt-format",
        choices=("auto", "raw", "triton"),
        default="auto",
        help="raw: the text as is; triton: the Triton ensemble's per-family template; auto (default): "
        "triton when media are given and the text has no placeholder, else raw",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--request-output-len",
        "--request_output_len",
        type=int,
        default=None,
        help="max tokens to generate (max_tokens)",
    )
    sampling.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    sampling.add_argument("--top-k", "--top_k", type=int, default=None)
    sampling.add_argument("--top-p", "--top_p", type=float, default=None)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--end-id", "--end_id", type=int, default=None, help="end-of-sequence token id")
    sampling.add_argument("--pad-id", "--pad_id", type=int, default=None, help="padding token id")
    sampling.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    sampling.add_argument(
        "--return-log-probs",
        "--return_log_probs",
        action="store_true",
        help="print the log probability of each generated token",
    )
    sampling.add_argument("--top-log-probs", type=int, default=None, help="alternatives per position")
    parser.add_argument("--streaming", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--encoder-address", default=None, help=f"host:port (default ${ENCODER_ADDRESS_ENV})")
    parser.add_argument("--llm-address", default=None, help=f"host:port (default ${LLM_ADDRESS_ENV})")
    parser.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds for the whole request")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object instead")
    return parser


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.request_output_len,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "end_id": args.end_id,
        "pad_id": args.pad_id,
        "stop_strings": args.stop,
        "log_probs": True if args.return_log_probs or args.top_log_probs else None,
        "top_log_probs": args.top_log_probs,
    }


def _prompt_format(args: argparse.Namespace, has_media: bool) -> str:
    if args.prompt_format != "auto":
        return args.prompt_format
    has_placeholder = any(p in args.text for p in PLACEHOLDERS)
    return "triton" if has_media and not has_placeholder else "raw"


def print_summary(result: GenerateResult, out: TextIO, *, log_probs: bool) -> None:
    """The lines after the answer: log probs (if asked), timings, token counts and cache outcomes."""
    if log_probs:
        for entry in result.log_probs:
            alternatives = ", ".join(f"{t.token!r}:{t.log_prob:.3f}" for t in entry.top_alternatives)
            extra = f"  [{alternatives}]" if alternatives else ""
            out.write(
                f"  {entry.token.token_id:>7} {entry.token.token!r:<16} {entry.token.log_prob:9.4f}{extra}\n"
            )
    t, u = result.timings, result.usage
    out.write(f"finish reason: {result.finish_reason}\n")
    out.write(f"time to first token: {t.time_to_first_token_ms:.1f} ms\n")
    out.write(f"total latency: {t.total_ms:.1f} ms (encode {t.encode_ms:.1f} ms)\n")
    skipped = " (encoder skipped: the LLM service held every content id)" if result.encoder_skipped else ""
    out.write(
        f"tokens: prompt {u.prompt_tokens} (cached {u.cached_prompt_tokens}), completion {u.completion_tokens}; "
        f"encoder cache hits {result.encoder_cache_hits}{skipped}, "
        f"embeddings uploaded {result.tensors_uploaded}\n"
    )


def run(args: argparse.Namespace, out: TextIO) -> GenerateResult:
    images = [item for group in args.image for item in group]
    has_media = bool(images) or args.video is not None
    with Client(args.encoder_address, args.llm_address, timeout_s=args.timeout) as client:
        kwargs: dict[str, Any] = dict(
            images=images or None,
            video=args.video,
            num_frames=args.video_num_frames if args.video is not None else None,
            prompt_format=_prompt_format(args, has_media),
            **_sampling(args),
        )
        if not args.streaming:
            return client.generate(args.text, **kwargs)
        deltas = []
        for delta in client.generate(args.text, stream=True, **kwargs):
            deltas.append(delta)
            if not args.json:
                out.write(delta.text)
                out.flush()
        if not args.json:
            out.write("\n")
        return join_deltas(deltas)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.video_num_frames is not None and args.video_num_frames < 0:
        parser.error("--video-num-frames must be >= 0")
    if args.video_num_frames is not None and args.video is None:
        parser.error("--video-num-frames needs --video")
    try:
        result = run(args, out)
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return EXIT_INTERRUPTED
    except InvalidArgumentError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE if exc.target == "" else EXIT_FAILED
    except VlmClientError as exc:
        err.write(f"error: {exc}\n")
        if exc.status == "UNAVAILABLE":
            err.write(
                f"hint: is the service running? addresses: --llm-address / ${LLM_ADDRESS_ENV}, "
                f"--encoder-address / ${ENCODER_ADDRESS_ENV}\n"
            )
        return EXIT_FAILED
    if args.json:
        out.write(json.dumps(asdict(result)) + "\n")
        return EXIT_OK
    if not args.streaming:
        out.write(result.text + "\n")
    print_summary(result, out, log_probs=args.return_log_probs or bool(args.top_log_probs))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
