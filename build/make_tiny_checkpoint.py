#!/usr/bin/env python3
"""Write a tiny random-weight VLM checkpoint in the real model's on-disk layout.

    python build/make_tiny_checkpoint.py --family llava --out /tmp/tiny-llava [--seed 0] [--overwrite]

Idempotent: re-running with the same family and seed reuses the directory (see its
tiny_manifest.json). Works from a clean checkout without installing the package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("blip2", "llava", "vila", "llava_onevision", "mllama")  # mirrors vlm_tiny.FAMILIES

logger = logging.getLogger("make_tiny_checkpoint")


def _import_vlm_tiny():
    try:
        import vlm_tiny
    except ImportError:
        # Not installed: use the checkout this script lives in.
        sys.path.insert(0, str(REPO_ROOT))
        import vlm_tiny
    return vlm_tiny


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=FAMILIES, help="model family to write")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0); >= 0")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it holds something else"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    vlm_tiny = _import_vlm_tiny()
    if tuple(vlm_tiny.FAMILIES) != FAMILIES:
        logger.warning("CLI family list %s differs from vlm_tiny.FAMILIES %s", FAMILIES, vlm_tiny.FAMILIES)
    try:
        out = vlm_tiny.make_tiny_checkpoint(args.family, args.out, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except ImportError as exc:
        logger.error("cannot build %s: %s (are the 'serve' extras installed?)", args.family, exc)
        return 1
    logger.info("checkpoint ready: %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
