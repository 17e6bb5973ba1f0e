"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from tests.engine.hf_reference import HFReference, VilaHFReference
from tests.engine.test_engine_parity import CASES, MAX_NEW_TOKENS, run_case


@pytest.fixture(scope="session")
def references(tiny_checkpoint):
    """family -> (checkpoint, [(prompt, Reference)]) for the parity CASES, computed once per session."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            ckpt = tiny_checkpoint(family)
            hf = VilaHFReference(ckpt) if family == "vila" else HFReference(family, ckpt)
            refs = [
                (prompt, run_case(hf, seed, prompt, num_images, MAX_NEW_TOKENS))
                for seed, (prompt, num_images) in enumerate(CASES[family])
            ]
            cache[family] = (ckpt, refs)
        return cache[family]

    return get
