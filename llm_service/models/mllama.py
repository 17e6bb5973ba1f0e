"""Llama-3.2-Vision (mllama) text model: Llama self-attention layers plus gated cross-attention layers.

Image features never enter the prompt: each cross-attention layer attends from the text tokens to the
request's encoder features. Their K/V are computed once per request (`compute_cross_kv`) and held by
the runner, not in the paged cache. Requests without images skip the cross-attention layers, as HF does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.layers.attention import AttentionMetadata
from llm_service.layers.norm import RMSNorm
from llm_service.layers.rotary import RotaryEmbedding
from llm_service.models.llama import KVCache, LlamaAttention, LlamaDecoderLayer, LlamaMLP

# mllama's embedding table has 8 rows past the vocabulary for its reserved special tokens.
_EXTRA_EMBEDDING_ROWS = 8


@dataclass
class CrossAttentionInputs:
    """Per sequence of the batch: its cross-attention K/V and which features each of its tokens sees.

    `kv[i]` is None for a sequence without images (its tokens skip the cross-attention layers);
    otherwise one `(k, v)` pair per cross-attention layer, each `[L_enc, Hkv, D]`.
    `token_masks[i]` is `[n_i, L_enc]` bool for the sequence's tokens in this step.
    """

    kv: list[list[tuple[torch.Tensor, torch.Tensor]] | None]
    token_masks: list[torch.Tensor | None]


class MllamaTextCrossAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        # Not fused: q reads the text tokens, k/v the encoder features (once per request, off the hot path).
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project_kv(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # features: [L_enc, H] -> k, v: [L_enc, Hkv, D]
        k = self.k_norm(self.k_proj(features).view(-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(features).view(-1, self.num_kv_heads, self.head_dim)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [n, H]; k, v: [L_enc, Hkv, D]; mask: [n, L_enc] bool
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, self.num_heads, self.head_dim)).transpose(0, 1)  # [Hq, n, D]
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).to(q.dtype)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).to(q.dtype)
        # A token that may see no image attends to all of them (HF zeroes its mask row); its MLP
        # contribution is dropped by the caller.
        attend = mask | ~mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=self.scale)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.cross_attn = MllamaTextCrossAttention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), k, v, mask)
        sees_image = mask.any(dim=-1, keepdim=True).to(x.dtype)  # [n, 1]
        mlp_out = self.mlp(self.post_attention_layernorm(x)) * sees_image
        return x + self.cross_attn_mlp_gate.tanh() * mlp_out


class MllamaTextModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.cross_attention_layers = list(config.cross_attention_layers)
        self.embed_tokens = nn.Embedding(config.vocab_size + _EXTRA_EMBEDDING_ROWS, config.hidden_size)
        self.layers = nn.ModuleList(
            MllamaCrossAttentionDecoderLayer(config)
            if i in self.cross_attention_layers
            else LlamaDecoderLayer(config, qkv_bias=False, o_bias=False)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class MllamaForCausalLM(nn.Module):
    """The text side of mllama. Self-attention layers use the paged cache; cross-attention layers don't."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = MllamaTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            raise ValueError("mllama checkpoints with tied embeddings are not supported")
        self.self_attention_layers = [
            i for i in range(config.num_hidden_layers) if i not in self.model.cross_attention_layers
        ]

    @property
    def num_layers(self) -> int:
        """Layers that need a paged KV cache (self-attention layers only)."""
        return len(self.self_attention_layers)

    @property
    def kv_shape(self) -> tuple[int, int]:
        attn: LlamaAttention = self.model.layers[self.self_attention_layers[0]].self_attn
        return attn.num_kv_heads, attn.head_dim

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def compute_cross_kv(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[L_enc, H] encoder features -> one (k, v) per cross-attention layer, in layer order."""
        return [self.model.layers[i].cross_attn.project_kv(features) for i in self.model.cross_attention_layers]

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        cross: CrossAttentionInputs | None = None,
    ) -> torch.Tensor:
        cos_sin = self.model.rotary_emb(positions, embeds.dtype)
        x = embeds
        caches = iter(kv_caches)
        cross_index = 0
        for layer in self.model.layers:
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if cross is not None:
                    x = self._cross_layer(layer, x, cross, cross_index, meta)
                cross_index += 1
            else:
                x = layer(x, cos_sin, next(caches), meta)
        return self.model.norm(x)

    @staticmethod
    def _cross_layer(layer, x, cross: CrossAttentionInputs, cross_index: int, meta: AttentionMetadata):
        out = x.clone()
        for i in range(meta.num_seqs):
            if cross.kv[i] is None:
                continue  # no image: this sequence skips the layer
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            k, v = cross.kv[i][cross_index]
            out[start:end] = layer(x[start:end], k, v, cross.token_masks[i])
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
