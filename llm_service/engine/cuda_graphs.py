"""CUDA graphs for decode steps: one graph per (padded batch size, padded key-block count).

Why: an eager decode step of a 7B model launches hundreds of small kernels, and on an H100 the CPU
time to launch them (tens of ms) is several times the ~5 ms of GPU work. A graph replays the whole
step (embedding, every layer, final norm) with one launch.

What runs in a graph: decode-only steps (every sequence has exactly one new token, no prompt-table
rows) of self-attention models, with the batched or triton attention backend. Everything else (prefill,
mixed steps, batches or contexts past the captured buckets, mllama) runs eagerly; the runner
decides.

Padding: the batch is padded up to a bucket (1, 2, 4, 8, then multiples of 16, as nano-vllm does).
Padding rows read token 0 at position 0, write their K/V into a scratch block no request owns (the
KV tensor has one block more than the scheduler hands out) and attend to that block alone. Keys are
gathered for a bucket of blocks (powers of two) that covers the longest context, so the padded K/V
gather of the batched attention path stays proportional to the real contexts; (batch, blocks)
pairs whose gather would exceed `max_gather_tokens` are not captured. The triton backend reads each
sequence's own length on the device, so it needs no block buckets: one graph per batch size, over
the full block-table width.

Static buffers: every graph reads the same input tensors (sized for the largest bucket) and writes
its hidden states into one output tensor; all graphs share one memory pool and are captured largest
first, so smaller graphs reuse the largest one's blocks.

`capture=False` keeps the static buffers, the padding and the bucketing but runs the step eagerly:
the whole path except capture/replay can then be tested on CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from llm_service.layers.attention import (
    DEFAULT_MAX_GATHER_TOKENS,
    AttentionMetadata,
    decode_group,
    padded_block_tables,
)

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size] + list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


def block_buckets(max_blocks: int) -> list[int]:
    sizes = []
    n = 1
    while n < max_blocks:
        sizes.append(n)
        n *= 2
    return [*sizes, max_blocks]


def _bucket(value: int, buckets: Sequence[int]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        scratch_block: int,
        max_batch_size: int,
        max_blocks_per_seq: int,
        hidden_size: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: bool,
        attention_backend: str = "batched",
        max_gather_tokens: int = DEFAULT_MAX_GATHER_TOKENS,
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        self.capture = capture
        assert attention_backend in ("batched", "triton"), attention_backend
        self.attention_backend = attention_backend
        self.batch_sizes = batch_buckets(max_batch_size)
        if attention_backend == "triton":
            self.block_counts = [max_blocks_per_seq]
            self.keys = [(b, max_blocks_per_seq) for b in self.batch_sizes]
        else:
            self.block_counts = block_buckets(max_blocks_per_seq)
            self.keys = [
                (b, n) for b in self.batch_sizes for n in self.block_counts if b * n * block_size <= max_gather_tokens
            ]
        # static inputs, sized for the largest bucket; every graph reads views of these
        max_b, max_n = self.batch_sizes[-1], self.block_counts[-1]
        self.input_ids = torch.zeros(max_b, dtype=torch.long, device=device)  # [B]
        self.positions = torch.zeros(max_b, dtype=torch.long, device=device)  # [B]
        self.slot_mapping = torch.zeros(max_b, dtype=torch.long, device=device)  # [B]
        self.seq_lens = torch.ones(max_b, dtype=torch.long, device=device)  # [B]
        self.block_tables = torch.zeros(max_b, max_n, dtype=torch.long, device=device)  # [B, nb]
        self.hidden = torch.zeros(max_b, hidden_size, dtype=dtype, device=device)  # [B, H] static output
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        if capture:
            self._capture_all()

    # --- lookup -------------------------------------------------------------------------------------

    def bucket_for(self, num_seqs: int, max_seq_len: int) -> tuple[int, int] | None:
        """The (batch, blocks) bucket serving this step, or None if it must run eagerly."""
        batch = _bucket(num_seqs, self.batch_sizes)
        blocks = _bucket(-(-max_seq_len // self.block_size), self.block_counts)
        if batch is None or blocks is None:
            return None
        key = (batch, blocks)
        if self.capture:
            return key if key in self.graphs else None
        return key if key in self.keys else None

    # --- one step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Hidden states `[B, H]` of one decode step: sequence i adds token `token_ids[i]` at position
        `seq_lens[i] - 1`. `token_ids` may be a device tensor (a step whose tokens are still being
        sampled); every copy is non-blocking, so the host never waits here. The result is a view of
        the static output, valid until the next call."""
        num_seqs = len(token_ids)
        key = self.bucket_for(num_seqs, max(seq_lens))
        assert key is not None, "bucket_for() said this step runs eagerly"
        batch, num_blocks = key
        self._fill_inputs(token_ids, seq_lens, block_tables, batch, num_blocks)
        if self.capture:
            self.graphs[key].replay()
        else:
            self.hidden[:batch] = self._forward(batch, num_blocks)
        return self.hidden[:num_seqs]

    def _fill_inputs(self, token_ids, seq_lens, block_tables, batch: int, num_blocks: int) -> None:
        num_seqs = len(seq_lens)
        pad = batch - num_seqs
        # [batch, nb]; padding rows (and columns past a row's blocks) point at the scratch block
        tables = padded_block_tables([*block_tables, *([()] * pad)], num_blocks, fill=self.scratch_block)
        lens = torch.tensor(list(seq_lens) + [1] * pad, dtype=torch.long)  # [batch]
        positions = lens - 1
        slots = tables[torch.arange(batch), positions // self.block_size] * self.block_size + positions % self.block_size
        if isinstance(token_ids, torch.Tensor):  # on the device already
            self.input_ids[:num_seqs].copy_(token_ids)
            self.input_ids[num_seqs:batch].zero_()
        else:
            self._upload(self.input_ids[:batch], torch.tensor(list(token_ids) + [0] * pad, dtype=torch.long))
        self._upload(self.positions[:batch], positions)
        self._upload(self.seq_lens[:batch], lens)
        self._upload(self.slot_mapping[:batch], slots)
        self._upload(self.block_tables[:batch, :num_blocks], tables)

    def _upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # A pageable host->device copy waits for the GPU queue to drain; pinned + non-blocking does
        # not (the caching host allocator keeps the pinned buffer until the copy has run).
        if dst.is_cuda:
            src = src.pin_memory()
        dst.copy_(src, non_blocking=True)

    def _forward(self, batch: int, num_blocks: int) -> torch.Tensor:
        """The decode step over the static buffers, tensor ops only (what a graph captures)."""
        tables = self.block_tables[:batch, :num_blocks]
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=tables,
            # host-side copies are unknown inside a graph; only the batched decode path reads this metadata
            query_start_loc=list(range(batch + 1)),
            seq_lens=[],
            block_size=self.block_size,
            backend=self.attention_backend,
            groups=[
                decode_group(
                    tables, self.seq_lens[:batch], self.block_size, with_mask=self.attention_backend == "batched"
                )
            ],
        )
        embeds = self.model.embed_input_ids(self.input_ids[:batch])  # [B, H]
        return self.model(embeds, self.positions[:batch], self.kv_caches, meta)  # [B, H]

    # --- capture -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _capture_all(self) -> None:
        started = time.perf_counter()
        # padding values everywhere: every row writes to and reads from the scratch block
        scratch_slot = self.scratch_block * self.block_size
        self.block_tables.fill_(self.scratch_block)
        self.slot_mapping.fill_(scratch_slot)
        self.seq_lens.fill_(1)
        self.positions.zero_()
        self.input_ids.zero_()
        # largest gather first: the later, smaller graphs then fit in the blocks it left in the shared pool
        for batch, num_blocks in sorted(self.keys, key=lambda k: (k[0] * k[1], k), reverse=True):
            self._forward(batch, num_blocks)  # warm-up outside the graph (lazy inits, workspaces)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self.hidden[:batch] = self._forward(batch, num_blocks)
            if self._pool is None:
                self._pool = graph.pool()
            self.graphs[(batch, num_blocks)] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d decode CUDA graphs (batch <= %d, key blocks <= %d) in %.1f s",
            len(self.graphs), self.batch_sizes[-1], self.block_counts[-1], time.perf_counter() - started,
        )
