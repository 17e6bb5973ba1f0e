"""Piecewise CUDA graphs for the steps decode graphs do not serve: prefill chunks, image rows, mixed
steps.

Why: an eager prefill step of a 7B model is host-bound. Measured on an H100 (profile_prefill.py,
LLaVA-1.5-7B shapes, one 607-token image prompt): 14.3 ms of kernels, 39.8 ms of wall time, because
the host needs longer to launch each of the ~670 kernels than the GPU needs to run it. With these
graphs the same step took 18.2 ms.

What is captured: everything but attention, which depends on each sequence's context length and so
cannot be one graph for all steps of a token count. For a padded token count N the step is split at
every layer's attention into L + 1 graphs:

    graph 0:      layer 0 before attention (norm, q/k/v, rotary, K/V write)
    graph i:      layer i-1 after attention (o_proj, add + norm, MLP); layer i before attention
    graph L:      layer L-1 after attention; final norm

(each graph looks up its rotary cos/sin from the positions itself: two small gathers, and nothing
has to live in the shared pool from one graph to the next)

and between two graphs attention runs eagerly (`paged_attention` over the real rows only, with the
step's ordinary metadata: one Triton launch per kernel kind). Everything in the graphs is row-wise,
so padding rows cannot change real ones: they are zeroed before every step, sit at position 0,
write their K/V into the scratch block no request owns, and no query attends to them.

Whole-step graphs (triton attention only): a step of prefill rows only (no decode row: the common
shape at low load, e.g. an image request arriving at an idle server) replays one graph per bucket
that holds the attention too. Its metadata sits in static buffers sized for the bucket: the
sequences' query starts, context lengths and block tables (as wide as `max_model_len`), and a tile
table with room for every tile a step of that many rows can have, padded with sequence index -1
(those programs return at once). So the grid is fixed, and the step costs one replay plus a few
device copies of its metadata instead of L + 1 replays and L eager attention launches, which is
what a short prefill's host time goes to (a 15-token chunk after a cached image: the GPU work is
~5 ms, the host's ~7 ms on an H200). Steps with decode rows, more sequences than `max_seqs` or a
larger tile count run piecewise as before.

Buckets: see `token_buckets`. The graphs of all buckets share one memory pool and are captured largest
first. `capture=False` runs the same split path eagerly over the same static buffers (CPU tests).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from llm_service.layers.attention import AttentionMetadata, paged_attention

logger = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then steps of 64 up to 512 and of 128 beyond, ending at `max_tokens`: at most
    a few percent of padding past 512 tokens, ~20 buckets for a 2048-token step budget."""
    sizes = [16, 32, 64, 128, *range(192, 513, 64), *range(640, max_tokens, 128)]
    return [*(s for s in sizes if s < max_tokens), max_tokens]


