"""OPT decoder (BLIP2-OPT's LM) over a paged KV cache. Names follow HF's, except that q/k/v are fused
(`qkv_proj`); the loader fills it from HF's tensors."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from llm_service.layers.attention import AttentionMetadata, paged_attention, write_kv
from llm_service.layers.linear import MergedLinear

KVCache = tuple[torch.Tensor, torch.Tensor]

# OPT's learned position table reserves its first two rows (a fairseq legacy).
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = self.num_heads
        self.head_dim = hidden // self.num_heads
        self.scale = self.head_dim**-0.5
        # HF's q_proj, k_proj and v_proj (with their biases), one GEMM: [3 * H, H], rows in that order
        self.qkv_proj = MergedLinear(hidden, {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden}, bias=bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [T, H] -> q, k, v: [T, heads, D] (strided views of the fused output)
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = self.qkv_proj.forward_split(x)
        return q.view(shape), k.view(shape), v.view(shape)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]  # x: [T, H]
        q, k, v = self.project_qkv(x)
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.out_proj(out.reshape(num_tokens, -1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, config.enable_bias
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = nn.Linear(hidden, config.ffn_dim, bias=bias)
        self.fc2 = nn.Linear(config.ffn_dim, hidden, bias=bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.activation_fn = ACT2FN[config.activation_function]

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, kv_cache, meta)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.activation_fn(self.fc1(h)))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, proj_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, proj_dim, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + _POSITION_OFFSET, hidden)
        self.project_in = nn.Linear(proj_dim, hidden, bias=False) if proj_dim != hidden else None
        self.project_out = nn.Linear(hidden, proj_dim, bias=False) if proj_dim != hidden else None
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine) if has_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.project_in(embeds) if self.project_in is not None else embeds
        x = x + self.embed_positions(positions + _POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, kv_cache, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return self.project_out(x) if self.project_out is not None else x


class OPTModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return len(self.model.decoder.layers)

    @property
    def kv_shape(self) -> tuple[int, int]:
        attn = self.model.decoder.layers[0].self_attn
        return attn.num_kv_heads, attn.head_dim

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)  # [T] -> [T, word_embed_proj_dim]

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model.decoder(embeds, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
