"""Byte-bounded LRU of multimodal embeddings keyed by content id (the ids-first protocol's server side).

A client uploads an embedding once; later requests name it by content id. Entries are checked again
on every hit (kind, hidden size, dtype, row count against what was recorded at insertion), so a
corrupted or incompatible entry is dropped and reported as a miss (the client then resends) instead
of reaching the model. Thread-safe: the gRPC loop and helper threads may share one cache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llm_service.engine.model_runner import CROSS_ATTENTION, PROMPT_TABLE, MultimodalEmbedding
from vlm_protocol.errors import InvalidArgumentError

logger = logging.getLogger(__name__)


def embedding_rows(embedding: MultimodalEmbedding) -> int:
    """Rows of the features viewed as a 2-D [rows, hidden] matrix."""
    return int(embedding.features.numel() // max(int(embedding.features.shape[-1]), 1))


def embedding_nbytes(embedding: MultimodalEmbedding) -> int:
    return embedding.features.numel() * embedding.features.element_size()


@dataclass(frozen=True)
class _Entry:
    embedding: MultimodalEmbedding
    shape: tuple[int, ...]
    dtype: torch.dtype
    num_bytes: int


@dataclass(frozen=True)
class EmbeddingCacheStats:
    num_entries: int
    num_bytes: int
    max_bytes: int
    num_hits: int
    num_misses: int
    num_evictions: int


class EmbeddingCache:
    """LRU over `max_bytes` of feature tensors; `max_bytes == 0` disables caching (every get misses).

    `kind` and `hidden_size` are the model's: embeddings of another kind or width are refused on
    insertion and never returned.
    """

    def __init__(self, max_bytes: int, *, kind: str, hidden_size: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if kind not in (PROMPT_TABLE, CROSS_ATTENTION):
            raise ValueError(f"kind must be {PROMPT_TABLE!r} or {CROSS_ATTENTION!r}, got {kind!r}")
        self.max_bytes = max_bytes
        self.kind = kind
        self.hidden_size = hidden_size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._num_bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, content_id: object) -> bool:
        with self._lock:
            return content_id in self._entries

    def stats(self) -> EmbeddingCacheStats:
        with self._lock:
            return EmbeddingCacheStats(
                len(self._entries), self._num_bytes, self.max_bytes, self._hits, self._misses, self._evictions
            )

    def put(self, embedding: MultimodalEmbedding) -> bool:
        """Insert (or refresh) an embedding; evicts least recently used entries to make room.

        Returns False when it is larger than the whole budget (the caller still uses it for its own
        request). Raises InvalidArgumentError for an embedding this model cannot use.
        """
        problem = self._incompatibility(embedding)
        if problem:
            raise InvalidArgumentError(f"embedding {embedding.content_id}: {problem}")
        entry = _Entry(
            embedding, tuple(embedding.features.shape), embedding.features.dtype, embedding_nbytes(embedding)
        )
        if entry.num_bytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(embedding.content_id, None)
            if old is not None:
                self._num_bytes -= old.num_bytes
            while self._entries and self._num_bytes + entry.num_bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._num_bytes -= evicted.num_bytes
                self._evictions += 1
            self._entries[embedding.content_id] = entry
            self._num_bytes += entry.num_bytes
        return True

    def get(self, content_id: str) -> MultimodalEmbedding | None:
        """The embedding held under `content_id` (marked recently used), or None (counted as a miss)."""
        with self._lock:
            entry = self._entries.get(content_id)
            if entry is not None:
                problem = self._entry_problem(entry)
                if problem:
                    # Should never happen (entries are checked on insertion); never feed it to the model.
                    logger.warning("dropping cached embedding %s: %s", content_id, problem)
                    del self._entries[content_id]
                    self._num_bytes -= entry.num_bytes
                    entry = None
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(content_id)
            self._hits += 1
            return entry.embedding

    def lookup(self, content_ids: Iterable[str]) -> tuple[dict[str, MultimodalEmbedding], list[str]]:
        """(found by id, missing ids in first-seen order without duplicates)."""
        found: dict[str, MultimodalEmbedding] = {}
        missing: list[str] = []
        for content_id in content_ids:
            if content_id in found or content_id in missing:
                continue
            embedding = self.get(content_id)
            if embedding is None:
                missing.append(content_id)
            else:
                found[content_id] = embedding
        return found, missing

    def _incompatibility(self, embedding: MultimodalEmbedding) -> str | None:
        features = embedding.features
        if embedding.kind != self.kind:
            return f"is a {embedding.kind} embedding; this model takes {self.kind}"
        if features.dim() < 1 or int(features.shape[-1]) != self.hidden_size:
            return f"has hidden size {int(features.shape[-1]) if features.dim() else 0}; the model's is {self.hidden_size}"
        if not features.is_floating_point():
            return f"has non-float dtype {features.dtype}"
        expected_dim = 2 if self.kind == PROMPT_TABLE else 4
        if features.dim() != expected_dim or embedding_rows(embedding) < 1:
            return (
                f"has shape {list(features.shape)}; expected {expected_dim} dimensions and at least one row"
            )
        return None

    def _entry_problem(self, entry: _Entry) -> str | None:
        problem = self._incompatibility(entry.embedding)
        if problem:
            return problem
        features = entry.embedding.features
        if features.dtype != entry.dtype or tuple(features.shape) != entry.shape:
            return (
                f"changed from {entry.dtype} {list(entry.shape)} to {features.dtype} {list(features.shape)}"
            )
        return None
