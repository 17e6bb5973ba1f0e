"""RMSNorm computed in fp32, as the HF Llama/Qwen2 checkpoints were trained with.

On CUDA, 2-D inputs go through one fused Triton kernel (`triton_ops.add_rms_norm`) instead of six
eager ops; `add_and_norm` also folds in the residual add that precedes the norm.
"""

from __future__ import annotations

import torch
from torch import nn


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 2 and x.stride(-1) == 1


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x):
            from llm_service.layers import triton_ops

            return triton_ops.add_rms_norm(x, None, self.weight, self.eps)[0]
        return self._eager(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and the next norm in one pass."""
        if _fused(x) and _fused(residual):
            from llm_service.layers import triton_ops

            return triton_ops.add_rms_norm(x, residual, self.weight, self.eps)
        total = residual + x
        return self._eager(total), total

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)
