"""Prompt building: chat templates, the original ensemble's per-family formats, and placeholder expansion.

Each image (or video) placeholder in the prompt becomes as many positions as its embedding has rows,
and those positions are recorded as `MultimodalSpan`s for the runner. mllama keeps its single
`<|image|>` token per image (images reach it through cross-attention instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llm_service.engine.request import MultimodalSpan
from vlm_protocol.errors import FailedPreconditionError, InvalidArgumentError

IMAGE = "image"
VIDEO = "video"

# The Triton ensemble's fixed wrappers (tensorrtllm_backend preprocessing, v0.19): (before, after)
# the user text; `{image}` marks where the image placeholder goes.
_VILA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
)
_ENSEMBLE_FORMATS = {
    "blip2": ("{image}", ""),
    "llava": ("USER:\n{image}", " ASSISTANT:"),
    "vila": (_VILA_SYSTEM + "USER: {image}\n", " ASSISTANT:"),
    "llava_onevision": ("<|im_start|>user {image}\n", "<|im_end|><|im_start|>assistant\n"),
    "mllama": ("{image}", ""),
}


@dataclass(frozen=True)
class MultimodalItem:
    """What the prompt builder needs to know of one image or video embedding."""

    content_id: str
    media_type: str  # IMAGE or VIDEO
    num_rows: int  # prompt-table rows (ignored for cross-attention embeddings)


@dataclass(frozen=True)
class PlaceholderSpec:
    image_token: str
    video_token: str | None
    expands: bool  # False for mllama: one token per image, no rows injected
    prepend_when_missing: bool  # BLIP2: image rows go before BOS when the prompt names no image


@dataclass(frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    mm_spans: tuple[MultimodalSpan, ...]


def placeholder_spec(family: str, config) -> PlaceholderSpec:
    if family == "mllama":
        return PlaceholderSpec("<|image|>", None, expands=False, prepend_when_missing=False)
    video = "<video>" if family == "llava_onevision" else None
    return PlaceholderSpec("<image>", video, expands=True, prepend_when_missing=family == "blip2")


class PromptBuilder:
    def __init__(self, family: str, tokenizer, spec: PlaceholderSpec, chat_template: str | None) -> None:
        self.family = family
        self.tokenizer = tokenizer
        self.spec = spec
        self.chat_template = chat_template

    def render_chat(
        self,
        messages: Sequence[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """Render chat messages ({"role", "content": str | [{"type": "text"|"image"|"video", ...}]})."""
        if not self.chat_template:
            raise FailedPreconditionError(
                "this checkpoint has no chat template: send `prompt` text instead of chat messages"
            )
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise InvalidArgumentError(
                "continue_final_message needs the last chat message to be an assistant turn"
            )
        return self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def ensemble_format(self, text: str, num_images: int) -> str:
        """The Triton ensemble's template around `text`, with image placeholders inserted (images only)."""
        before, after = _ENSEMBLE_FORMATS.get(self.family, ("{image}", ""))
        images = self.spec.image_token * num_images
        if self.family == "blip2":
            images = ""  # BLIP2 puts image rows before BOS: handled at tokenization
        return before.format(image=images) + text + after

    def _placeholder_ids(self) -> dict[int, str]:
        ids: dict[int, str] = {}
        for token, media in ((self.spec.image_token, IMAGE), (self.spec.video_token, VIDEO)):
            if token is None:
                continue
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise FailedPreconditionError(f"the tokenizer has no {token!r} token; cannot place {media} inputs")
            ids[token_id] = media
        return ids

    def _mllama_text(self, text: str) -> str:
        # Like HF's MllamaProcessor: without an explicit BOS, leading image tokens move before one.
        bos = self.tokenizer.bos_token
        if not bos or bos in text:
            return text
        stripped = text
        num_leading = 0
        while stripped.startswith(self.spec.image_token):
            stripped = stripped[len(self.spec.image_token) :]
            num_leading += 1
        return self.spec.image_token * num_leading + bos + stripped

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` with each placeholder left as its single token (before expansion)."""
        if self.family == "mllama":  # HF applies this to every prompt, images or not
            text = self._mllama_text(text)
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def placeholder_token_ids(self) -> dict[int, str]:
        """Placeholder token id -> media type (IMAGE or VIDEO)."""
        return self._placeholder_ids()

    def tokenize(self, text: str, items: Sequence[MultimodalItem], *, add_special_tokens: bool = True) -> TokenizedPrompt:
        base_ids = self.encode_text(text, add_special_tokens=add_special_tokens)
        placeholders = self._placeholder_ids()
        found = [(pos, placeholders[t]) for pos, t in enumerate(base_ids) if t in placeholders]
        items = list(items)
        prefix_items: list[MultimodalItem] = []
        if not found and items and self.spec.prepend_when_missing:
            prefix_items, items = items, []
        if [media for _, media in found] != [item.media_type for item in items]:
            raise InvalidArgumentError(
                f"the prompt has {_describe(found)} but {_describe_items(items)} were sent; "
                f"put one {self.spec.image_token!r} (or {self.spec.video_token!r}) in the prompt per input, in order"
            )
        if not self.spec.expands:
            return TokenizedPrompt(list(base_ids), ())
        token_ids: list[int] = []
        spans: list[MultimodalSpan] = []
        image_token_id = next(t for t, media in placeholders.items() if media == IMAGE)

        def emit_rows(item: MultimodalItem, token_id: int) -> None:
            if item.num_rows < 1:
                raise InvalidArgumentError(f"embedding {item.content_id} has no rows")
            spans.append(MultimodalSpan(item.content_id, len(token_ids), item.num_rows))
            token_ids.extend([token_id] * item.num_rows)

        for item in prefix_items:
            emit_rows(item, image_token_id)
        next_item = iter(items)
        for token_id in base_ids:
            if token_id in placeholders:
                emit_rows(next(next_item), token_id)
            else:
                token_ids.append(token_id)
        return TokenizedPrompt(token_ids, tuple(spans))


def _describe(found: list[tuple[int, str]]) -> str:
    images = sum(1 for _, m in found if m == IMAGE)
    videos = len(found) - images
    return f"{images} image and {videos} video placeholder(s)"


def _describe_items(items: Sequence[MultimodalItem]) -> str:
    images = sum(1 for item in items if item.media_type == IMAGE)
    return f"{images} image and {len(items) - images} video input(s)"
