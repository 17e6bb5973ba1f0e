"""Tiny random-weight checkpoints in the real on-disk layouts, for tests and demos.

`make_tiny_checkpoint(family, out_dir, seed)` writes one; `FAMILIES` lists what it can write.
Family builders live in `vlm_tiny.<family>`; the shared tokenizer builder in `vlm_tiny.tokenizer`.
"""

from vlm_tiny.registry import FAMILIES, make_tiny_checkpoint, read_manifest

__all__ = ["FAMILIES", "make_tiny_checkpoint", "read_manifest"]
