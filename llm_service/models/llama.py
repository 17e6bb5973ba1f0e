"""Llama decoder (LLaVA, VILA, mllama's text side) over a paged KV cache. Names follow HF's, except
that q/k/v and gate/up are fused (`qkv_proj`, `gate_up_proj`); the loader fills them from HF's tensors.

Also the base for Qwen2, which differs only by biases on the q/k/v projections.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from llm_service.layers.attention import AttentionMetadata, paged_attention
from llm_service.layers.linear import Linear, MergedLinear
from llm_service.layers.norm import RMSNorm
from llm_service.layers.rotary import RotaryEmbedding, rotary_and_write_kv

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, num_kv_heads, head_dim]


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        hidden, inter = config.hidden_size, config.intermediate_size
        # HF's gate_proj and up_proj, one GEMM: [2 * I, H], gate rows first
        self.gate_up_proj = MergedLinear(hidden, {"gate_proj": inter, "up_proj": inter}, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.is_silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, H] -> down(act(gate) * up) [T, H], plus `residual` [T, H] when given (added by the
        down projection's kernel where it can: see `Linear`)."""
        if x.is_cuda and self.is_silu and x.dim() == 2:  # one fused kernel for SiLU(gate) * up
            from llm_service.layers import triton_ops

            return self.down_proj(triton_ops.silu_and_mul(self.gate_up_proj(x)), residual)
        gate, up = self.gate_up_proj.forward_split(x)  # [T, H] -> 2 x [T, I]
        return self.down_proj(self.act_fn(gate) * up, residual)


class LlamaAttention(nn.Module):
    qkv_bias_attr = "attention_bias"

    def __init__(self, config, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # HF's q_proj, k_proj and v_proj, one GEMM: [(Hq + 2 * Hkv) * D, H], rows in that order
        self.qkv_proj = MergedLinear(hidden, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, bias=qkv_bias)
        self.o_proj = Linear(q_size, hidden, bias=o_bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [T, H] -> q: [T, Hq, D], k, v: [T, Hkv, D] (strided views of the fused output)
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj.forward_split(x)
        return (
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
        )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, o_bias)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        q = self.before_attention(x, cos_sin, kv_cache, meta.slot_mapping)
        attn_out = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.self_attn.scale)  # [T, Hq, D]
        return self.after_attention(x, attn_out)

    def before_attention(self, x: torch.Tensor, cos_sin, kv_cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        """The layer up to attention: norm, q/k/v, rotary; writes the new K/V at `slots`. x: [T, H] ->
        q: [T, Hq, D]. With `after_attention`, what `PrefillGraphs` captures around the attention."""
        q, k, v = self.self_attn.project_qkv(self.input_layernorm(x))
        return rotary_and_write_kv(q, k, v, *cos_sin, kv_cache, slots)

    def after_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The rest of the layer: x [T, H] residual stream, attn_out [T, Hq, D] or [T, H] -> x [T, H]."""
        attn_out = self.self_attn.o_proj(attn_out.reshape(x.shape[0], -1))
        h, x = self.post_attention_layernorm.add_and_norm(attn_out, x)  # x += attn_out; h = norm(x)
        return self.mlp(h, residual=x)  # x + MLP(h)


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias, o_bias) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        cos_sin = self.rotary_emb(positions, embeds.dtype)
        x = embeds
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos_sin, kv_cache, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. `forward` takes input embeddings so image rows can replace placeholder tokens."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        qkv_bias, o_bias = self._projection_biases(config)
        self.model = LlamaModel(config, qkv_bias, o_bias)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _projection_biases(config) -> tuple[bool, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of every layer's cache."""
        attn = self.model.layers[0].self_attn
        return attn.num_kv_heads, attn.head_dim

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [T] -> [T, H]

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(embeds, positions, kv_caches, meta)  # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, H] -> [N, V]
