"""Byte-bounded LRU cache of embeddings keyed by content id (thread-safe, no torch dependency).

The caller states each entry's size; the cache never holds more than ``max_bytes`` in total. An entry
larger than the whole budget is not stored (it would evict everything and still not fit).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    num_hits: int
    num_misses: int
    num_evictions: int
    num_entries: int
    num_bytes: int
    max_bytes: int


class EmbeddingCache(Generic[V]):
    """LRU over ``content_id -> value`` with a byte budget and hit/miss/eviction counters.

    ``get`` counts a hit or a miss and refreshes recency; ``peek`` does neither (for lookups that only
    report presence). ``max_bytes == 0`` disables the cache.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._num_bytes = 0
        self._num_hits = 0
        self._num_misses = 0
        self._num_evictions = 0
        self._lock = threading.Lock()

    def get(self, content_id: str) -> V | None:
        with self._lock:
            entry = self._entries.get(content_id)
            if entry is None:
                self._num_misses += 1
                return None
            self._entries.move_to_end(content_id)
            self._num_hits += 1
            return entry[0]

    def peek(self, content_id: str, *, touch: bool = False) -> V | None:
        """The value without counting; ``touch`` refreshes recency (the caller is about to use it)."""
        with self._lock:
            entry = self._entries.get(content_id)
            if entry is None:
                return None
            if touch:
                self._entries.move_to_end(content_id)
            return entry[0]

    def put(self, content_id: str, value: V, num_bytes: int) -> bool:
        """Store (or replace) an entry, evicting least recently used ones. False if it cannot fit."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        with self._lock:
            old = self._entries.pop(content_id, None)
            if old is not None:
                self._num_bytes -= old[1]
            if num_bytes > self._max_bytes:
                return False
            while self._num_bytes + num_bytes > self._max_bytes:
                _, (_, evicted_bytes) = self._entries.popitem(last=False)
                self._num_bytes -= evicted_bytes
                self._num_evictions += 1
            self._entries[content_id] = (value, num_bytes)
            self._num_bytes += num_bytes
            return True

    def __contains__(self, content_id: object) -> bool:
        with self._lock:
            return content_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._num_bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                num_hits=self._num_hits,
                num_misses=self._num_misses,
                num_evictions=self._num_evictions,
                num_entries=len(self._entries),
                num_bytes=self._num_bytes,
                max_bytes=self._max_bytes,
            )
