"""Paged KV-cache bookkeeping: block ids, reference counts, a free queue and prefix caching.

Pure Python: the model runner owns the KV tensor; this module only hands out block ids.

Prefix caching: once a FULL block's KV is computed, it is registered under a chained hash of
(parent block hash, its token ids, the images placed in it, the request's cache salt). Freed blocks
keep their hash and stay in the free queue as reusable cache entries until they are reallocated
(least recently freed first), so a later request with the same prefix skips that prefill.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from llm_service.engine.request import MultimodalSpan, Request

BlockHash = bytes

_ROOT_HASH: BlockHash = b""


def _framed(data: bytes) -> bytes:
    # Length-prefixing every field keeps the encoding unambiguous ("ab"+"c" != "a"+"bc").
    return len(data).to_bytes(8, "little") + data


def compute_block_hash(
    parent_hash: BlockHash,
    token_ids: Sequence[int],
    mm_keys: Sequence[tuple[str, int, int]] = (),
    salt_keys: Sequence[str] = (),
) -> BlockHash:
    """BLAKE2b-256 over a canonical encoding of one block's KV identity.

    `mm_keys` holds `(content_id, block start - span offset, span length)` for every image span
    overlapping the block: the same tokens with another image (or the same image shifted) must not
    share KV. `salt_keys` are content ids that affect every token (cross-attention images).
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(_framed(parent_hash))
    h.update(_framed(struct.pack(f"<{len(token_ids)}q", *token_ids)))
    for content_id, offset_in_span, span_length in mm_keys:
        h.update(b"M" + _framed(content_id.encode()))
        h.update(struct.pack("<qq", offset_in_span, span_length))
    for key in salt_keys:
        h.update(b"S" + _framed(key.encode()))
    return h.digest()


def _mm_keys(spans: Sequence[MultimodalSpan], start: int, end: int) -> list[tuple[str, int, int]]:
    return [(s.content_id, start - s.offset, s.length) for s in spans if s.overlap(start, end)]


@dataclass
class KVCacheBlock:
    block_id: int
    ref_count: int = 0
    # Set only while this block is THE registered cache entry for that hash.
    block_hash: BlockHash | None = None


