"""How many CPU threads torch's own operators may use in a service process.

On a GPU host the services' host-side torch work is small (copying an image embedding into a pinned
buffer, a processor's resize/normalize). Torch runs such an operator over an OpenMP team of one
thread per core, and the team finishes only when its last thread does: while the neighbouring
service's threads hold the cores (its own team spinning after an operator, gRPC, the tokenizer),
a 4.7 MB copy that takes 0.1 ms alone took ~5.6 ms in the LLM service (session 7, py-spy on an
H100 host). One thread per operator does not wait on anyone; the services get their parallelism
from their own threads (requests, batches), not from one operator.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

AUTO = 0  # --torch-threads 0


def apply_torch_threads(requested: int, device: str, *, service: str, cuda_auto: int = 1) -> int:
    """Set this process's torch intra-op thread count and return the count in effect.

    ``requested``: a count >= 1, or ``AUTO``: at most ``cuda_auto`` when the model runs on a CUDA
    device, unless ``OMP_NUM_THREADS`` is set (then torch's own reading of it stands); torch's
    default elsewhere (a CPU-only service computes the model with these threads).

    Call it from the main thread before any other thread runs a torch operator: with OpenMP, a
    thread that already ran one keeps the count it started with.
    """
    import torch

    if requested < 0:
        raise ValueError(f"torch threads must be >= 0 (0 = auto), got {requested}")
    if requested == AUTO:
        if not device.startswith("cuda") or os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        requested = max(1, min(cuda_auto, torch.get_num_threads()))
    if torch.get_num_threads() != requested:
        torch.set_num_threads(requested)
        logger.info("%s: torch uses %d CPU thread(s) per operator (--torch-threads)", service, requested)
    return torch.get_num_threads()


__all__ = ["AUTO", "apply_torch_threads"]
