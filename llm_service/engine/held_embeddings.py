"""Embeddings the engine process already holds (`--engine-process`): sent once, then by content id.

Why: the service forwards an image's embedding with every request that uses it, also when its
embedding cache answered the content id. In-process that costs nothing (a reference); to an engine
in its own process it cost a repeat ~3 ms more "LLM other" than in-process (3.8 vs 0.9 ms at
concurrency 1, H200 host, session 8): the 4.7 MB went through the ring again although the engine
process had read it for the first request.

The frontend alone decides what the engine process keeps. `HeldEmbeddings.plan` (on the sender
thread, so in pipe order) replaces each embedding the engine process holds by a `HeldTensor` and
names, in the add command, which of the request's embeddings to keep and which held ones to drop
(least recently sent first, within a byte budget). The engine process does exactly that
(`EmbeddingStore.apply`), in command order, so both sides agree without a reply.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass

import torch

from llm_service.engine.engine_core import GenerationInput
from vlm_protocol.errors import InternalError


@dataclass(frozen=True)
class HeldTensor:
    """Stands in, inside the pipe, for features the engine process keeps under `content_id`."""

    content_id: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StorePlan:
    """What the engine process does with its store for one add: drop `drop` first, then keep this
    request's embeddings whose content ids are in `keep`."""

    keep: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


class LostHeldEmbeddingError(InternalError):
    """The engine process was sent `content_id` by id but does not hold it (its add that should have
    kept it failed before the store saw it). The frontend forgets the id, so the next request sends
    the embedding whole again."""

    def __init__(self, content_id: str) -> None:
        super().__init__(
            f"the engine process does not hold embedding {content_id}, which the service sent by id; "
            "retry the request"
        )
        self.content_id = content_id

    def __reduce__(self):  # pickled across the pipe with its content id
        return type(self), (self.content_id,)


class HeldEmbeddings:
    """The frontend's mirror of the engine process's store: content id -> bytes, least recently
    sent first. The sender thread calls `plan`, then `commit` once the add is on its way; `forget`
    may come from any thread."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._held: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lost: set[str] = set()  # forgotten since the last plan
        self._lock = threading.Lock()
        self.sent_by_id = 0  # embeddings replaced by a HeldTensor

    def plan(self, inp: GenerationInput) -> tuple[GenerationInput, StorePlan, collections.OrderedDict[str, int]]:
        """(what to send, the engine's StorePlan, the mirror once it is sent: give it to `commit`)."""
        with self._lock:
            for content_id in self._lost:
                self._held.pop(content_id, None)
            self._lost.clear()
            order = self._held.copy()
        if self.budget_bytes == 0 or not inp.embeddings:
            return inp, StorePlan(), order
        embeddings = list(inp.embeddings)
        used: set[str] = set()
        keep: list[str] = []
        by_id = False
        for i, embedding in enumerate(embeddings):
            features = embedding.features
            content_id = embedding.content_id
            if not isinstance(features, torch.Tensor) or not content_id:
                continue
            used.add(content_id)
            if content_id in order:  # also a repeat within this request: its first one is kept first
                order.move_to_end(content_id)
                embeddings[i] = dataclasses.replace(
                    embedding, features=HeldTensor(content_id, features.dtype, tuple(features.shape))
                )
                by_id = True
                continue
            nbytes = features.numel() * features.element_size()
            if nbytes <= self.budget_bytes:
                order[content_id] = nbytes
                keep.append(content_id)
        drop = []
        total = sum(order.values())
        for content_id in list(order):
            if total <= self.budget_bytes:
                break
            if content_id in used:  # this request's own: kept even when briefly over budget
                continue
            total -= order.pop(content_id)
            drop.append(content_id)
        sent = dataclasses.replace(inp, embeddings=tuple(embeddings)) if by_id else inp
        return sent, StorePlan(tuple(keep), tuple(drop)), order

    def commit(self, order: collections.OrderedDict[str, int], sent: GenerationInput) -> None:
        """`sent` (as `plan` returned it) went out: the engine process will do what its plan says."""
        with self._lock:
            self._held = order
            self.sent_by_id += sum(1 for e in sent.embeddings if isinstance(e.features, HeldTensor))

    def forget(self, content_id: str) -> None:
        """The engine process reported it does not hold `content_id` (`LostHeldEmbeddingError`)."""
        with self._lock:
            self._lost.add(content_id)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def __contains__(self, content_id: str) -> bool:
        with self._lock:
            return content_id in self._held and content_id not in self._lost


class EmbeddingStore:
    """The engine process's side: content id -> features, changed only as the frontend's plans say.
    Per add: `drop(plan.drop)` first (also when the add fails later), then `resolve(inp, plan.keep)`."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def drop(self, content_ids: tuple[str, ...]) -> None:
        for content_id in content_ids:
            self._tensors.pop(content_id, None)

    def resolve(self, inp: GenerationInput, keep: tuple[str, ...]) -> GenerationInput:
        """`inp` with every `HeldTensor` replaced by the features held; keeps those named in `keep`."""
        embeddings = list(inp.embeddings)
        for i, embedding in enumerate(embeddings):
            held = embedding.features
            if isinstance(held, HeldTensor):
                features = self._tensors.get(held.content_id)
                if features is None or features.dtype != held.dtype or tuple(features.shape) != held.shape:
                    raise LostHeldEmbeddingError(held.content_id)
                embeddings[i] = dataclasses.replace(embedding, features=features)
            elif embedding.content_id in keep:
                self._tensors[embedding.content_id] = embedding.features
        return dataclasses.replace(inp, embeddings=tuple(embeddings)) if inp.embeddings else inp

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, content_id: str) -> bool:
        return content_id in self._tensors


__all__ = ["EmbeddingStore", "HeldEmbeddings", "HeldTensor", "LostHeldEmbeddingError", "StorePlan"]