class KVCacheManager:
    """Hands out KV blocks to requests; reuses cached full blocks across requests.

    Capacity checks (`can_allocate`) return a value and change nothing; `get_computed_blocks`,
    `allocate_slots`, `cache_computed_blocks` and `free` mutate. A request's block table is created
    by its first `get_computed_blocks`/`allocate_slots` and dropped by `free`.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, evicted from the front. OrderedDict: O(1) removal of a cached
        # block that a prefix hit revives from the middle of the queue.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._block_tables: dict[str, list[int]] = {}
        # Hit found by get_computed_blocks, counted only once allocate_slots admits the request, so
        # a request that retries admission for several steps is counted once.
        self._pending_hits: dict[str, int] = {}
        # Per request: how many leading blocks of its table cache_computed_blocks already handled.
        self._num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # requests admitted with prefix caching on
        self.prefix_query_tokens = 0  # known tokens of those requests
        self.prefix_hit_tokens = 0  # of which served from the cache

    # ---- counters ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached-but-idle blocks included: they can be reallocated)."""
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block ids, in position order (empty when it holds none)."""
        return list(self._block_tables.get(request_id, ()))

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix caching ------------------------------------------------------------------------

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """The chained hashes of the request's first `num_full_blocks` blocks (memoized on it)."""
        hashes = request.block_hashes
        tokens, bs = request.all_token_ids, self.block_size
        assert num_full_blocks * bs <= len(tokens)
        while len(hashes) < num_full_blocks:
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(
                compute_block_hash(
                    parent,
                    tokens[start : start + bs],
                    _mm_keys(request.mm_spans, start, start + bs),
                    request.cache_salt_keys,
                )
            )
        return hashes[:num_full_blocks]

    def get_computed_blocks(self, request: Request) -> int:
        """Attach the longest cached prefix to `request` (which holds no blocks); return its tokens.

        The last known token is never served from the cache (its logits are needed), so a full hit
        still leaves >= 1 token to compute. Hit blocks gain a reference. Undo with `free`.
        """
        assert request.request_id not in self._block_tables, f"{request.request_id} already holds blocks"
        table: list[int] = []
        self._block_tables[request.request_id] = table
        if not self.enable_prefix_caching:
            return 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        for block_hash in self._block_hashes(request, max_hit_blocks):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            self._touch(block_id)
            table.append(block_id)
        num_hit_tokens = len(table) * self.block_size
        self._pending_hits[request.request_id] = num_hit_tokens
        self._num_registered[request.request_id] = len(table)
        return num_hit_tokens

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV is now computed as prefix-cache entries.

        Called after a step ran (not at allocation), so a hit can never see KV not yet written.
        """
        if not self.enable_prefix_caching:
            return
        table = self._block_tables[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        assert num_full <= len(table)
        # Only blocks that became full since the last call: the rest were handled then.
        start = self._num_registered.get(request.request_id, 0)
        hashes = self._block_hashes(request, num_full)
        self._num_registered[request.request_id] = max(start, num_full)
        for i in range(start, num_full):
            block_id, block_hash = table[i], hashes[i]
            block = self.blocks[block_id]
            if block.block_hash is not None:
                assert block.block_hash == block_hash
            elif block_hash not in self._cached:
                # A duplicate (same prefix computed twice concurrently) stays unregistered; the
                # first copy keeps serving hits.
                block.block_hash = block_hash
                self._cached[block_hash] = block_id

    # ---- allocation ----------------------------------------------------------------------------

    def _num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        table = self._block_tables.get(request.request_id, ())
        needed = self.num_blocks_for_tokens(request.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(table))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Whether `allocate_slots(request, num_new_tokens)` would succeed now. Changes nothing."""
        return self._num_new_blocks(request, num_new_tokens) <= len(self._free_queue)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table to hold positions up to
        `num_computed_tokens + num_new_tokens`. Returns False, changing nothing, if blocks run out."""
        assert num_new_tokens > 0
        assert request.num_computed_tokens + num_new_tokens <= request.num_tokens
        num_new_blocks = self._num_new_blocks(request, num_new_tokens)
        if num_new_blocks > len(self._free_queue):
            return False
        table = self._block_tables.setdefault(request.request_id, [])
        for _ in range(num_new_blocks):
            table.append(self._pop_free_block())
        hit = self._pending_hits.pop(request.request_id, None)
        if hit is not None:
            self.prefix_queries += 1
            self.prefix_query_tokens += request.num_tokens
            self.prefix_hit_tokens += hit
        return True

    def reserve_position(self, request: Request, position: int) -> bool:
        """Grow the request's block table to hold `position`, which may lie one past its known
        tokens (a decode step scheduled before the previous step's token is known). Returns False,
        changing nothing, if blocks run out."""
        table = self._block_tables.setdefault(request.request_id, [])
        needed = self.num_blocks_for_tokens(position + 1) - len(table)
        if needed > len(self._free_queue):
            return False
        for _ in range(max(0, needed)):
            table.append(self._pop_free_block())
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references (idempotent). Its hashed blocks stay reusable as cache."""
        self._pending_hits.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        table = self._block_tables.pop(request.request_id, None)
        if not table:
            return
        # Tail first: within a chain the last blocks are evicted before the prefix they hang on.
        for block_id in reversed(table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_queue[block_id] = None
                if block.block_hash is None:
                    # Nothing to lose by reusing it: put it first in line, ahead of cache entries.
                    self._free_queue.move_to_end(block_id, last=False)

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free_queue[block_id]
        block.ref_count += 1

    def _pop_free_block(self) -> int:
        block_id, _ = self._free_queue.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.block_hash is not None:  # evict the cache entry it carried
            assert self._cached[block.block_hash] == block_id
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id
