"""The prompt-table uploader off a GPU: a CPU runner gets the host tensor itself (no copy, no pinning)."""

from __future__ import annotations

import torch

from llm_service.engine.pinned_upload import PinnedUploader


def test_cpu_device_returns_the_host_tensor():
    uploader = PinnedUploader("cpu", min_bytes=0)
    table = torch.randn(4, 8)
    assert uploader.upload(table) is table
    assert uploader.capacity == 0
