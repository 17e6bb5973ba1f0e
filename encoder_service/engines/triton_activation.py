"""The vision MLP's activation (QuickGELU, tanh-GELU) as one Triton pointwise kernel with fast math.

Why: between the MLP's two cuBLAS GEMMs the activation is a pointwise pass over `[B * tokens, 4096]`
(CLIP ViT-L/14-336 at batch 64: 302 MB read + 302 MB written). Inductor's kernel for it computes the
sigmoid with IEEE-exact division and runs at ~2.8 TB/s on an H200, well under a copy's bandwidth
(benchmarks/results/encoder_kernels_*: `activation`). Both activations are `x * sigmoid(c(x))`:

* QuickGELU (CLIP): `x * sigmoid(1.702 x)`;
* tanh-GELU (SigLIP, `gelu_pytorch_tanh`): `0.5 x (1 + tanh(u)) = x * sigmoid(2u)`,
  `u = sqrt(2 / pi) (x + 0.044715 x^3)`.

Here the sigmoid is `1 / (1 + 2^(-c(x) log2 e))` with the hardware's approximate exp2 and reciprocal
(relative error ~1e-7, far below bf16's 4e-3 rounding step), computed in fp32 and rounded once to the
input dtype, as Inductor's fused kernel rounds. A fused GEMM + activation kernel was measured as well
and lost to cuBLAS + a separate activation (benchmarks/triton_linear_experiment.py).

`TritonActivation` replaces an HF activation module; CPU tensors (and dtypes the kernel does not
take) go through the module it replaced, unchanged. The kernel is a `torch.library.triton_op`, so
torch.compile and torch.export see it as a kernel of the graph, not an opaque call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

QUICK_GELU, TANH_GELU = 0, 1
# HF activation class name -> the kernel's activation id
ACTIVATIONS = {
    "QuickGELUActivation": QUICK_GELU,
    "GELUTanh": TANH_GELU,  # gelu_pytorch_tanh
    "PytorchGELUTanh": TANH_GELU,  # its older name
    "NewGELUActivation": TANH_GELU,  # gelu_new: the same formula in torch ops
}
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_LOG2E = 1.4426950408889634
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _sigmoid_activation_kernel(
    x_ptr, out_ptr, numel,
    ACTIVATION: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # out = x * sigmoid(c(x)) over a flat contiguous tensor; program i owns [i * BLOCK, (i + 1) * BLOCK)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    if ACTIVATION == 0:  # QuickGELU  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        z = 1.702 * x
    else:  # tanh-GELU: 0.5 x (1 + tanh(u)) == x * sigmoid(2u)
        z = (2.0 * 0.7978845608028654) * (x + 0.044715 * x * x * x)
    if FAST_MATH:
        gate = tl.fdiv(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp2(-1.4426950408889634 * z))
    else:
        gate = tl.sigmoid(z)
    tl.store(out_ptr + offsets, (x * gate).to(out_ptr.dtype.element_ty), mask=in_range)


@triton_op("vlm_encoder::sigmoid_activation", mutates_args=())
def sigmoid_activation(
    x: torch.Tensor, activation: int, fast_math: bool = True, block: int = 2048, num_warps: int = 8
) -> torch.Tensor:
    """`x * sigmoid(c(x))` elementwise (`activation`: QUICK_GELU or TANH_GELU); `x` any shape, CUDA."""
    source = x.contiguous()
    out = torch.empty_like(source)
    numel = source.numel()
    grid = (triton.cdiv(numel, block),)
    wrap_triton(_sigmoid_activation_kernel)[grid](
        source, out, numel, ACTIVATION=activation, FAST_MATH=fast_math, BLOCK=block, num_warps=num_warps
    )
    return out


def reference_activation(x: torch.Tensor, activation: int) -> torch.Tensor:
    """The same math in fp32 torch ops, rounded once: what Inductor's fused kernel computes."""
    x32 = x.float()
    tanh_argument = 2.0 * _SQRT_2_OVER_PI * (x32 + 0.044715 * x32.pow(3))
    z = 1.702 * x32 if activation == QUICK_GELU else tanh_argument
    return (x32 * torch.sigmoid(z)).to(x.dtype)


class TritonActivation(nn.Module):
    """Stands in for an HF QuickGELU / tanh-GELU module; CUDA tensors take the Triton kernel."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        kind = ACTIVATIONS.get(type(original).__name__)
        if kind is None:
            raise ValueError(f"no Triton kernel for activation {type(original).__name__}")
        self.original = original
        self.activation = kind

    @classmethod
    def supports(cls, module: nn.Module | None) -> bool:
        return type(module).__name__ in ACTIVATIONS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in KERNEL_DTYPES:
            return sigmoid_activation(x, self.activation)
        return self.original(x)
