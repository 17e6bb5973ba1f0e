"""The Triton paged prefill kernel on CPU, through Triton's interpreter (TRITON_INTERPRET=1 must be set
before the kernels are defined, hence the subprocess; the cases are in triton_prefill_cases.py), and
the host side it relies on: the tile list and the triton backend's per-step metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_service.layers.attention import AttentionMetadata

REPO = Path(__file__).resolve().parents[2]


def test_kernel_matches_reference_under_interpreter():
    pytest.importorskip("triton")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.triton_prefill_cases"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tiles_cover_every_query_once_longest_first():
    pytest.importorskip("triton")
    from llm_service.layers.triton_prefill import PrefillPlan

    query_lens, seq_lens = [5, 1, 70, 16, 33], [5, 40, 300, 16, 33]
    plan = PrefillPlan.build(
        query_lens,
        seq_lens,
        torch.zeros(5, 19, dtype=torch.long),
        select=torch.tensor([True, False, True, True, True]),
    )
    tiles = plan.tiles(16).numpy()
    covered = sorted((int(seq), q) for seq, q0 in tiles for q in range(q0, min(q0 + 16, query_lens[seq])))
    assert covered == [(s, q) for s in (0, 2, 3, 4) for q in range(query_lens[s])]
    assert len(tiles) == 1 + 5 + 1 + 3  # no empty tile
    prefix = np.array(seq_lens) - np.array(query_lens)
    keys_read = [prefix[s] + min(q0 + 16, query_lens[s]) for s, q0 in tiles]
    assert keys_read == sorted(keys_read, reverse=True)
    assert plan.tiles(16) is plan.tiles(16)  # built once per step, shared by every layer
    assert plan.query_start.tolist() == [0, 5, 6, 76, 92, 125] and plan.seq_lens.tolist() == seq_lens


def test_triton_metadata_sends_prefill_to_the_kernel():
    pytest.importorskip("triton")
    build = dict(block_size=4, device=torch.device("cpu"), backend="triton")
    tables = [[7], [2, 5, 9], [4, 1], [3]]
    meta, _ = AttentionMetadata.build(
        query_lens=[3, 1, 5, 1], seq_lens=[3, 9, 7, 2], block_tables=tables, **build
    )
    (decode,) = meta.groups  # no padded prefill group: the kernel reads the blocks in place
    assert decode.mask is None and decode.query_index.tolist() == [3, 9]
    assert meta.prefill.seq_ids.tolist() == [0, 2] and meta.prefill.block_tables is meta.block_tables
    meta, _ = AttentionMetadata.build(query_lens=[1, 1], seq_lens=[9, 2], block_tables=tables[1::2], **build)
    assert meta.prefill is None and meta.groups[0].query_index is None  # decode-only: unchanged
    meta, _ = AttentionMetadata.build(query_lens=[3, 5], seq_lens=[3, 7], block_tables=tables[::2], **build)
    assert meta.groups == [] and meta.prefill.seq_ids.tolist() == [0, 1]


def test_config_is_validated():
    pytest.importorskip("triton")
    from llm_service.layers.triton_prefill import PrefillKernelConfig

    with pytest.raises(ValueError, match="block_m"):
        PrefillKernelConfig(block_m=8)
    with pytest.raises(ValueError, match="block_n"):
        PrefillKernelConfig(block_n=48)