def supports_piecewise(model: nn.Module) -> bool:
    """Whether `model` exposes the split layer API (`before_attention` / `after_attention`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return (
        layers is not None
        and hasattr(inner, "rotary_emb")
        and all(hasattr(layer, "before_attention") and hasattr(layer, "after_attention") for layer in layers)
    )


class PrefillGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        scratch_block: int,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: bool,
        whole_step_attention: bool = False,
        max_seqs: int = 0,
        max_blocks_per_seq: int = 0,
    ) -> None:
        """`whole_step_attention`: also build whole-step graphs (the triton attention backend), for steps of
        at most `max_seqs` sequences whose contexts fit `max_blocks_per_seq` blocks."""
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        assert supports_piecewise(model), "the model has no before_attention / after_attention split"
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.kv_caches = kv_caches
        self.scratch_slot = scratch_block * block_size
        self.capture = capture
        self.dtype = dtype
        self.buckets = token_buckets(max_tokens)
        attn = self.layers[0].self_attn
        hidden = model.lm_head.in_features
        n = self.buckets[-1]
        # static buffers sized for the largest bucket; every graph reads and writes views of these
        self.x = torch.zeros(n, hidden, dtype=dtype, device=device)  # [N, H] residual stream
        self.positions = torch.zeros(n, dtype=torch.long, device=device)  # [N]
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)  # [N]
        self.q = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=device)  # [N, Hq, D]
        self.attn = torch.zeros_like(self.q)  # [N, Hq, D] attention output, written between graphs
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=device)  # [N, H] final output
        self.whole: WholeStepPlans | None = None
        if whole_step_attention and max_seqs > 0 and max_blocks_per_seq > 0:
            self.whole = WholeStepPlans(
                self.buckets, attn.num_heads, self.kv_caches[0][0].shape[2], max_seqs, max_blocks_per_seq, device
            )
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.whole_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        if capture:
            self._capture_all()

    def bucket_for(self, num_tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= num_tokens), None)

    @torch.inference_mode()
    def run(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[T, H]` of the step whose input rows are `embeds` [T, H] at `positions` [T]
        (device tensors), attending as `meta` says. A view of the static output, valid until the next
        call. Nothing here waits for the GPU."""
        num_tokens = embeds.shape[0]
        n = self.bucket_for(num_tokens)
        assert n is not None, "bucket_for() said this step runs eagerly"
        self.x[:num_tokens].copy_(embeds)
        self.x[num_tokens:n].zero_()
        self.positions[:num_tokens].copy_(positions)
        self.positions[num_tokens:n].zero_()
        self.slots[:num_tokens].copy_(meta.slot_mapping)
        self.slots[num_tokens:n].fill_(self.scratch_slot)
        if self.whole is not None and self.whole.load(meta, n):
            if self.capture:
                self.whole_graphs[n].replay()
            else:
                self._whole_step(n)
            return self.hidden[:num_tokens]
        for i in range(len(self.layers) + 1):
            if i > 0:  # the attention of layer i-1, real rows only
                layer, (k_cache, v_cache) = self.layers[i - 1], self.kv_caches[i - 1]
                out = paged_attention(self.q[:num_tokens], k_cache, v_cache, meta, layer.self_attn.scale)
                self.attn[:num_tokens].copy_(out)
            if self.capture:
                self.graphs[n][i].replay()
            else:
                self._segment(i, n)
        return self.hidden[:num_tokens]

    def _segment(self, i: int, n: int) -> None:
        """Graph i over the first `n` rows of the static buffers (tensor ops only)."""
        x = self.x[:n]
        if i > 0:
            x = self.layers[i - 1].after_attention(x, self.attn[:n])
        if i == len(self.layers):
            self.hidden[:n].copy_(self.inner.norm(x))
            return
        if i > 0:
            self.x[:n].copy_(x)
        cos_sin = self.inner.rotary_emb(self.positions[:n], self.dtype)
        self.q[:n].copy_(self.layers[i].before_attention(self.x[:n], cos_sin, self.kv_caches[i], self.slots[:n]))

    def _whole_step(self, n: int) -> None:
        """Every segment and, between them, the attention over the static plan of bucket `n`."""
        assert self.whole is not None
        for i in range(len(self.layers) + 1):
            if i > 0:
                layer, (k_cache, v_cache) = self.layers[i - 1], self.kv_caches[i - 1]
                self.whole.attend(self.q[:n], k_cache, v_cache, layer.self_attn.scale, self.attn[:n], n)
            self._segment(i, n)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        started = time.perf_counter()
        self.x.zero_()
        self.positions.zero_()
        self.slots.fill_(self.scratch_slot)
        for n in sorted(self.buckets, reverse=True):  # largest first: the rest reuse its pool blocks
            for i in range(len(self.layers) + 1):
                self._segment(i, n)  # warm-up outside the graph (lazy inits, workspaces)
            torch.cuda.synchronize(self.x.device)
            graphs = []
            for i in range(len(self.layers) + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._segment(i, n)
                if self._pool is None:
                    self._pool = graph.pool()
                graphs.append(graph)
            self.graphs[n] = graphs
            if self.whole is not None:  # its tile table holds only padding now: the attention is a no-op
                self._whole_step(n)  # warm-up (the attention kernel's compile)
                torch.cuda.synchronize(self.x.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._whole_step(n)
                self.whole_graphs[n] = graph
        torch.cuda.synchronize(self.x.device)
        logger.info(
            "captured %d piecewise prefill CUDA graphs (%d token buckets <= %d, %d per bucket) and %d "
            "whole-step ones in %.1f s",
            sum(map(len, self.graphs.values())), len(self.buckets), self.buckets[-1], len(self.layers) + 1,
            len(self.whole_graphs), time.perf_counter() - started,
        )


class WholeStepPlans:
    """Static attention metadata of the whole-step graphs: one `PrefillPlan` per bucket over shared
    buffers, whose tile table has a fixed length per bucket (the graph's grid)."""

    def __init__(
        self,
        buckets: list[int],
        num_heads: int,
        num_kv_heads: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        from llm_service.layers.triton_prefill import PrefillPlan, tile_queries  # needs triton

        self.block_q = tile_queries(num_heads, num_kv_heads)
        self.max_seqs = max_seqs
        # A prefill row of the step is >= 2 tokens, so n rows hold <= n // 2 sequences, each adding at
        # most one partial tile to the n / block_q whole ones.
        self.num_tiles = {n: -(-n // self.block_q) + min(max_seqs, n // 2) for n in buckets}
        self.tiles = torch.full((max(self.num_tiles.values()), 2), -1, dtype=torch.int32, device=device)
        self.query_start = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)  # [S + 1]
        self.seq_lens = torch.ones(max_seqs, dtype=torch.int32, device=device)  # [S]
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.long, device=device)
        empty = np.zeros(0, dtype=np.int64)
        self.plans = {
            n: PrefillPlan(
                seq_ids=empty, query_lens=empty, prefix_lens=empty,  # host fields: unused (tiles given)
                query_start=self.query_start, seq_lens=self.seq_lens, block_tables=self.block_tables,
                _tiles={self.block_q: self.tiles[:count]},
            )
            for n, count in self.num_tiles.items()
        }

    def load(self, meta: AttentionMetadata, n: int) -> bool:
        """Copy the step's metadata into the static buffers if the step fits bucket `n`'s whole-step
        graph (prefill rows only, within the static sizes); False (nothing copied) otherwise."""
        plan = meta.prefill
        if plan is None or meta.groups or meta.num_seqs > self.max_seqs:
            return False
        if meta.block_tables.shape[1] > self.block_tables.shape[1]:
            return False
        tiles = plan.tiles(self.block_q)  # [k, 2]
        count = tiles.shape[0]
        if count > self.num_tiles[n]:
            return False
        num_seqs = meta.num_seqs
        self.tiles[:count].copy_(tiles)
        self.tiles[count : self.num_tiles[n]].fill_(-1)
        self.query_start[: num_seqs + 1].copy_(plan.query_start)
        self.seq_lens[:num_seqs].copy_(plan.seq_lens)
        self.block_tables[:num_seqs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        return True

    def attend(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, out: torch.Tensor, n: int
    ) -> None:
        from llm_service.layers.triton_prefill import paged_prefill_attention

        paged_prefill_attention(query, k_cache, v_cache, self.plans[n], scale, out=out)
