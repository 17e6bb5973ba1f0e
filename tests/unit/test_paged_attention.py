"""The batched paged-attention path against the per-sequence reference, on random paged layouts.

Layouts: ragged context lengths, decode rows (one query) mixed with prefill chunks, block tables that
skip blocks and list them out of order, sequences sharing their prefix blocks, GQA and MHA, and a
cache whose unused slots hold large stale values (so a masking error cannot hide).
"""

from __future__ import annotations

import random

import pytest
import torch

from llm_service.layers.attention import (
    AttentionMetadata,
    padded_block_tables,
    paged_attention,
    paged_attention_reference,
    resolve_attention_backend,
    write_kv,
)


def _layout(rng: random.Random, num_seqs: int, block_size: int, num_blocks: int, *, decode_share: float):
    """(query_lens, seq_lens, block_tables): random, with shared prefix blocks and gaps in the pool."""
    pool = list(range(num_blocks))
    rng.shuffle(pool)  # out-of-order block ids; the ones never drawn are gaps
    query_lens, seq_lens, tables = [], [], []
    for i in range(num_seqs):
        seq_len = rng.randint(1, 6 * block_size)
        query_len = 1 if rng.random() < decode_share else rng.randint(1, seq_len)
        need = -(-seq_len // block_size)
        table: list[int] = []
        if i > 0 and rng.random() < 0.4:  # share the full prefix blocks of the previous sequence
            prev_full = (seq_lens[-1] - query_lens[-1]) // block_size
            mine_full = (seq_len - query_len) // block_size
            table = tables[-1][: min(prev_full, mine_full, need)]
        while len(table) < need:
            table.append(pool.pop())
        query_lens.append(query_len)
        seq_lens.append(seq_len)
        tables.append(table)
    return query_lens, seq_lens, tables


def _random_case(
    seed: int, *, num_heads: int, num_kv_heads: int, dtype: torch.dtype, decode_share: float, max_gather_tokens=None
):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    block_size, head_dim = rng.choice([2, 4, 16]), 8
    num_seqs = rng.randint(1, 9)
    num_blocks = 6 * num_seqs + 8
    query_lens, seq_lens, tables = _layout(rng, num_seqs, block_size, num_blocks, decode_share=decode_share)
    # stale values everywhere, large enough that attending to a padding key would show
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype) * 30
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype) * 30
    query = torch.randn(sum(query_lens), num_heads, head_dim, dtype=dtype)
    budget = {} if max_gather_tokens is None else {"max_gather_tokens": max_gather_tokens}
    metas = {
        backend: AttentionMetadata.build(
            query_lens=query_lens, seq_lens=seq_lens, block_tables=tables, block_size=block_size,
            device=torch.device("cpu"), backend=backend, **budget,
        )[0]
        for backend in ("reference", "batched")
    }
    return query, k_cache, v_cache, metas


