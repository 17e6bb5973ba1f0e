"""KV-cache manager: block accounting, reference counts, LRU reuse and chained prefix hashes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The engine core must not need torch: block it while importing (restored after, so other test
# modules in the same session that do use torch are unaffected). The subprocess test below checks
# the same thing in a fresh interpreter, where no earlier import can hide a dependency.
_saved_torch = sys.modules.get("torch")
sys.modules["torch"] = None  # type: ignore[assignment]
try:
    from llm_service.engine.kv_cache_manager import KVCacheManager, compute_block_hash
    from llm_service.engine.request import MultimodalSpan, Request
finally:
    if _saved_torch is None:
        del sys.modules["torch"]
    else:
        sys.modules["torch"] = _saved_torch

REPO = Path(__file__).resolve().parents[2]


def test_engine_core_imports_without_torch():
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch not blocked')\n"
        "import llm_service.engine.kv_cache_manager, llm_service.engine.request\n"
        "bad = [m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in ('torch', 'grpc', 'google')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def make_request(rid: str, prompt: list[int], spans=(), salts=()) -> Request:
    return Request(rid, prompt, mm_spans=tuple(spans), cache_salt_keys=tuple(salts))


def compute(kv: KVCacheManager, request: Request, num_tokens: int | None = None) -> int:
    """Do what the scheduler does for one chunk: attach hits, allocate, 'run', register blocks.
    Returns the prefix hit (tokens) when the request starts."""
    hit = 0
    if not kv.get_block_table(request.request_id) and request.num_computed_tokens == 0:
        hit = request.num_computed_tokens = kv.get_computed_blocks(request)
    n = num_tokens if num_tokens is not None else request.num_tokens - request.num_computed_tokens
    assert kv.allocate_slots(request, n)
    request.num_computed_tokens += n
    kv.cache_computed_blocks(request)
    return hit


PROMPT = list(range(100, 113))  # 13 tokens: 3 full blocks of 4 + 1


def test_allocate_grow_and_free_counts():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = make_request("a", PROMPT)
    assert kv.get_computed_blocks(req) == 0
    assert kv.can_allocate(req, 13)
    assert kv.num_free_blocks == 10  # the check changed nothing
    assert kv.allocate_slots(req, 5)  # a first chunk: positions 0..4 -> 2 blocks
    assert len(kv.get_block_table("a")) == 2 and kv.num_used_blocks == 2
    req.num_computed_tokens = 5
    assert kv.allocate_slots(req, 3)  # 0..7 still fits 2 blocks
    assert kv.num_used_blocks == 2
    req.num_computed_tokens = 8
    assert kv.allocate_slots(req, 5)
    assert kv.num_used_blocks == 4 and kv.num_free_blocks == 6
    kv.free(req)
    kv.free(req)  # idempotent
    assert kv.num_free_blocks == 10 and kv.get_block_table("a") == []


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", PROMPT)
    kv.get_computed_blocks(req)
    assert not kv.can_allocate(req, 13)
    assert not kv.allocate_slots(req, 13)
    assert kv.num_free_blocks == 2 and kv.get_block_table("a") == []
    assert kv.allocate_slots(req, 8)  # what fits still works
    assert kv.num_free_blocks == 0


def test_prefix_hit_same_tokens_and_same_image():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    span = MultimodalSpan("img-1", offset=2, length=5)
    a = make_request("a", PROMPT, [span])
    compute(kv, a)
    a_table = kv.get_block_table("a")
    kv.free(a)
    assert kv.num_free_blocks == 10 and kv.num_cached_blocks == 3  # freed, still cached

    b = make_request("b", PROMPT, [span])
    assert compute(kv, b) == 12  # 3 full blocks; token 12 is computed for its logits
    assert kv.get_block_table("b")[:3] == a_table[:3]
    assert (kv.prefix_queries, kv.prefix_hit_tokens, kv.prefix_query_tokens) == (2, 12, 26)


def test_full_hit_still_computes_the_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = PROMPT[:12]  # exactly 3 full blocks
    compute(kv, make_request("a", prompt))
    b = make_request("b", prompt)
    assert kv.get_computed_blocks(b) == 8
    assert kv.allocate_slots(b, 4)


def test_no_hit_for_a_different_image_at_the_same_position():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    compute(kv, make_request("a", PROMPT, [MultimodalSpan("img-1", 2, 5)]))
    assert compute(kv, make_request("b", PROMPT, [MultimodalSpan("img-2", 2, 5)])) == 0
    # Same image id, shifted by one position: different rows in each block, so no hit either.
    assert compute(kv, make_request("c", PROMPT, [MultimodalSpan("img-1", 3, 5)])) == 0
    # No image at all: the image blocks must not serve a text-only prompt.
    assert compute(kv, make_request("d", PROMPT)) == 0


def test_image_in_a_later_block_keeps_the_text_prefix_shared():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    compute(kv, make_request("a", PROMPT, [MultimodalSpan("img-1", 9, 3)]))
    # Blocks 0 and 1 have no image: shared. Block 2 holds the image: not shared.
    assert compute(kv, make_request("b", PROMPT, [MultimodalSpan("img-2", 9, 3)])) == 8


def test_partial_hit_when_only_some_blocks_match():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    compute(kv, make_request("a", PROMPT))
    other = PROMPT[:6] + [7, 7, 7, 7, 7, 7, 7]  # same first block and a half
    assert compute(kv, make_request("b", other)) == 4
    # Chaining: block 1 of `late` equals block 1 of `a`, but its parent differs -> no hit at all.
    late = [1, 1, 1, 1] + PROMPT[4:]
    assert compute(kv, make_request("c", late)) == 0


def test_cache_salt_keys_separate_every_block():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    compute(kv, make_request("a", PROMPT, salts=["cross-img-1"]))
    assert compute(kv, make_request("b", PROMPT, salts=["cross-img-2"])) == 0
    assert compute(kv, make_request("c", PROMPT)) == 0
    assert compute(kv, make_request("d", PROMPT, salts=["cross-img-1"])) == 12


def test_shared_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a, b = make_request("a", PROMPT), make_request("b", PROMPT)
    compute(kv, a)
    assert compute(kv, b) == 12
    shared = kv.get_block_table("a")[:3]
    assert kv.get_block_table("b")[:3] == shared
    assert [kv.blocks[i].ref_count for i in shared] == [2, 2, 2]
    assert kv.num_used_blocks == 5  # 3 shared + one partial tail each
    kv.free(a)
    assert [kv.blocks[i].ref_count for i in shared] == [1, 1, 1]
    assert kv.num_used_blocks == 4
    kv.free(b)
    assert kv.num_used_blocks == 0
    assert compute(kv, make_request("c", PROMPT)) == 12  # still cached after both left


def test_free_queue_is_lru_and_evicts_chain_tails_first():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", PROMPT[:9])  # 2 full blocks + 1 token
    compute(kv, a)
    kv.free(a)
    assert kv.num_cached_blocks == 2
    # The unhashed tail block and the never-used block go first: the cache survives.
    filler = make_request("f", [1] * 8)
    kv.get_computed_blocks(filler)
    assert kv.allocate_slots(filler, 8)
    assert kv.num_cached_blocks == 2
    # The next allocation evicts a cached block: the chain's tail, so the prefix still hits.
    filler2 = make_request("g", [2] * 4)
    kv.get_computed_blocks(filler2)
    assert kv.allocate_slots(filler2, 4)
    assert kv.num_cached_blocks == 1
    assert kv.get_computed_blocks(make_request("h", PROMPT[:9])) == 4


def test_unhashed_free_blocks_are_reused_before_cache_entries():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", PROMPT[:9])
    compute(kv, a)
    kv.free(a)  # 2 cache entries + 1 partial block
    b = make_request("b", [1] * 5)
    compute(kv, b)
    kv.free(b)  # 1 more cache entry + 1 partial block, freed after a's entries
    assert kv.num_cached_blocks == 3
    c = make_request("c", [3] * 4)
    kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, 4)
    assert kv.num_cached_blocks == 3  # took b's partial block, not a's oldest entry


def test_blocks_are_cached_only_once_computed():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", PROMPT)
    kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, 13)
    kv.cache_computed_blocks(a)  # nothing computed yet
    assert kv.num_cached_blocks == 0
    a.num_computed_tokens = 5
    kv.cache_computed_blocks(a)
    assert kv.num_cached_blocks == 1
    assert kv.get_computed_blocks(make_request("b", PROMPT)) == 4


def test_a_retried_admission_is_counted_once():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    compute(kv, make_request("a", PROMPT))
    b = make_request("b", PROMPT)
    for _ in range(3):  # the scheduler's rollback when allocation fails
        assert kv.get_computed_blocks(b) == 12
        kv.free(b)
    assert kv.prefix_queries == 1
    assert compute(kv, b) == 12
    assert (kv.prefix_queries, kv.prefix_hit_tokens) == (2, 12)


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    compute(kv, make_request("a", PROMPT))
    assert compute(kv, make_request("b", PROMPT)) == 0
    assert kv.num_cached_blocks == 0 and kv.prefix_hit_tokens == 0


def test_block_hash_is_strong_and_covers_every_input():
    base = compute_block_hash(b"", [1, 2, 3, 4], [("img", 0, 8)], ["s"])
    assert isinstance(base, bytes) and len(base) == 32
    assert base == compute_block_hash(b"", [1, 2, 3, 4], [("img", 0, 8)], ["s"])
    variants = [
        compute_block_hash(b"x", [1, 2, 3, 4], [("img", 0, 8)], ["s"]),
        compute_block_hash(b"", [1, 2, 3, 5], [("img", 0, 8)], ["s"]),
        compute_block_hash(b"", [1, 2, 3, 4], [("img2", 0, 8)], ["s"]),
        compute_block_hash(b"", [1, 2, 3, 4], [("img", 4, 8)], ["s"]),
        compute_block_hash(b"", [1, 2, 3, 4], [("img", 0, 9)], ["s"]),
        compute_block_hash(b"", [1, 2, 3, 4], [("img", 0, 8)], ["t"]),
        compute_block_hash(b"", [1, 2, 3, 4], [("img", 0, 8)], []),
        compute_block_hash(b"", [1, 2, 3, 4], [], ["s"]),
        compute_block_hash(b"", [1, 2, 3, 4], [], ["img"]),  # a salt is not an image
    ]
    assert len({base, *variants}) == len(variants) + 1
