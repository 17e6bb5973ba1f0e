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

Buckets: see `token_buckets`. The graphs of all buckets share one memory pool and are captured largest
first. `capture=False` runs the same split path eagerly over the same static buffers (CPU tests).
"""

from __future__ import annotations

import logging
import time

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
    ) -> None:
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
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
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
        torch.cuda.synchronize(self.x.device)
        logger.info(
            "captured %d piecewise prefill CUDA graphs (%d token buckets <= %d, %d per bucket) in %.1f s",
            sum(map(len, self.graphs.values())), len(self.buckets), self.buckets[-1], len(self.layers) + 1,
            time.perf_counter() - started,
        )
