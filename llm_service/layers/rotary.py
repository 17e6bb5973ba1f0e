"""Rotary position embeddings, with frequencies from the checkpoint config (all HF rope types)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llm_service.layers.attention import is_fp8, triton_fp8_supported, write_kv


def _default_inv_freq(config) -> tuple[torch.Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary (non-contiguous) positions of a flattened token batch."""

    def __init__(self, config) -> None:
        super().__init__()
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(config)
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r} in the checkpoint config")
        if rope_type == "dynamic":
            raise ValueError("dynamic NTK rope scaling is not supported (frequencies depend on sequence length)")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, head_dim]
        freqs = positions[:, None].float() * self.inv_freq[None, :].to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
) -> torch.Tensor:
    """Rotary embedding of q and k, then k and v into their cache slots; returns the rotated q.

    q: [T, Hq, D], k/v: [T, Hkv, D] (may be strided views of one fused projection), cos/sin: [T, D].
    On CUDA with a power-of-two head dim this is one Triton kernel (q is rotated in place), except for
    an fp8 cache on a GPU older than compute capability 8.9 (Triton cannot store fp8 there)."""
    head_dim = q.shape[-1]
    fp8_ok = not is_fp8(kv_cache[0].dtype) or triton_fp8_supported(q.device)
    if q.is_cuda and head_dim & (head_dim - 1) == 0 and fp8_ok:
        from llm_service.layers import triton_ops

        return triton_ops.rotary_and_cache(q, k, v, cos, sin, kv_cache[0], kv_cache[1], slots)
    q, k = apply_rotary(q, k, cos, sin)
    write_kv(k, v, kv_cache[0], kv_cache[1], slots)
    return q


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, Hq, D], k: [T, Hkv, D], cos/sin: [T, D]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
