"""Embeddings the engine process already holds (`--engine-process`): sent once, then by content id.

Why: the service forwards an image's embedding with every request that uses it, also when its
embedding cache answered the content id. In-process that costs nothing (a reference); to an engine
in its own process it cost a repeat ~3 ms more "LLM other" than in-process (3.8 vs 0.9 ms at
concurrency 1, H200 host, session 8): the 4.7 MB went through the ring again although the engine
process had read it for the first request.

The frontend decides what the engine process keeps. `HeldEmbeddings.plan` (on the sender thread,
so in pipe order) replaces each embedding the engine process holds by a `HeldTensor` and names, in
the add command, which of the request's embeddings to keep and which held ones to drop (least
recently sent first, within a byte budget). The engine process does that (`EmbeddingStore`), in
command order, so both sides agree without a reply on the happy path. An add that fails before its
features were read (a forwarded shared-memory slot reused meanwhile) names in its reply what the
engine process does not hold, and the frontend forgets those (`forget`); a request already on its
way with one of them by id fails with `LostHeldEmbeddingError` (INTERNAL, retry). As a backstop the
store never holds more than twice the budget (oldest first out), whatever a race left behind.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass

import torch

from llm_service.engine.engine_core import GenerationInput
from llm_service.engine.model_runner import MultimodalEmbedding
from llm_service.engine.tensor_ref import TensorRef
from vlm_protocol.errors import InternalError, NotFoundError


@dataclass(frozen=True, kw_only=True)
class HeldTensor(TensorRef):
    """Stands in, inside the pipe, for features the engine process keeps under `content_id`."""

    content_id: str


@dataclass(frozen=True)
class StorePlan:
    """What the engine process does with its store for one add: drop `drop` first, then keep this
    request's embeddings whose content ids are in `keep`."""

    keep: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


_Mirror = collections.OrderedDict[str, MultimodalEmbedding]


class LostHeldEmbeddingError(InternalError):
    """The engine process was sent `content_id` by id but does not hold it: an add that should have
    kept it failed before it was read (a slot reused, say) while this one was already on its way.
    The failed add's reply makes the frontend forget the id, so a retry sends the embedding whole."""

    def __init__(self, content_id: str) -> None:
        super().__init__(
            f"the engine process does not hold embedding {content_id}, which the service sent by id; "
            "retry the request"
        )
        self.content_id = content_id

    def __reduce__(self):  # pickled across the pipe with its content id
        return type(self), (self.content_id,)


