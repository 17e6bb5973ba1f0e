"""Qwen2 decoder (LLaVA-OneVision's LM): Llama with biases on q/k/v and none on o."""

from __future__ import annotations

from llm_service.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config) -> None:
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen2 checkpoints with use_sliding_window=true are not supported yet")
        super().__init__(config)

    @staticmethod
    def _projection_biases(config) -> tuple[bool, bool]:
        return True, False
