"""Host-to-device copies of large host tensors (image prompt tables) through one pinned buffer we keep.

Why: `Tensor.pin_memory()` per upload depends on torch's caching host allocator finding a free block of
the size class; a standalone probe on the H100 host (results/profile_host_upload.json) took 1.8 ms
median (5.9 ms worst) per 4.7 MB LLaVA embedding that way, against 0.09 ms copying into a pinned
buffer that already exists. Here one buffer, grown to the largest table seen (powers of two), stages
every upload; the next upload first waits for the previous copy to finish reading it (an event, long
complete in practice: a prefill runs between).

Measured limit (session 7, py-spy of the c=1 image benchmark): inside the LLM service the engine
thread still spends ~5.6 ms per image in the host copy into the staging buffer (it spent ~5.8 ms in
`pin_memory()` before), so the service's ~6 ms prefill gap over the engine alone is that host copy
of the shared-memory read's private buffer, not the allocator; why it is 60x slower there than in the
probe is not yet known (benchmarks/README.md, "Image TTFT, session 7").

Small tensors keep `sampler.to_device` (the allocator's cache serves their size classes well).
"""

from __future__ import annotations

import torch

from llm_service.layers.sampler import to_device

MIN_STAGED_BYTES = 1 << 20


class PinnedUploader:
    """`upload(t)` returns `t` on `device`; the host is never blocked on the GPU queue (only, rarely, on
    the previous staged copy). Not thread-safe: the engine loop owns it."""

    def __init__(self, device: torch.device | str, min_bytes: int = MIN_STAGED_BYTES) -> None:
        self.device = torch.device(device)
        self.min_bytes = min_bytes
        self._buffer: torch.Tensor | None = None  # [capacity] uint8, pinned
        self._copied: torch.cuda.Event | None = None  # after the last copy out of `_buffer`

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return t.to(self.device)
        nbytes = t.numel() * t.element_size()
        if self.device.type != "cuda" or nbytes < self.min_bytes:
            return to_device(t, self.device)
        t = t.contiguous()
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the buffer
        if nbytes > self.capacity:
            self._buffer = None  # free the old buffer before pinning the larger one
            self._buffer = torch.empty(1 << (nbytes - 1).bit_length(), dtype=torch.uint8, pin_memory=True)
        staged = self._buffer[:nbytes].view(t.dtype).view(t.shape)
        staged.copy_(t)
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        out.copy_(staged, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out


__all__ = ["MIN_STAGED_BYTES", "PinnedUploader"]
