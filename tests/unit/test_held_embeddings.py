"""Embeddings the engine process holds: the frontend's mirror and the engine's store stay in step."""

from __future__ import annotations

import pickle

import pytest
import torch

from llm_service.engine.engine_core import GenerationInput
from llm_service.engine.held_embeddings import (
    EmbeddingStore,
    HeldEmbeddings,
    HeldTensor,
    LostHeldEmbeddingError,
    StorePlan,
)
from llm_service.engine.model_runner import PROMPT_TABLE, MultimodalEmbedding
from vlm_protocol.errors import NotFoundError

ROWS, HIDDEN = 4, 8  # one embedding: 4 x 8 float32 = 128 bytes
NBYTES = ROWS * HIDDEN * 4


def _features(seed: int) -> torch.Tensor:
    return torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _input(request_id: str, *content_ids: str) -> GenerationInput:
    embeddings = tuple(
        MultimodalEmbedding(content_id=cid, kind=PROMPT_TABLE, features=_features(sum(map(ord, cid))))
        for cid in content_ids
    )
    return GenerationInput(request_id, prompt="x", embeddings=embeddings)


def _send(mirror: HeldEmbeddings, store: EmbeddingStore, inp: GenerationInput) -> tuple[GenerationInput, list[str]]:
    """One add through both sides, as the pipe would carry it: what the engine gets, and how each
    embedding travelled ("id" or "whole")."""
    sent, plan, order = mirror.plan(inp)
    mirror.commit(order, sent)
    how = ["id" if isinstance(e.features, HeldTensor) else "whole" for e in sent.embeddings]
    store.drop(plan.drop)
    return store.resolve(sent, plan.keep), how


def _assert_same_features(got: GenerationInput, want: GenerationInput) -> None:
    assert [e.content_id for e in got.embeddings] == [e.content_id for e in want.embeddings]
    for g, w in zip(got.embeddings, want.embeddings, strict=True):
        assert isinstance(g.features, torch.Tensor) and torch.equal(g.features, w.features)


def test_a_repeat_goes_by_id_and_the_engine_gets_the_same_bytes():
    mirror, store = HeldEmbeddings(10 * NBYTES), EmbeddingStore()
    first, how = _send(mirror, store, _input("r1", "a"))
    assert how == ["whole"] and "a" in store and "a" in mirror
    again = _input("r2", "a")
    got, how = _send(mirror, store, again)
    assert how == ["id"] and mirror.sent_by_id == 1
    _assert_same_features(got, again)
    assert got.embeddings[0].features is first.embeddings[0].features  # the kept tensor, no copy


def test_least_recently_sent_is_dropped_on_both_sides():
    mirror, store = HeldEmbeddings(2 * NBYTES), EmbeddingStore()
    _send(mirror, store, _input("r1", "a"))
    _send(mirror, store, _input("r2", "b"))
    _, how = _send(mirror, store, _input("r3", "a"))  # touches a: b is now the oldest
    assert how == ["id"]
    _send(mirror, store, _input("r4", "c"))
    assert "b" not in mirror and "b" not in store
    assert "a" in store and "c" in store and len(store) == 2 and mirror.held_bytes == 2 * NBYTES
    _, how = _send(mirror, store, _input("r5", "b"))
    assert how == ["whole"]


def test_one_requests_embeddings_are_never_dropped_by_its_own_add():
    mirror, store = HeldEmbeddings(NBYTES), EmbeddingStore()
    inp = _input("r1", "a", "b")  # two of them, room for one
    got, how = _send(mirror, store, inp)
    assert how == ["whole", "whole"] and "a" in store and "b" in store
    _assert_same_features(got, inp)
    _send(mirror, store, _input("r2", "c"))  # the next add brings both sides back under budget
    assert len(store) == 1 and "c" in store and mirror.held_bytes == NBYTES


def test_the_same_image_twice_in_one_request_is_sent_once():
    mirror, store = HeldEmbeddings(10 * NBYTES), EmbeddingStore()
    inp = _input("r1", "a", "a")
    got, how = _send(mirror, store, inp)
    assert how == ["whole", "id"]
    _assert_same_features(got, inp)


