"""Thin client for the VLM serving stack (no torch, no transformers).

    import client_sdk
    result = client_sdk.generate("USER: <image>\\nWhich city is this? ASSISTANT:", images=["merlion.png"],
                                 max_tokens=16)
    print(result.text, result.timings.time_to_first_token_ms)

    for delta in client_sdk.generate("Tell me a story.", stream=True, max_tokens=64):
        print(delta.text, end="", flush=True)

Addresses come from the arguments ``encoder_address=`` / ``llm_address=``, else ``$VLM_ENCODER_ADDR`` /
``$VLM_LLM_ADDR`` (read at call time), else ``localhost:50051`` / ``localhost:50052``. Content ids are
computed here with the services' own function; the encoder is asked what it already holds, the LLM
service gets the embeddings the encoder has just computed whole and content ids for the rest (their
embeddings follow only if it answers NOT_FOUND). Media whose ids the LLM service has accepted before skip
the encoder altogether (the LLM-first shortcut, ``client_sdk.held_ids``). Text-only requests never touch
the encoder. ``Client`` and ``AsyncClient`` give control over connections and timeouts.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from client_sdk.async_client import AsyncClient, GenerationStream
from client_sdk.client import Client
from client_sdk.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    VlmClientError,
)
from client_sdk.media import ImageInput, VideoInput, image_content_id, load_image_bytes
from client_sdk.settings import ClientSettings
from client_sdk.types import (
    GenerateResult,
    PositionLogProbs,
    StreamDelta,
    Timings,
    TokenLogProb,
    Usage,
    join_deltas,
)

_default_clients: dict[tuple[str, str], Client] = {}
_default_lock = threading.Lock()


def default_client(encoder_address: str | None = None, llm_address: str | None = None) -> Client:
    """The shared ``Client`` for these addresses (resolved from the environment now), created on first use."""
    settings = ClientSettings.resolve(encoder_address, llm_address)
    key = (settings.encoder_address, settings.llm_address)
    with _default_lock:
        client = _default_clients.get(key)
        if client is None:
            client = _default_clients[key] = Client(*key)
        return client


def generate(
    prompt: str | Sequence[Any],
    images: ImageInput | Sequence[ImageInput] | None = None,
    video: VideoInput | None = None,
    stream: bool = False,
    *,
    encoder_address: str | None = None,
    llm_address: str | None = None,
    **kwargs: Any,
) -> GenerateResult | Iterator[StreamDelta]:
    """``default_client(encoder_address, llm_address).generate(prompt, images, video, stream, **kwargs)``.

    See ``Client.generate`` for the keywords (sampling fields by their proto names, ``timeout_s``, ...).
    """
    return default_client(encoder_address, llm_address).generate(prompt, images, video, stream, **kwargs)


@atexit.register
def _close_default_clients() -> None:
    with _default_lock:
        clients = list(_default_clients.values())
        _default_clients.clear()
    for client in clients:
        client.close()


__all__ = [
    "AsyncClient",
    "CancelledError",
    "Client",
    "ClientSettings",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GenerateResult",
    "GenerationStream",
    "ImageInput",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PositionLogProbs",
    "ResourceExhaustedError",
    "StreamDelta",
    "Timings",
    "TokenLogProb",
    "UnavailableError",
    "Usage",
    "VideoInput",
    "VlmClientError",
    "default_client",
    "generate",
    "image_content_id",
    "join_deltas",
    "load_image_bytes",
]
