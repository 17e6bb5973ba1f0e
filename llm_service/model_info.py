"""What the service knows about its loaded model, gathered once at start-up from the engine.

`ModelDescription` feeds GetModelInfo and the checks on incoming embeddings (family, fingerprint,
kind, hidden size, video support).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm_service.engine.engine_core import EngineCore
from llm_service.engine.model_runner import CROSS_ATTENTION, PROMPT_TABLE
from vlm_protocol.checkpoint_identity import model_fingerprint


@dataclass(frozen=True)
class ModelDescription:
    family: str  # blip2 | llava | vila | llava_onevision | mllama | text
    model_id: str
    fingerprint: str
    embedding_kind: str  # PROMPT_TABLE or CROSS_ATTENTION
    hidden_size: int
    dtype: str  # canonical dtype name the model computes in, e.g. "float32"
    kv_cache_dtype: str  # the paged KV cache's element type, e.g. "bfloat16" or "float8_e4m3fn"
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    image_placeholder: str
    image_token_id: int | None
    video_placeholder: str  # empty when videos are not supported
    video_token_id: int | None
    supports_chat_template: bool

    @property
    def supports_video(self) -> bool:
        return bool(self.video_placeholder)


def _token_id(tokenizer, token: str | None) -> int | None:
    if not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def describe_model(core: EngineCore, model_dir: str | Path) -> ModelDescription:
    """Read the description off a loaded engine (call before requests flow: it touches the tokenizer)."""
    tokenizer = core.tokenizer
    spec = core.prompt_builder.spec
    video_token_id = _token_id(tokenizer, spec.video_token)
    return ModelDescription(
        family=core.family,
        model_id=Path(model_dir).resolve().name,
        fingerprint=model_fingerprint(model_dir),
        embedding_kind=CROSS_ATTENTION if core.runner.is_cross_attention_model else PROMPT_TABLE,
        hidden_size=int(core.hidden_size),
        dtype=str(core.config.torch_dtype).removeprefix("torch."),
        kv_cache_dtype=str(core.runner.kv_cache_dtype).removeprefix("torch."),
        max_model_len=int(core.max_model_len),
        vocab_size=int(core.vocab_size),
        eos_token_ids=tuple(int(t) for t in core.eos_token_ids),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_placeholder=spec.image_token,
        image_token_id=_token_id(tokenizer, spec.image_token),
        video_placeholder=spec.video_token if video_token_id is not None else "",
        video_token_id=video_token_id,
        supports_chat_template=bool(core.prompt_builder.chat_template),
    )
