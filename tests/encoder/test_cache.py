"""EmbeddingCache: LRU order, byte budget, counters, oversize entries, thread safety."""

from __future__ import annotations

import threading

import pytest

from encoder_service.cache import EmbeddingCache


def test_hits_misses_and_lru_eviction_respect_the_byte_budget():
    cache: EmbeddingCache[str] = EmbeddingCache(max_bytes=100)
    assert cache.put("a", "A", 40)
    assert cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now the most recent
    assert cache.get("zzz") is None
    assert cache.put("c", "C", 40)  # 120 > 100: evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    stats = cache.stats()
    assert (stats.num_hits, stats.num_misses, stats.num_evictions) == (1, 1, 1)
    assert stats.num_bytes == 80 <= stats.max_bytes == 100
    assert stats.num_entries == 2


def test_an_entry_larger_than_the_budget_is_not_cached_and_evicts_nothing():
    cache: EmbeddingCache[str] = EmbeddingCache(max_bytes=100)
    cache.put("a", "A", 60)
    assert not cache.put("huge", "H", 101)
    assert "huge" not in cache and "a" in cache
    assert cache.stats().num_evictions == 0


def test_replacing_an_entry_updates_its_size_and_peek_counts_nothing():
    cache: EmbeddingCache[str] = EmbeddingCache(max_bytes=100)
    cache.put("a", "A", 60)
    cache.put("a", "A2", 30)
    assert cache.stats().num_bytes == 30
    assert cache.peek("a") == "A2" and cache.peek("missing") is None
    stats = cache.stats()
    assert (stats.num_hits, stats.num_misses) == (0, 0)


def test_peek_with_touch_refreshes_recency():
    cache: EmbeddingCache[str] = EmbeddingCache(max_bytes=2)
    cache.put("a", "A", 1)
    cache.put("b", "B", 1)
    cache.peek("a", touch=True)
    cache.put("c", "C", 1)
    assert "a" in cache and "b" not in cache


def test_zero_budget_disables_the_cache():
    cache: EmbeddingCache[str] = EmbeddingCache(max_bytes=0)
    assert not cache.put("a", "A", 1)
    assert cache.put("empty", "E", 0)  # zero-byte entries fit, harmlessly
    assert cache.get("a") is None
    with pytest.raises(ValueError):
        EmbeddingCache(max_bytes=-1)


def test_concurrent_puts_and_gets_keep_the_accounting_exact():
    cache: EmbeddingCache[int] = EmbeddingCache(max_bytes=1000)

    def worker(offset: int) -> None:
        for i in range(500):
            key = f"{offset}-{i % 50}"
            cache.put(key, i, 7 + i % 5)
            cache.get(key)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats.num_bytes <= 1000
    assert stats.num_hits + stats.num_misses == 2000
    assert stats.num_entries == len(cache)
