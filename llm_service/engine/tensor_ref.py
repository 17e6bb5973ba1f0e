"""A tensor's dtype and shape without its bytes: what stands in for embedding features on their way
to the engine process (`staged_embeddings.StagedTensor`, `held_embeddings.HeldTensor`).

It answers the metadata questions the service and the engine ask of features before they need the
values (`shape`, `dtype`, `dim()`, `numel()`, `element_size()`, `is_floating_point()`), so checks and
prompt building run unchanged; the engine process swaps in the real tensor before the model reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class TensorRef:
    dtype: torch.dtype
    shape: tuple[int, ...]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()


__all__ = ["TensorRef"]
