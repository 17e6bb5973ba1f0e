"""Embeddings handed to the engine process (`--engine-process`) through a shared-memory ring, not the pipe.

Why: pickled into the command pipe, a 4.7 MB LLaVA image embedding cost the request ~14 ms before the
engine saw it on an H100 host (session 7: "LLM other" 17.0 ms per image request, 14.7 for a repeat
whose embedding the service still forwards, against 3.5 / 0.9 with the engine in-process;
results/scenario3_multimodal_c1_engine_process.json). On the CPU VM, torch's own pickling of such a
tensor takes 1.9 ms to dump and 2.5 ms to load, and a 4.7 MB round trip through a pipe 7.7 ms median.

Here the frontend copies each large feature tensor into a ring it owns (`vlm_protocol.shared_memory`,
one memcpy) and sends a `StagedTensor` reference; the engine process copies it out (one memcpy)
before it adds the request. A slot stays reserved (`keep`) until the engine has acknowledged the add,
so the ring never reuses bytes the engine has not read yet. When the ring has no room for a tensor
(a burst of requests larger than the ring), that tensor goes through the pipe as before.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

import torch

from llm_service.engine.engine_core import GenerationInput
from llm_service.engine.tensor_ref import TensorRef
from vlm_protocol.errors import SharedMemoryUnavailableError, StaleSharedMemoryError
from vlm_protocol.shared_memory import (
    SharedMemoryReader,
    SharedMemoryRing,
    SharedMemoryRingFullError,
    SharedMemorySlice,
)

logger = logging.getLogger(__name__)

MIN_STAGED_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True)
class StagedTensor(TensorRef):
    """Where a tensor's bytes wait in shared memory (the frontend's ring, or the encoder's when the
    service forwards its reference): what replaces it inside the pipe."""

    slice: SharedMemorySlice


class EmbeddingStager:
    """The frontend side: `stage(inp)` before pickling an add, `release(request_id)` once the engine
    acknowledged it. `stage` runs on the sender thread, `release` on the reader thread."""

    def __init__(self, ring: SharedMemoryRing, min_bytes: int = MIN_STAGED_BYTES) -> None:
        self.ring = ring
        self.min_bytes = min_bytes
        self._unread: dict[str, list[int]] = {}  # request id -> generations the engine has not read yet
        self._lock = threading.Lock()
        self.staged = 0  # tensors sent through the ring
        self.piped = 0  # large tensors that found no room and went through the pipe

    def stage(self, inp: GenerationInput) -> GenerationInput:
        embeddings = list(inp.embeddings)
        generations = []
        for i, embedding in enumerate(embeddings):
            features = embedding.features
            if not isinstance(features, torch.Tensor) or features.device.type != "cpu":
                continue
            nbytes = features.numel() * features.element_size()
            if nbytes < self.min_bytes:
                continue
            with self._lock:
                keep = {g for gens in self._unread.values() for g in gens} | set(generations)
            try:
                with self.ring.slot(nbytes, keep=keep) as (slice_, view):
                    flat = features.detach().contiguous().view(-1).view(torch.uint8).numpy()
                    view[:] = flat.data
            except (SharedMemoryRingFullError, SharedMemoryUnavailableError):  # no room, or shutting down
                self.piped += 1
                logger.debug("engine-process ring full: an embedding of %d bytes goes through the pipe", nbytes)
                continue
            generations.append(slice_.generation)
            staged = StagedTensor(slice=slice_, dtype=features.dtype, shape=tuple(features.shape))
            embeddings[i] = dataclasses.replace(embedding, features=staged)
        if not generations:
            return inp
        with self._lock:
            self._unread[inp.request_id] = generations
            self.staged += len(generations)
        return dataclasses.replace(inp, embeddings=tuple(embeddings))

    def release(self, request_id: str) -> None:
        """The engine has read (or will never read) this request's staged tensors."""
        with self._lock:
            self._unread.pop(request_id, None)

    @property
    def unread(self) -> int:
        with self._lock:
            return sum(len(gens) for gens in self._unread.values())


def unstage(inp: GenerationInput, reader: SharedMemoryReader) -> GenerationInput:
    """The engine side: every `StagedTensor` of `inp` read back into a tensor that owns its bytes.
    Raises what `SharedMemoryReader.read` raises; a reused slot as StaleSharedMemoryError naming the
    content id (NOT_FOUND: the client resends the embedding). In the frontend's ring that is a bug,
    as its slots are kept until read; in the encoder's ring (a forwarded reference) it can happen."""
    embeddings = list(inp.embeddings)
    changed = False
    for i, embedding in enumerate(embeddings):
        staged = embedding.features
        if not isinstance(staged, StagedTensor):
            continue
        try:
            buffer = reader.read(staged.slice, expected_length=staged.slice.length, field="staged embedding")
        except StaleSharedMemoryError:
            raise StaleSharedMemoryError(
                f"embedding {embedding.content_id}: its shared-memory slot was reused before the engine "
                "read it; resend the embedding bytes",
                content_ids=(embedding.content_id,),
            ) from None
        features = torch.frombuffer(buffer, dtype=staged.dtype).view(staged.shape)
        embeddings[i] = dataclasses.replace(embedding, features=features)
        changed = True
    return dataclasses.replace(inp, embeddings=tuple(embeddings)) if changed else inp


__all__ = ["MIN_STAGED_BYTES", "EmbeddingStager", "StagedTensor", "unstage"]
