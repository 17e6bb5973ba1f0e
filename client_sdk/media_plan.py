"""Ids-first bookkeeping for the media of one ``generate`` call (protos/README.md, "The ids-first protocol").

No I/O: the sync and async clients drive the same plan through the same steps:

1. ``lookup_request`` -> ``EncoderService.LookupEmbeddings`` -> ``apply_lookup`` (skipped with the
   shared-memory transport, where ``Encode`` answers a hit with a reference just as cheaply);
2. ``encode_request`` (only what the encoder lacks, and URLs) -> ``Encode`` -> ``apply_encode``;
3. ``llm_inputs()`` -> ``LlmService.Generate``: content ids, except the embeddings ``Encode`` has just
   computed, which go whole at once (new to the encoder's cache, so almost surely new to the LLM
   service: asking by id first would only cost a NOT_FOUND round trip), and those it returned as
   shared-memory references;
4. on NOT_FOUND: ``upload_ids(trailer)``; fetch what is not held locally (``fetch_request`` ->
   ``LookupEmbeddings(return_embeddings)`` -> ``apply_fetch``; still missing: encode again) and resend
   with ``llm_inputs(upload)``, which carries those embeddings whole.

LLM-first shortcut (``client_sdk.held_ids``): when the client remembers that the LLM service accepted
every item's locally computed id, ``skip_encoder()`` replaces steps 1 and 2, step 3 sends ids only,
and a NOT_FOUND goes through step 4 (the fetch then also tells what the encoder holds).

``llm_inputs`` returns sources (a content id or an ``Embedding``), not messages: the request builder
copies each embedding into the request once (``convert.build_generate_request``), where wrapping it in
a ``MultimodalInput`` first would copy its megabytes twice.

The encoder's ids are authoritative: an item's id is replaced by the one ``Encode`` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from vlm.v1 import common_pb2, encoder_service_pb2

from client_sdk.convert import LlmInput
from client_sdk.errors import InternalError, NotFoundError
from client_sdk.media import VIDEO, PreparedMedia
from vlm_protocol.media_ids import PreprocessingIdentity

logger = logging.getLogger(__name__)


class MediaPlan:
    """Content ids, cache outcomes and embeddings of one request's media, in request order."""

    def __init__(
        self,
        media: Sequence[PreparedMedia],
        identity: PreprocessingIdentity | None,
        *,
        default_num_frames: int = 0,
    ) -> None:
        self.media = list(media)
        self.uses_encoder = identity is not None  # False: text only, or one-call mode
        self.num_prompt_images = sum(m.media_type != VIDEO for m in self.media)
        self.content_ids: list[str | None] = [
            m.content_id(
                identity, default_num_frames=default_num_frames, num_prompt_images=self.num_prompt_images
            )
            if identity
            else None
            for m in self.media
        ]
        self.embeddings: dict[str, common_pb2.Embedding] = {}
        # Sent whole in the first LLM request: the embeddings Encode computed for this call (new to the
        # LLM service too, almost surely), and any Encode returned through shared memory (a reference:
        # cheaper to send than a NOT_FOUND round trip is to risk)
        self.fresh_ids: set[str] = set()
        # EncodeRequest.output_transport; UNSPECIFIED until the client decides (client_sdk.embedding_transport)
        self.output_transport: int = common_pb2.EMBEDDING_TRANSPORT_UNSPECIFIED
        self.encoder_cache_hits = 0
        self.tensors_uploaded = 0
        self.ids_disagree = False  # the encoder computed other ids than we did (identity changed?)
        self.encoder_skipped = False  # LLM-first shortcut: the encoder was not asked (so far)
        self._found: set[str] = set()
        self._renamed: dict[str, str] = {}  # local id -> the encoder's, where they differ
        # what makes two items the same input: the local id, else (URLs) the wire form
        self._keys: list[str | bytes] = [
            cid or m.item.SerializeToString(deterministic=True)
            for m, cid in zip(self.media, self.content_ids, strict=True)
        ]

    # --- encoder ------------------------------------------------------------------------------

    def skip_encoder(self) -> None:
        """LLM-first shortcut: the LLM service is believed to hold every item's local id; send ids only."""
        if not self.uses_encoder or any(cid is None for cid in self.content_ids):
            raise AssertionError("skip_encoder needs a locally computed id for every item")
        self.encoder_skipped = True

    def lookup_request(self) -> encoder_service_pb2.LookupEmbeddingsRequest | None:
        """Ask the encoder which locally known ids it holds; None when no id is known (URLs only), and
        with the shared-memory transport: there a hit costs `Encode` no more than a look-up (the
        embedding comes back as a reference either way), so the look-up round trip is skipped."""
        if self.output_transport == common_pb2.EMBEDDING_TRANSPORT_SHARED_MEMORY:
            return None
        ids = _unique(cid for cid in self.content_ids if cid)
        return encoder_service_pb2.LookupEmbeddingsRequest(content_ids=ids) if ids else None

    def apply_lookup(self, response: encoder_service_pb2.LookupEmbeddingsResponse) -> None:
        found = set(response.found_content_ids) & set(self.content_ids)
        self._found |= found
        self.encoder_cache_hits += len(found)

    def encode_indices(self) -> list[int]:
        """Items the encoder must see: unknown ids (URLs) and ids it does not hold, one per distinct input."""
        indices, seen = [], set()
        for i, (cid, key) in enumerate(zip(self.content_ids, self._keys, strict=True)):
            if (cid is None or cid not in self._found) and key not in seen:
                seen.add(key)
                indices.append(i)
        return indices

    def encode_request(self, indices: Sequence[int], request_id: str) -> encoder_service_pb2.EncodeRequest:
        return encoder_service_pb2.EncodeRequest(
            request_id=request_id,
            items=[self.media[i].item for i in indices],
            num_prompt_images=self.num_prompt_images,
            output_transport=self.output_transport,
        )

    def apply_encode(self, indices: Sequence[int], response: encoder_service_pb2.EncodeResponse) -> None:
        if len(response.results) != len(indices):
            raise InternalError(
                f"the encoder returned {len(response.results)} results for {len(indices)} items"
            )
        for i, encoded in zip(indices, response.results, strict=True):
            served_id = encoded.embedding.content_id
            if self.content_ids[i] is not None and self.content_ids[i] != served_id:
                self.ids_disagree = True
                self._renamed[self.content_ids[i]] = served_id
                logger.warning(
                    "encoder content id %s differs from the local one %s", served_id, self.content_ids[i]
                )
            for j, key in enumerate(self._keys):  # duplicates of item i share its id
                if key == self._keys[i]:
                    self.content_ids[j] = served_id
            self.embeddings[served_id] = encoded.embedding
            self._found.add(served_id)
            if encoded.cached:
                self.encoder_cache_hits += 1
            if not encoded.cached or encoded.embedding.features.HasField("shared_memory"):
                self.fresh_ids.add(served_id)

    # --- LLM ----------------------------------------------------------------------------------

    @property
    def resolved_ids(self) -> tuple[str, ...]:
        return tuple(cid or "" for cid in self.content_ids)

    def llm_inputs(self, upload: Collection[str] = ()) -> list[LlmInput]:
        """One input source per item: the whole embedding (once per id) for ids in ``upload`` and for
        fresh ones (encoded by this call; on a resend they go again, as the replica that answered may
        not have kept them), else the content id. Counts the embeddings sent whole."""
        whole = {self._renamed.get(cid, cid) for cid in upload} | self.fresh_ids
        inputs: list[LlmInput] = []
        sent: set[str] = set()
        for cid in self.content_ids:
            if cid is None:
                raise AssertionError("llm_inputs before every item has a content id")
            if cid in whole and cid not in sent and cid in self.embeddings:
                sent.add(cid)
                inputs.append(self.embeddings[cid])
            else:
                inputs.append(cid)
        self.tensors_uploaded += len(sent)
        return inputs

    def raw_inputs(self) -> list[LlmInput]:
        """One-call mode: the raw media, for the LLM service to encode through its encoder."""
        return [m.item for m in self.media]

    def upload_ids(self, missing: Iterable[str]) -> set[str]:
        """Ids to resend whole after NOT_FOUND: those named by the trailer (all of ours if it names none)."""
        ours = {cid for cid in self.content_ids if cid}
        named = set(missing)
        upload = named & ours if named else ours
        if not upload:
            raise NotFoundError(
                f"the LLM service reported unknown content ids that this request did not send: {sorted(named)}"
            )
        self.encoder_skipped = False  # the shortcut, if taken, failed: the encoder must serve these
        return upload

    def fetch_request(self, upload: Collection[str]) -> encoder_service_pb2.LookupEmbeddingsRequest | None:
        """Fetch from the encoder the embeddings to upload that this call did not encode itself."""
        ids = [cid for cid in _unique(self.content_ids) if cid in upload and cid not in self.embeddings]
        return (
            encoder_service_pb2.LookupEmbeddingsRequest(content_ids=ids, return_embeddings=True)
            if ids
            else None
        )

    def apply_fetch(self, response: encoder_service_pb2.LookupEmbeddingsResponse) -> None:
        for embedding in response.embeddings:
            self.embeddings[embedding.content_id] = embedding
            cid = embedding.content_id
            if cid in self.content_ids and cid not in self._found:  # no look-up counted it (shortcut)
                self._found.add(cid)
                self.encoder_cache_hits += 1

    @property
    def uses_shared_memory(self) -> bool:
        """Whether some embedding this plan holds has its features in the encoder's shared memory."""
        return any(e.features.HasField("shared_memory") for e in self.embeddings.values())

    def drop_shared_memory(self) -> set[str]:
        """Before a resend: from now on this plan's embeddings travel as bytes. Forgets the embeddings
        held only as shared-memory references (their slot may be gone) so that they are fetched (or
        encoded) again as bytes, and returns those that the resend carries whole anyway (the fresh
        ones): add them to the upload set so that they are fetched."""
        self.output_transport = common_pb2.EMBEDDING_TRANSPORT_BYTES
        dropped = {cid for cid, e in self.embeddings.items() if e.features.HasField("shared_memory")}
        for cid in dropped:
            del self.embeddings[cid]
        return dropped & self.fresh_ids

    def reencode_indices(self, upload: Collection[str]) -> list[int]:
        """Items whose embedding is still missing (the encoder evicted it): encode them again."""
        indices, seen = [], set()
        for i, cid in enumerate(self.content_ids):
            if cid in upload and cid not in self.embeddings and cid not in seen:
                seen.add(cid)
                indices.append(i)
        return indices

    def result_extras(self) -> dict[str, Any]:
        """The SDK's counters for GenerateResult / the final StreamDelta."""
        return {
            "encoder_cache_hits": self.encoder_cache_hits,
            "tensors_uploaded": self.tensors_uploaded,
            "content_ids": self.resolved_ids,
            "encoder_skipped": self.encoder_skipped,
        }


def _unique(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))
