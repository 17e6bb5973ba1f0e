"""Work the service runs on the engine between steps: `await engine.call(fn, *args)` -> `fn(core, *args)`.

Every function here is module-level and takes and returns picklable values, so the same call works
on the in-process engine (`AsyncLLMEngine`, run on its loop thread) and on the engine in a child
process (`ProcessEngineClient`, sent over a pipe). Never pass a lambda or a closure to `call`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_service.engine.engine_core import EngineCore, GenerationInput


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_free: int
    prefix_hit_tokens: int
    num_preemptions: int


def engine_stats(core: EngineCore) -> EngineStats:
    s = core.scheduler.stats()
    return EngineStats(
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        num_kv_blocks_used=s.num_used_blocks,
        num_kv_blocks_free=s.num_free_blocks,
        prefix_hit_tokens=s.prefix_hit_tokens,
        num_preemptions=s.num_preemptions,
    )


def has_unfinished_requests(core: EngineCore) -> bool:
    return core.has_unfinished_requests()


def tokenize_text(core: EngineCore, inp: GenerationInput) -> tuple[str, list[int], dict[int, str]]:
    """Tokenize RPC: the rendered prompt, its token ids (one token per placeholder, not expanded) and
    the placeholder token ids (id -> media type)."""
    text, add_special_tokens = core.render_prompt(inp)
    token_ids = core.prompt_builder.encode_text(text, add_special_tokens=add_special_tokens)
    return text, list(token_ids), core.prompt_builder.placeholder_token_ids()


def tokenize_prompt(core: EngineCore, inp: GenerationInput) -> tuple[str, list[int]]:
    """echo_prompt: the rendered prompt text and the token ids `add_request` would queue."""
    return core.tokenize_prompt(inp)
