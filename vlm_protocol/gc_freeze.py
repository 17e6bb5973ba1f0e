"""Keep Python's cyclic garbage collector off the objects a service builds at start.

After start-up a service process holds several hundred thousand long-lived Python objects (torch,
transformers, the tokenizer, the model's modules, compiled kernels' caches). Each collection of the
oldest generation walks every one of them while the thread that triggered it, the engine loop or a
batcher, stops: a full collection takes ~200 ms on the 2-core CI VM, and the engine loop stalled
for 230-300 ms twice per 5.5 s run of the 128/128 c256 benchmark on an H200 host, 8% of its
throughput (benchmarks/README.md, session 11). `gc.freeze()` moves everything alive into a permanent
generation that collections skip; objects created afterwards (requests, outputs) are collected as
before, and frozen objects are still freed by reference counting when their last reference goes.
"""

from __future__ import annotations

import atexit
import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_objects(owner: str) -> int:
    """Collect once, then freeze every object alive now (call it when start-up and warm-up are done).
    Returns the number of frozen objects; `owner` names the process in the log line."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    # at exit the interpreter's last collections must see them again: extension types (triton's
    # nanobind objects) report every instance left uncollected as a leak
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
    frozen = gc.get_freeze_count()
    logger.info(
        "%s: %d start-up objects frozen out of garbage collection (%.0f ms)",
        owner, frozen, 1e3 * (time.perf_counter() - started),
    )
    return frozen
