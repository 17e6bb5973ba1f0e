"""Embeddings staged in the engine-process frontend's shared-memory ring (llm_service/engine/staged_embeddings.py):
bit-exact round trips, slots kept until the engine acknowledges the add, and the pipe when the ring has no room."""

from __future__ import annotations

import pickle

import pytest
import torch

from llm_service.engine.engine_core import GenerationInput
from llm_service.engine.model_runner import PROMPT_TABLE, MultimodalEmbedding
from llm_service.engine.staged_embeddings import EmbeddingStager, StagedTensor, unstage
from vlm_protocol.shared_memory import SharedMemoryReader, SharedMemoryRing


def _input(request_id: str, *features: torch.Tensor) -> GenerationInput:
    embeddings = tuple(MultimodalEmbedding(f"cid-{request_id}-{i}", PROMPT_TABLE, f) for i, f in enumerate(features))
    return GenerationInput(request_id=request_id, prompt="<image>", embeddings=embeddings)


@pytest.fixture
def ring_and_reader(tmp_path):
    ring = SharedMemoryRing(64 << 10, directory=tmp_path)
    reader = SharedMemoryReader(directory=tmp_path)
    yield ring, reader
    reader.close()
    ring.close()


def test_round_trip_is_bit_exact_and_small_tensors_stay_inline(ring_and_reader):
    ring, reader = ring_and_reader
    stager = EmbeddingStager(ring, min_bytes=1024)
    big_bf16 = torch.randn(16, 64).to(torch.bfloat16)  # 2 KiB
    big_f32 = torch.randn(16, 64)[:, ::2]  # 2 KiB, strided: staged contiguous
    small = torch.randn(4, 4)
    inp = _input("a", big_bf16, big_f32, small)
    staged = pickle.loads(pickle.dumps(stager.stage(inp)))  # what crosses the pipe
    kinds = [type(e.features) for e in staged.embeddings]
    assert kinds == [StagedTensor, StagedTensor, torch.Tensor]
    assert len(pickle.dumps(staged)) < 2048  # references, not bytes
    back = unstage(staged, reader)
    for got, want in zip(back.embeddings, inp.embeddings, strict=True):
        assert got.features.dtype == want.features.dtype and torch.equal(got.features, want.features)
        assert got.content_id == want.content_id
    assert stager.staged == 2 and stager.unread == 2
    stager.release("a")
    assert stager.unread == 0
    assert stager.stage(_input("t", small)) is not None and stager.staged == 2  # nothing large: unchanged


def test_unread_slots_are_kept_and_a_full_ring_uses_the_pipe(ring_and_reader):
    ring, reader = ring_and_reader
    stager = EmbeddingStager(ring, min_bytes=1024)
    chunk = 24 << 10  # two fit in the 64 KiB ring, a third would overwrite the first
    tensors = [torch.full((chunk // 4,), float(i)) for i in range(3)]
    first = stager.stage(_input("r0", tensors[0]))
    second = stager.stage(_input("r1", tensors[1]))
    third = stager.stage(_input("r2", tensors[2]))
    assert isinstance(third.embeddings[0].features, torch.Tensor)  # no room: through the pipe, whole
    assert stager.piped == 1
    assert torch.equal(unstage(first, reader).embeddings[0].features, tensors[0])  # not overwritten
    stager.release("r0")  # the engine read r0: its slot may go
    fourth = stager.stage(_input("r3", tensors[2]))
    assert isinstance(fourth.embeddings[0].features, StagedTensor)
    assert torch.equal(unstage(second, reader).embeddings[0].features, tensors[1])
    assert torch.equal(unstage(fourth, reader).embeddings[0].features, tensors[2])


def test_prefault_maps_a_fresh_ring_on_both_sides(tmp_path):
    ring = SharedMemoryRing(64 << 10, directory=tmp_path)
    reader = SharedMemoryReader(directory=tmp_path)
    ring.prefault()
    reader.prefault(ring.name)
    assert reader.open_regions == (ring.name,)
    stager = EmbeddingStager(ring, min_bytes=0)
    features = torch.randn(32, 32)
    staged = stager.stage(_input("p", features))
    assert torch.equal(unstage(staged, reader).embeddings[0].features, features)
    with pytest.raises(ValueError, match="fresh ring"):
        ring.prefault()  # a slot is live now: zeros would overwrite it
    reader.close()
    ring.close()