CASES = [
    pytest.param(4, 4, 0.0, id="mha-prefill-only"),
    pytest.param(4, 4, 1.0, id="mha-decode-only"),
    pytest.param(4, 4, 0.5, id="mha-mixed"),
    pytest.param(8, 2, 0.5, id="gqa4-mixed"),
    pytest.param(8, 2, 1.0, id="gqa4-decode-only"),
    pytest.param(6, 3, 0.0, id="gqa2-prefill-only"),
    pytest.param(4, 1, 0.5, id="mqa-mixed"),
]


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "decode_share"), CASES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_gather_tokens", [None, 1], ids=["one-group", "split"])
def test_batched_matches_reference_fp32(seed, num_heads, num_kv_heads, decode_share, max_gather_tokens):
    query, k_cache, v_cache, metas = _random_case(
        seed, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=torch.float32, decode_share=decode_share,
        max_gather_tokens=max_gather_tokens,
    )
    ref = paged_attention_reference(query, k_cache, v_cache, metas["reference"], 0.3)
    out = paged_attention(query, k_cache, v_cache, metas["batched"], 0.3)
    assert out.shape == ref.shape and not out.isnan().any()
    truth = paged_attention_reference(query.double(), k_cache.double(), v_cache.double(), metas["reference"], 0.3)
    # as close to float64 as the reference is (both measured at <= 5e-7 relative on these cases)
    assert (out.double() - truth).norm() / truth.norm() < 2e-6
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "decode_share"), CASES[2:4])
def test_batched_matches_reference_fp64_to_rounding(num_heads, num_kv_heads, decode_share):
    query, k_cache, v_cache, metas = _random_case(
        11, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=torch.float64, decode_share=decode_share
    )
    ref = paged_attention_reference(query, k_cache, v_cache, metas["reference"], 0.3)
    out = paged_attention(query, k_cache, v_cache, metas["batched"], 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_metadata_groups_and_slots():
    block_size = 4
    query_lens = [3, 1, 5, 1]
    seq_lens = [3, 9, 7, 2]
    tables = [[7], [2, 5, 9], [4, 1], [3]]
    meta, positions = AttentionMetadata.build(
        query_lens=query_lens, seq_lens=seq_lens, block_tables=tables, block_size=block_size,
        device=torch.device("cpu"),
    )
    expected_pos = [p for q, s in zip(query_lens, seq_lens, strict=True) for p in range(s - q, s)]
    assert positions.tolist() == expected_pos
    expected_slots = [
        table[p // block_size] * block_size + p % block_size
        for q, s, table in zip(query_lens, seq_lens, tables, strict=True)
        for p in range(s - q, s)
    ]
    assert meta.slot_mapping.tolist() == expected_slots
    assert meta.query_start_loc == [0, 3, 4, 9, 10]
    decode, prefill = meta.groups
    # decode: sequences 1 and 3, rows 3 and 9, keys cut to the 3 blocks sequence 1 needs
    assert decode.query_index.tolist() == [3, 9]
    assert decode.block_tables.tolist() == [[2, 5, 9], [3, 0, 0]]
    assert decode.mask.shape == (2, 1, 1, 12)
    assert decode.mask[:, 0, 0].sum(-1).tolist() == [9, 2]
    # prefill: sequences 0 and 2 padded to 5 queries; padding repeats the last real row
    assert prefill.num_queries == 5
    assert prefill.query_index.tolist() == [0, 1, 2, 2, 2, 4, 5, 6, 7, 8]
    assert prefill.out_dst.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    # sequence 2's first query (position 2) sees keys 0..2, its last (position 6) keys 0..6
    assert prefill.mask[1, 0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    assert prefill.mask[1, 0, 4].nonzero().flatten().tolist() == list(range(7))


def test_triton_metadata_is_one_copy_per_kind(monkeypatch):
    """Slots, positions and block tables reach the device in one copy (plus the prefill plan's own);
    the results are the same values as the per-token formulas give."""
    pytest.importorskip("triton")
    import llm_service.layers.attention as attention
    import llm_service.layers.triton_prefill as triton_prefill

    copies = []

    def counting(t, device):
        copies.append(tuple(t.shape))
        return t

    monkeypatch.setattr(attention, "to_device", counting)
    monkeypatch.setattr(triton_prefill, "to_device", counting)
    block_size, query_lens, seq_lens = 4, [3, 5, 2], [3, 7, 9]
    tables = [[7], [4, 1], [2, 5, 9]]
    meta, positions = AttentionMetadata.build(
        query_lens=query_lens, seq_lens=seq_lens, block_tables=tables, block_size=block_size,
        device=torch.device("cpu"), backend="triton",
    )  # fmt: skip
    assert copies == [(2 * 10 + 3 * 3,), (2 * 3 + 1,)]  # [slots | positions | tables], [q_start | seq_lens]
    assert positions.tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8]
    assert meta.slot_mapping.tolist() == [28, 29, 30, 18, 19, 4, 5, 6, 23, 36]
    assert meta.block_tables.tolist() == [[7, 0, 0], [4, 1, 0], [2, 5, 9]]
    assert meta.prefill.query_start.tolist() == [0, 3, 8, 10] and meta.prefill.seq_lens.tolist() == seq_lens


def test_gather_budget_splits_by_length():
    # 6 decode sequences; a budget of 32 key positions: the longest alone, then runs of similar length
    seq_lens = [3, 30, 5, 17, 2, 9]
    tables = [list(range(10 * i, 10 * i + -(-n // 4))) for i, n in enumerate(seq_lens)]
    meta, _ = AttentionMetadata.build(
        query_lens=[1] * 6, seq_lens=seq_lens, block_tables=tables, block_size=4, device=torch.device("cpu"),
        max_gather_tokens=32,
    )
    groups = [g.query_index.tolist() for g in meta.groups]
    assert groups == [[1], [3], [5, 2], [0, 4]]  # keys 32 | 20 | 12, 8 | 4, 4: longest first, <= 32 each
    assert all(g.num_seqs * g.mask.shape[-1] <= 32 for g in meta.groups)


def test_decode_only_step_needs_no_scatter():
    meta, _ = AttentionMetadata.build(
        query_lens=[1, 1], seq_lens=[5, 3], block_tables=[[1, 0], [2]], block_size=4, device=torch.device("cpu")
    )
    assert len(meta.groups) == 1 and meta.groups[0].query_index is None


def test_padded_block_tables():
    assert padded_block_tables([[4, 2], [7], [1, 2, 3]]).tolist() == [[4, 2, 0], [7, 0, 0], [1, 2, 3]]
    assert padded_block_tables([[4, 2], (), [1, 2, 3]], 2, fill=9).tolist() == [[4, 2], [9, 9], [1, 2]]


def test_write_kv_scatters_to_slots():
    k_cache = torch.zeros(3, 2, 1, 2)
    v_cache = torch.zeros(3, 2, 1, 2)
    key = torch.arange(6.0).view(3, 1, 2)
    write_kv(key, -key, k_cache, v_cache, torch.tensor([5, 0, 2]))
    assert k_cache.view(6, 2)[[5, 0, 2]].tolist() == key.view(3, 2).tolist()
    assert (v_cache.view(6, 2)[[1, 3, 4]] == 0).all()


def test_backend_names_are_validated():
    assert resolve_attention_backend("auto") == "batched"
    assert resolve_attention_backend("reference") == "reference"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_attention_backend("flash")
