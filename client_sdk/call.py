"""What the sync and async clients share about one ``generate`` call: its validated inputs and its deadline."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from PIL import Image
from vlm.v1 import llm_service_pb2

from client_sdk import convert
from client_sdk.embedding_transport import TransportChoice
from client_sdk.errors import DeadlineExceededError, InvalidArgumentError, VlmClientError
from client_sdk.media import ImageInput, PreparedMedia, VideoInput, prepare_image, prepare_video
from client_sdk.media_plan import MediaPlan

REQUEST_ID_METADATA_KEY = "x-request-id"  # servers log under this id (vlm_protocol.grpc_server)

Prompt = str | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class CallSpec:
    """A validated ``generate`` call: prompt, prepared media and the request options, before any I/O."""

    prompt: Prompt
    media: tuple[PreparedMedia, ...]
    sampling: llm_service_pb2.SamplingParams
    output: llm_service_pb2.OutputOptions
    request_id: str
    prompt_format: int
    add_special_tokens: bool | None
    timeout_s: float

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_METADATA_KEY, self.request_id),)

    def request(self, request_cls: type, inputs: Sequence[convert.LlmInput]) -> Any:
        return convert.build_generate_request(
            request_cls,
            self.prompt,
            inputs,
            self.sampling,
            self.output,
            request_id=self.request_id,
            prompt_format=self.prompt_format,
            add_special_tokens=self.add_special_tokens,
        )


def _as_list(images: Any) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray, np.ndarray, Image.Image)) or not isinstance(
        images, Sequence
    ):
        return [images]
    return list(images)


def prepare_call(
    prompt: Prompt,
    images: ImageInput | Sequence[ImageInput] | None,
    video: VideoInput | None,
    *,
    num_frames: int | None,
    prompt_format: str | None,
    add_special_tokens: bool | None,
    request_id: str | None,
    timeout_s: float,
    sampling: Mapping[str, Any],
) -> CallSpec:
    """Validate a call's arguments and put its media in wire form (files are read here)."""
    sampling_msg, output_msg = convert.build_sampling(sampling)  # TypeError on unknown keywords, first
    if not isinstance(prompt, str):
        if isinstance(prompt, (bytes, Mapping)) or not isinstance(prompt, Sequence):
            raise InvalidArgumentError(
                f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}"
            )
        convert.chat_prompt(prompt)  # validate now rather than at send time
    if num_frames is not None and video is None:
        raise InvalidArgumentError("num_frames applies to a video; pass video=")
    media = [prepare_image(image) for image in _as_list(images)]
    if video is not None:
        media.append(prepare_video(video, num_frames))
    if add_special_tokens is not None and not isinstance(add_special_tokens, bool):
        raise InvalidArgumentError(f"add_special_tokens must be a bool or None, got {add_special_tokens!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise InvalidArgumentError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return CallSpec(
        prompt=prompt,
        media=tuple(media),
        sampling=sampling_msg,
        output=output_msg,
        request_id=request_id or uuid.uuid4().hex,
        prompt_format=convert.prompt_format_value(prompt_format),
        add_special_tokens=add_special_tokens,
        timeout_s=float(timeout_s),
    )


class Deadline:
    """The time budget of one call; each RPC gets what is left of it."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.start = time.monotonic()
        self.end = self.start + timeout_s

    def remaining(self, method: str = "", target: str = "") -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(
                f"{method + ': ' if method else ''}the call's {self.timeout_s:g} s timeout ran out",
                target=target,
                method=method,
            )
        return left

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.start) * 1000.0


def should_resend(
    exc: VlmClientError,
    plan: MediaPlan,
    attempt: int,
    *,
    one_call: bool,
    transport: TransportChoice | None = None,
) -> bool:
    """Whether a failed first LLM attempt is one that a resend with tensors as bytes fixes: the ids-first
    NOT_FOUND (a stale shared-memory slot included), or, in ``auto`` embedding transport, the LLM
    service refusing shared memory (``transport.fall_back`` then switches the client to bytes)."""
    if attempt != 1 or not plan.media or one_call:
        return False
    if exc.code == grpc.StatusCode.NOT_FOUND:
        return True
    return transport is not None and transport.fall_back(exc, plan.uses_shared_memory)
