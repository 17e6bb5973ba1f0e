"""The decoder's projections: `Linear` (decode-sized inputs may take the skinny GEMM kernel), and
`MergedLinear`, one GEMM in place of several HF Linear layers that read the same input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from llm_service.layers.triton_skinny import SkinnyGemmPolicy


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose inputs of at most 16 rows go to the Triton
    skinny GEMM where `skinny_policy` (set by the model runner after measuring, see triton_skinny.py)
    says it beats cuBLAS for this weight shape; otherwise, and always off CUDA, `F.linear`.

    `residual` ([T, out_features]) is added to the output: in the skinny kernel's epilogue, else as
    a separate add (rounded the same way: product, then sum)."""

    skinny_policy: SkinnyGemmPolicy | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        policy = self.skinny_policy
        if policy is not None and x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
            config = policy.config_for(x.shape[0], self.out_features, self.in_features, x.dtype)
            if config is not None and (residual is None or residual.stride(-1) == 1):
                from llm_service.layers.triton_skinny import skinny_matmul

                return skinny_matmul(x, self.weight, self.bias, config, residual)
        out = F.linear(x, self.weight, self.bias)
        return out if residual is None else residual + out


class MergedLinear(Linear):
    """Several same-input HF projections stacked along the output dim (e.g. q/k/v, or gate/up).

    One launch instead of several, and a wider GEMM, which matters at small batch. `parts` maps the
    HF sub-module names this layer stands for to their output sizes, in stacking order. Checkpoints
    keep the HF names: the loader fills rows `part_slices()[name]` of `weight` (and `bias`) from the
    HF tensor `<parent>.<name>.weight` (`.bias`), so no unfused copy is ever held.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)
        self.part_sizes = list(parts.values())

    def part_slices(self) -> dict[str, slice]:
        """HF sub-module name -> its rows of `weight` / `bias`."""
        slices, start = {}, 0
        for name, size in self.parts.items():
            slices[name] = slice(start, start + size)
            start += size
        return slices

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: [T, in] -> one [T, size] view per part (column blocks of the fused output; no copies)
        return self(x).split(self.part_sizes, dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.parts}"