def test_too_big_or_no_budget_always_goes_whole():
    for budget in (0, NBYTES - 1):
        mirror, store = HeldEmbeddings(budget), EmbeddingStore()
        for request_id in ("r1", "r2"):
            _, how = _send(mirror, store, _input(request_id, "a"))
            assert how == ["whole"]
        assert len(store) == 0 and mirror.held_bytes == 0
    with pytest.raises(ValueError):
        HeldEmbeddings(-1)


def test_an_add_that_was_not_sent_changes_nothing():
    mirror, store = HeldEmbeddings(10 * NBYTES), EmbeddingStore()
    mirror.plan(_input("r1", "a"))  # planned, never committed (it could not be pickled or sent)
    assert "a" not in mirror
    _, how = _send(mirror, store, _input("r2", "a"))
    assert how == ["whole"]


def test_an_add_that_failed_before_its_store_is_forgotten_and_sent_whole_again():
    mirror, store = HeldEmbeddings(10 * NBYTES), EmbeddingStore()
    failed, failed_plan, order = mirror.plan(_input("r1", "a"))
    mirror.commit(order, failed)  # sent; the engine process fails it before keeping "a" (a reused slot)
    store.drop(failed_plan.drop)
    # meanwhile the next add, already planned, sends "a" by id
    sent, plan, order = mirror.plan(_input("r2", "a"))
    mirror.commit(order, sent)
    assert store.missing(failed, failed_plan) == ("a",)  # the failed add's reply names it ...
    with pytest.raises(LostHeldEmbeddingError, match="does not hold embedding a") as caught:
        store.resolve(sent, plan.keep)  # ... and the add in flight fails too
    error = pickle.loads(pickle.dumps(caught.value))  # as it crosses the pipe
    assert isinstance(error, LostHeldEmbeddingError) and error.content_id == "a"
    assert store.missing(sent, plan) == ("a",)
    mirror.forget("a")
    assert "a" not in mirror and mirror.get("a") is None
    inp = _input("r3", "a")
    got, how = _send(mirror, store, inp)
    assert how == ["whole"] and "a" in store and store.missing(inp, StorePlan(keep=("a",))) == ()
    _assert_same_features(got, inp)


def test_the_service_can_send_what_the_engine_holds_without_its_bytes():
    mirror, store = HeldEmbeddings(10 * NBYTES), EmbeddingStore()
    inp = _input("r1", "a")
    _send(mirror, store, inp)
    held = mirror.get("a")  # what the servicer adds to a request that names "a" by id
    assert isinstance(held.features, HeldTensor) and held.features.shape == (ROWS, HIDDEN)
    by_id = GenerationInput("r2", prompt="x", embeddings=(held,))
    got, how = _send(mirror, store, by_id)
    assert how == ["id"]
    _assert_same_features(got, inp)
    # dropped meanwhile (another add pushed it out): NOT_FOUND naming it, so the client resends it
    mirror.budget_bytes = NBYTES
    _send(mirror, store, _input("r3", "b"))
    with pytest.raises(NotFoundError) as caught:
        mirror.plan(by_id)
    assert caught.value.content_ids == ("a",)


def test_the_engines_store_never_outgrows_its_backstop():
    """Whatever a race left behind, the engine process holds at most `max_bytes` (oldest out first);
    a later by-id use of what it let go fails LostHeld, which the frontend heals."""
    store = EmbeddingStore(max_bytes=2 * NBYTES)
    for request_id, content_id in (("r1", "a"), ("r2", "b"), ("r3", "c")):
        store.resolve(_input(request_id, content_id), keep=(content_id,))
    assert "a" not in store and "b" in store and "c" in store and len(store) == 2
    store.resolve(_input("r4", "b"), keep=("b",))  # kept again: now the newest
    store.resolve(_input("r5", "d"), keep=("d",))
    assert "c" not in store and "b" in store and "d" in store