class HeldEmbeddings:
    """The frontend's mirror of the engine process's store: content id -> the embedding with
    `HeldTensor` features, least recently sent first. The sender thread calls `plan`, then `commit`
    once the add is on its way; `get` and `forget` may come from any thread."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._held: collections.OrderedDict[str, MultimodalEmbedding] = collections.OrderedDict()
        self._lost: set[str] = set()  # forgotten since the last plan
        self._lock = threading.Lock()
        self.sent_by_id = 0  # embeddings replaced by a HeldTensor

    def plan(self, inp: GenerationInput) -> tuple[GenerationInput, StorePlan, _Mirror]:
        """(what to send, the engine's StorePlan, the mirror once it is sent: give it to `commit`).

        Features may be a tensor, a `TensorRef` whose bytes wait in shared memory, or a `HeldTensor`
        (the service found the id in `get`); one the engine process no longer holds raises
        NotFoundError with its content id, so the client resends it."""
        with self._lock:
            for content_id in self._lost:
                self._held.pop(content_id, None)
            self._lost.clear()
            order = self._held.copy()
        embeddings = list(inp.embeddings)
        used: set[str] = set()
        keep: list[str] = []
        for i, embedding in enumerate(embeddings):
            features = embedding.features
            content_id = embedding.content_id
            if isinstance(features, HeldTensor):
                if content_id not in order:
                    raise NotFoundError(
                        f"embedding {content_id} left the engine's store meanwhile; resend it in full",
                        content_ids=(content_id,),
                    )
            elif not content_id or not isinstance(features, torch.Tensor | TensorRef) or self.budget_bytes == 0:
                continue
            used.add(content_id)
            if content_id in order:  # also a repeat within this request: its first one is kept first
                order.move_to_end(content_id)
                embeddings[i] = order[content_id]
                continue
            held = HeldTensor(content_id=content_id, dtype=features.dtype, shape=tuple(features.shape))
            if held.nbytes <= self.budget_bytes:
                order[content_id] = dataclasses.replace(embedding, features=held)
                keep.append(content_id)
        drop = []
        total = sum(e.features.nbytes for e in order.values())
        for content_id in list(order):
            if total <= self.budget_bytes:
                break
            if content_id in used:  # this request's own: kept even when briefly over budget
                continue
            total -= order.pop(content_id).features.nbytes
            drop.append(content_id)
        changed = any(a is not b for a, b in zip(embeddings, inp.embeddings, strict=True))
        sent = dataclasses.replace(inp, embeddings=tuple(embeddings)) if changed else inp
        return sent, StorePlan(tuple(keep), tuple(drop)), order

    def commit(self, order: _Mirror, sent: GenerationInput) -> None:
        """`sent` (as `plan` returned it) went out: the engine process will do what its plan says."""
        with self._lock:
            self._held = order
            self.sent_by_id += sum(1 for e in sent.embeddings if isinstance(e.features, HeldTensor))

    def get(self, content_id: str) -> MultimodalEmbedding | None:
        """The embedding (with `HeldTensor` features) if the engine process holds it, else None."""
        with self._lock:
            return None if content_id in self._lost else self._held.get(content_id)

    def forget(self, content_id: str) -> None:
        """The engine process reported it does not hold `content_id` (`LostHeldEmbeddingError`)."""
        with self._lock:
            self._lost.add(content_id)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(e.features.nbytes for e in self._held.values())

    def __contains__(self, content_id: str) -> bool:
        return self.get(content_id) is not None


class EmbeddingStore:
    """The engine process's side: content id -> features, changed only as the frontend's plans say.
    Per add: `drop(plan.drop)` first (also when the add fails later), then `resolve(inp, plan.keep)`;
    a failed add reports `missing(...)` back, so that the frontend's mirror stays a subset of it."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes  # None: only the plans bound it
        self._tensors: dict[str, torch.Tensor] = {}  # oldest kept first
        self._bytes = 0

    def drop(self, content_ids: tuple[str, ...]) -> None:
        for content_id in content_ids:
            self._pop(content_id)

    def _pop(self, content_id: str) -> None:
        tensor = self._tensors.pop(content_id, None)
        if tensor is not None:
            self._bytes -= tensor.numel() * tensor.element_size()

    def _keep(self, content_id: str, tensor: torch.Tensor) -> None:
        self._pop(content_id)
        self._tensors[content_id] = tensor
        self._bytes += tensor.numel() * tensor.element_size()
        while self.max_bytes is not None and self._bytes > self.max_bytes and len(self._tensors) > 1:
            self._pop(next(iter(self._tensors)))  # a later by-id use fails LostHeld and heals

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
            elif embedding.content_id in keep and isinstance(held, torch.Tensor):
                self._keep(embedding.content_id, held)
        return dataclasses.replace(inp, embeddings=tuple(embeddings)) if inp.embeddings else inp

    def missing(self, sent: GenerationInput, plan: StorePlan) -> tuple[str, ...]:
        """Content ids this add named (kept by `plan`, or sent as a `HeldTensor`) that the store does
        not hold: after a failed add, the ones the frontend must forget."""
        named = list(plan.keep) + [e.content_id for e in sent.embeddings if isinstance(e.features, HeldTensor)]
        return tuple(dict.fromkeys(cid for cid in named if cid not in self._tensors))

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, content_id: str) -> bool:
        return content_id in self._tensors


__all__ = ["EmbeddingStore", "HeldEmbeddings", "HeldTensor", "LostHeldEmbeddingError", "StorePlan"]
