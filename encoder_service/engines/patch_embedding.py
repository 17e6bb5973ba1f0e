"""A ViT's patch embedding (a Conv2d whose kernel equals its stride) as one GEMM over unfolded patches.

Why: cuDNN runs CLIP ViT-L/14-336's patch convolution at batch 64 as an implicit-GEMM kernel plus two
layout transposes (NCHW <-> NHWC), ~1.7 ms on an H100 for ~44 GFLOP
(benchmarks/results/encoder_kernels_bs64.txt); as `[B * patches, C * p * p] @ W.T` it is one
well-shaped cuBLAS GEMM after one copy that regroups the pixels by patch: 1.38 -> 0.23 ms compiled
on an H200 (benchmarks/results/encoder_kernels_h200.json). The arithmetic is the same (fp32
accumulation of the same products); only the summation order differs from cuDNN's.

The module is called like the convolution it replaces (`[B, C, H, W] -> [B, out, H // p, W // p]`),
so HF's embedding forward (flatten, CLS row, position embeddings) runs unchanged around it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def is_patch_convolution(module: nn.Module) -> bool:
    """A Conv2d that cuts the image into non-overlapping patches (kernel == stride, no padding)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == module.stride
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


class PatchLinear(nn.Module):
    """`conv` (see `is_patch_convolution`) as unfold + linear, sharing the convolution's weights."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not is_patch_convolution(conv):
            raise ValueError(f"not a patch convolution (kernel == stride, no padding or groups): {conv}")
        self.patch_size: tuple[int, int] = tuple(conv.kernel_size)  # type: ignore[assignment]
        self.out_channels = conv.out_channels
        # [out, in, ph, pw] -> [out, in * ph * pw]: a view, the patch vector ordered (channel, row, col)
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach(), requires_grad=False) if conv.bias is not None else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels [B, C, H, W] -> [B, out, H // ph, W // pw], as the convolution returns it
        batch, channels, height, width = pixels.shape
        ph, pw = self.patch_size
        rows, cols = height // ph, width // pw  # the convolution drops a remainder strip, so do we
        patches = (
            pixels[:, :, : rows * ph, : cols * pw]
            .reshape(batch, channels, rows, ph, cols, pw)
            .permute(0, 2, 4, 1, 3, 5)  # [B, rows, cols, C, ph, pw]
            .reshape(batch * rows * cols, channels * ph * pw)
        )
        embedded = F.linear(patches, self.weight, self.bias)  # [B * rows * cols, out]
        return embedded.view(batch, rows, cols, self.out_channels).permute(0, 3, 1, 2)
