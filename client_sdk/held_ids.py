"""The LLM-first shortcut: which content ids the LLM service is known to hold (protos/README.md).

For a repeated image the LLM service usually still holds the embedding (and its KV prefix), so the
ids-first flow's ``EncoderService.LookupEmbeddings`` is a wasted round trip. A client remembers, in a
bounded LRU, the content ids the LLM service accepted (sent whole or by id) in a successful
``Generate``, or a ``GenerateStream`` that delivered its first message (the service resolves every id
before generating). When every media item of a call has a locally computed id (a URL has none: the
encoder must fetch it to learn it) and every one of those ids is remembered, the call skips the
encoder and sends ids to the LLM service. If it answers NOT_FOUND (it evicted
them, or another replica answered), the ids it names (all of the call's when it names none) are
forgotten and the call falls back to the encoder: fetch the missing embeddings it holds, encode the
rest, resend them whole (``MediaPlan`` step 4). A second NOT_FOUND is an error, as without the
shortcut.

No I/O: the sync and async clients drive the same steps. A lock guards the LRU, so the threads of
one sync ``Client`` may share it (the async client uses it from one event loop, uncontended).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from client_sdk.errors import InvalidArgumentError

if TYPE_CHECKING:  # settings imports this module; keep it light
    from client_sdk.media_plan import MediaPlan

DEFAULT_HELD_IDS_CAPACITY = 4096


class HeldIds:
    """Bounded LRU of content ids the LLM service accepted; ``capacity`` 0 disables the shortcut."""

    def __init__(self, capacity: int = DEFAULT_HELD_IDS_CAPACITY) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidArgumentError(f"held_ids_capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def __contains__(self, content_id: object) -> bool:
        with self._lock:
            return content_id in self._ids

    def ids(self) -> list[str]:
        """The remembered ids, least recently accepted first."""
        with self._lock:
            return list(self._ids)

    # --- the steps of one call ----------------------------------------------------------------

    def take_shortcut(self, plan: MediaPlan) -> bool:
        """Whether ``plan`` may skip the encoder; if so, marks it (``plan.skip_encoder()``).

        True only when the shortcut is enabled, the call talks to the encoder itself (not one-call
        mode, not text only), every item has a locally computed id and all of them are remembered.
        """
        if not self.capacity or not plan.uses_encoder or not plan.media:
            return False
        ids = plan.content_ids
        if any(cid is None for cid in ids):
            return False
        with self._lock:
            if not all(cid in self._ids for cid in ids):
                return False
        plan.skip_encoder()
        return True

    def accepted(self, plan: MediaPlan) -> None:
        """The LLM service accepted the plan's ids (a Generate succeeded, a stream's first message came):
        remember them as the most recently used, evicting the least recently used beyond capacity."""
        if not self.capacity or not plan.uses_encoder:
            return
        ids = [cid for cid in dict.fromkeys(plan.content_ids) if cid]
        with self._lock:
            for cid in ids:
                self._ids[cid] = None
                self._ids.move_to_end(cid)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def not_found(self, plan: MediaPlan, missing: Iterable[str]) -> None:
        """The LLM service answered NOT_FOUND naming ``missing``: forget those ids, and all of the call's
        when the trailer names none of them (the service may hold none of them)."""
        named = set(missing)
        ours = {cid for cid in plan.content_ids if cid}
        self.forget(named if named & ours else named | ours)

    # --- maintenance --------------------------------------------------------------------------

    def forget(self, ids: Iterable[str]) -> None:
        with self._lock:
            for cid in ids:
                self._ids.pop(cid, None)

    def clear(self) -> None:
        """Forget every id (the client does when the encoder's ids disagree with the local ones)."""
        with self._lock:
            self._ids.clear()


__all__ = ["DEFAULT_HELD_IDS_CAPACITY", "HeldIds"]
