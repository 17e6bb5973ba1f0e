"""The prompt-table uploader (llm_service/engine/pinned_upload.py) on a GPU: every upload arrives intact
although one pinned buffer stages them all, including back-to-back uploads that reuse the buffer while
the previous copy may still be queued, a larger table that grows it, and small or strided inputs."""

from __future__ import annotations

import pytest
import torch

from llm_service.engine.pinned_upload import PinnedUploader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_back_to_back_uploads_share_one_buffer_and_arrive_intact():
    uploader = PinnedUploader("cuda", min_bytes=1 << 16)
    torch.manual_seed(0)
    # a long kernel ahead in the queue: the copies wait behind it while the host stages the next one
    busy = torch.randn(4096, 4096, device="cuda")
    sources = [torch.randn(576, 4096).to(torch.bfloat16) for _ in range(4)]
    sources.append(torch.randn(2 * 576, 4096).to(torch.bfloat16))  # grows the buffer
    sources.append(torch.randn(4096, 576).to(torch.bfloat16).t())  # strided: staged contiguous
    sources.append(torch.randn(8, 16))  # small: the allocator path
    outs = []
    for source in sources:
        for _ in range(3):
            busy = busy @ busy / 64
        outs.append(uploader.upload(source))
    torch.cuda.synchronize()
    for source, out in zip(sources, outs, strict=True):
        assert out.device.type == "cuda" and out.dtype == source.dtype and out.shape == source.shape
        assert torch.equal(out.cpu(), source)
    assert uploader.capacity == 1 << (2 * 576 * 4096 * 2 - 1).bit_length()
