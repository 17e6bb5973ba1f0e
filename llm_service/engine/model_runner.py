"""Runs one scheduled step on the model: input prep, multimodal rows, paged KV, sampling.

The runner owns the KV cache tensor (allocated once) and per-request device state (prompt tables,
mllama cross-attention K/V). The scheduler only ever sees block ids.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from llm_service.engine.cuda_graphs import DecodeGraphs
from llm_service.engine.outputs import CONTINUATION_TOKEN, ModelRunnerOutput, SchedulerOutput
from llm_service.engine.pinned_upload import PinnedUploader
from llm_service.engine.prefill_graphs import PrefillGraphs, supports_piecewise
from llm_service.engine.request import Request
from llm_service.layers.attention import AttentionMetadata, check_kv_cache_dtype, resolve_attention_backend
from llm_service.layers.linear import Linear
from llm_service.layers.sampler import PendingSample, SamplingBatch, SamplingRow, launch_sample, to_device
from llm_service.models.mllama import CrossAttentionInputs, MllamaForCausalLM

if TYPE_CHECKING:
    from llm_service.layers.triton_skinny import SkinnyGemmPolicy

logger = logging.getLogger(__name__)

PROMPT_TABLE = "prompt_table"
CROSS_ATTENTION = "cross_attention"


@dataclass(frozen=True)
class MultimodalEmbedding:
    """One image's (or video's) features as the engine receives them.

    prompt_table: `features` is `[rows, hidden]`, injected at the placeholder positions.
    cross_attention (mllama): `features` is `[num_images, max_tiles, num_patches, hidden]` and
    `num_tiles[i]` says how many tiles of image i are real (the rest is padding).
    """

    content_id: str
    kind: str
    features: torch.Tensor
    media_type: str = "image"
    num_tiles: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return int(self.features.shape[0]) if self.kind == PROMPT_TABLE else 0


@dataclass
class _CrossState:
    # per cross-attention layer: [L_enc, Hkv, D], always in the model dtype (an fp8 `kv_cache_dtype`
    # covers the paged self-attention cache only: these are per request, outside the block budget)
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    image_ranges: torch.Tensor  # [n_img, 2] token positions [start, end) that see image i
    tile_valid: torch.Tensor  # [n_img, max_tiles] bool
    num_patches: int
    prompt_len: int

    def token_mask(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: [n] -> [n, n_img * max_tiles * num_patches] bool. Generated tokens reuse the last
        # prompt token's row, as HF extends its mask during generation.
        p = positions.clamp(max=self.prompt_len - 1)[:, None]
        sees = (p >= self.image_ranges[None, :, 0]) & (p < self.image_ranges[None, :, 1])  # [n, n_img]
        mask = sees[:, :, None] & self.tile_valid[None]  # [n, n_img, tiles]
        return mask.repeat_interleave(self.num_patches, dim=-1).reshape(positions.shape[0], -1)


def cross_attention_ranges(token_ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Token ranges that attend to each image: from its `<|image|>` token to the next one (or the end);
    a run of adjacent image tokens all attend to the text after the run (HF mllama semantics)."""
    locations = [i for i, t in enumerate(token_ids) if t == image_token_id]
    ranges = [[start, end] for start, end in zip(locations, [*locations[1:], len(token_ids)], strict=True)]
    last_end = len(token_ids)
    for r in reversed(ranges):
        if r[1] == r[0] + 1:
            r[1] = last_end
        last_end = r[1]
    return [(start, end) for start, end in ranges]


class PendingStep:
    """A launched step: `wait()` blocks until its tokens are on the host."""

    def __init__(self, sample: PendingSample | None, sampling_chunks: list) -> None:
        self._sample = sample
        self._chunks = sampling_chunks

    def device_token_ids(self, request_ids: Sequence[str]) -> torch.Tensor:
        """[n] int64 on the device: the tokens this step samples for `request_ids`, without waiting."""
        assert self._sample is not None
        row = {c.request_id: i for i, c in enumerate(self._chunks)}
        index = to_device(torch.tensor([row[r] for r in request_ids]), self._sample.token_ids.device)
        return self._sample.token_ids.index_select(0, index)

    def wait(self) -> ModelRunnerOutput:
        if self._sample is None:
            return ModelRunnerOutput(sampled_token_ids={})
        result = self._sample.result()
        sampled = {c.request_id: t for c, t in zip(self._chunks, result.token_ids, strict=True)}
        logprobs: dict[str, object] = {}
        if result.logprobs is not None:
            for j, chunk in enumerate(self._chunks):
                if chunk.sampling_params.logprobs or chunk.sampling_params.top_logprobs:
                    logprobs[chunk.request_id] = (result.logprobs[j], result.top_logprobs[j])
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        vocab_size: int,
        image_token_id: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        cuda_graphs: bool = False,
        max_model_len: int | None = None,
        max_graph_batch_size: int = 256,
        max_prefill_graph_tokens: int = 0,
        kv_cache_dtype: torch.dtype | None = None,
        skinny_gemm: bool = False,
    ) -> None:
        self.model = model
        self.attention_backend = resolve_attention_backend(attention_backend, torch.device(device).type)
        self.device = device
        self.dtype = dtype  # the model's (activations, queries, attention outputs, cross-attention K/V)
        # the paged cache's: the model dtype, or float8_e4m3fn (written saturated, upcast on every read)
        self.kv_cache_dtype = kv_cache_dtype or dtype
        check_kv_cache_dtype(self.kv_cache_dtype, self.attention_backend, device)
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        num_kv_heads, head_dim = model.kv_shape
        # One allocation for every layer: [layers, k/v, blocks, block_size, kv_heads, head_dim]. The
        # last block is scratch space no request owns: padded rows of a CUDA-graph batch write there.
        self.scratch_block = num_blocks
        self.kv_cache = torch.zeros(
            model.num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim,
            dtype=self.kv_cache_dtype, device=device,
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model.num_layers)]
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._prompt_tables: dict[str, dict[str, torch.Tensor]] = {}
        self._uploader = PinnedUploader(device)  # prompt tables: host -> device through a kept pinned buffer
        self._cross: dict[str, _CrossState] = {}
        self.max_model_len = max_model_len
        self.max_graph_batch_size = max_graph_batch_size
        self.max_prefill_graph_tokens = max_prefill_graph_tokens
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.skinny_gemm: SkinnyGemmPolicy | None = None
        if skinny_gemm and torch.device(device).type == "cuda":
            self.enable_skinny_gemm()  # before capture: the graphs hold whichever kernel was chosen
        if cuda_graphs:
            self.enable_decode_graphs(capture=True)
            self.enable_prefill_graphs(capture=True)

    @torch.inference_mode()
    def enable_skinny_gemm(self) -> None:
        """Time cuBLAS against the Triton skinny GEMM for each projection shape at decode-sized row
        counts, and route each `Linear` to the faster one (see layers/triton_skinny.py)."""
        from llm_service.layers.triton_skinny import SkinnyGemmPolicy

        linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        started = time.perf_counter()
        policy = SkinnyGemmPolicy()
        policy.calibrate([m.weight for m in linears])
        for module in linears:
            module.skinny_policy = policy
        self.skinny_gemm = policy
        logger.info(
            "skinny GEMM calibrated in %.1f s: %d of %d (shape, row class) pairs use it",
            time.perf_counter() - started, len(policy.chosen), len(policy.report),
        )

    def enable_decode_graphs(self, *, capture: bool) -> None:
        """Serve decode-only steps from `DecodeGraphs`; `capture=False` runs the same padded static-buffer
        path eagerly (for CPU tests of everything but capture and replay)."""
        if self.is_cross_attention_model or self.attention_backend not in ("batched", "triton"):
            logger.info("decode graphs are off: they need a self-attention model and the batched or triton attention")
            return
        if self.max_model_len is None:
            raise ValueError("decode graphs need max_model_len (the widest block table)")
        self.decode_graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            block_size=self.block_size,
            scratch_block=self.scratch_block,
            max_batch_size=self.max_graph_batch_size,
            max_blocks_per_seq=-(-self.max_model_len // self.block_size),
            hidden_size=self.model.lm_head.in_features,
            device=self.device,
            dtype=self.dtype,
            capture=capture,
            attention_backend=self.attention_backend,
        )

    def enable_prefill_graphs(self, *, capture: bool) -> None:
        """Run the steps decode graphs do not serve (prefill, image rows, mixed) up to
        `max_prefill_graph_tokens` rows as piecewise graphs (`PrefillGraphs`); `capture=False` runs the
        same split path eagerly over the static buffers (CPU tests)."""
        if self.max_prefill_graph_tokens < 1:
            return
        if self.is_cross_attention_model or not supports_piecewise(self.model):
            logger.info("prefill graphs are off: %s has no split layer path", type(self.model).__name__)
            return
        self.prefill_graphs = PrefillGraphs(
            self.model,
            self.kv_caches,
            block_size=self.block_size,
            scratch_block=self.scratch_block,
            max_tokens=self.max_prefill_graph_tokens,
            device=torch.device(self.device),
            dtype=self.dtype,
            capture=capture,
        )

    @property
    def is_cross_attention_model(self) -> bool:
        return isinstance(self.model, MllamaForCausalLM)

    # --- per-request state -------------------------------------------------------------------------

    @torch.inference_mode()
    def add_request(self, request: Request, embeddings: Sequence[MultimodalEmbedding]) -> None:
        # Held where they arrived (host): uploaded by the first chunk that injects rows of them, so
        # a prompt served from the prefix cache never copies its image, and adding a request never
        # waits on a pageable copy behind the running step.
        tables = {e.content_id: e.features for e in embeddings if e.kind == PROMPT_TABLE}
        if tables:
            self._prompt_tables[request.request_id] = tables
        cross = [e for e in embeddings if e.kind == CROSS_ATTENTION]
        if cross:
            self._cross[request.request_id] = self._build_cross_state(request, cross)

    def _build_cross_state(self, request: Request, embeddings: Sequence[MultimodalEmbedding]) -> _CrossState:
        assert self.image_token_id is not None, "cross-attention embeddings need the image token id"
        features = torch.cat([e.features for e in embeddings]).to(device=self.device, dtype=self.dtype)
        num_images, max_tiles, num_patches, hidden = features.shape  # [n_img, tiles, P, H]
        num_tiles = [n for e in embeddings for n in e.num_tiles]
        tile_valid = torch.arange(max_tiles, device=self.device)[None, :] < torch.tensor(
            num_tiles, device=self.device
        )[:, None]
        ranges = cross_attention_ranges(request.prompt_token_ids, self.image_token_id)
        kv = self.model.compute_cross_kv(features.reshape(-1, hidden))
        return _CrossState(
            kv=kv,
            image_ranges=torch.tensor(ranges, device=self.device, dtype=torch.long).reshape(num_images, 2),
            tile_valid=tile_valid,
            num_patches=num_patches,
            prompt_len=len(request.prompt_token_ids),
        )

    def remove_request(self, request_id: str) -> None:
        self._prompt_tables.pop(request_id, None)
        self._cross.pop(request_id, None)

    # --- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput, requests: Mapping[str, Request]) -> ModelRunnerOutput:
        return self.launch(scheduled, requests).wait()

    @torch.inference_mode()
    def launch(
        self, scheduled: SchedulerOutput, requests: Mapping[str, Request], previous: PendingStep | None = None
    ) -> PendingStep:
        """Queue the step's GPU work (forward, logits, sampling) and return without waiting for it;
        `wait()` on the result gives the sampled tokens. Host-to-device copies are pinned and
        non-blocking, so nothing here waits for the GPU. A continuation step (see
        `Scheduler.schedule_continuation`) reads its input tokens from `previous` on the device."""
        chunks = scheduled.chunks
        sampling_chunks = [(i, c) for i, c in enumerate(chunks) if c.needs_sampling]
        batch = last_rows = None
        if sampling_chunks:
            rows = []
            for _, chunk in sampling_chunks:
                request = requests[chunk.request_id]
                rows.append(
                    SamplingRow(
                        params=chunk.sampling_params,
                        prompt_token_ids=request.prompt_token_ids,
                        output_token_ids=request.output_token_ids,
                        eos_token_ids=request.eos_token_ids,
                    )
                )
            batch = SamplingBatch.build(rows, vocab_size=self.vocab_size, device=self.device)

        is_continuation = chunks[0].token_ids[0] == CONTINUATION_TOKEN
        graph_rows = None if is_continuation else self._graph_rows(chunks)
        if is_continuation:
            assert previous is not None and self._runs_in_graph(chunks), "a continuation needs the graph path"
            token_ids = previous.device_token_ids([c.request_id for c in chunks])
            hidden = self.decode_graphs.run(
                token_ids, [c.end_position for c in chunks], [c.block_table for c in chunks]
            )  # [B, H]: one row per chunk, and every decode chunk samples
        elif graph_rows is not None:
            token_ids, seq_lens, tables, chunk_last_rows = graph_rows
            hidden = self.decode_graphs.run(token_ids, seq_lens, tables)  # [rows, H]
            if sampling_chunks and len(token_ids) != len(sampling_chunks):  # rows that sample nothing
                last_rows = to_device(torch.tensor([chunk_last_rows[i] for i, _ in sampling_chunks]), self.device)
        else:
            query_start_loc = list(itertools.accumulate((c.num_tokens for c in chunks), initial=0))
            if sampling_chunks:
                last_rows = to_device(torch.tensor([query_start_loc[i + 1] - 1 for i, _ in sampling_chunks]), self.device)
            hidden = self._forward_eager(chunks, query_start_loc)  # [T, H]
        if not sampling_chunks:
            return PendingStep(None, [])
        if last_rows is not None:
            hidden = hidden[last_rows]
        logits = self.model.compute_logits(hidden)[:, : self.vocab_size]  # [B, V]
        return PendingStep(launch_sample(logits, batch, generator=self.generator), [c for _, c in sampling_chunks])

    def _graph_rows(self, chunks) -> tuple[list[int], list[int], list[list[int]], list[int]] | None:
        """The step as single-token rows for the graph path, or None if it must run eagerly.

        A prefill chunk without image rows becomes one row per token: the row at position p attends
        to positions <= p of its sequence, exactly what causal attention over the chunk computes,
        and the chunk's K/V are written (for every row) before any row attends. So short text-only
        prefills (a prompt whose image and prefix came from the prefix cache, say) and mixed steps
        replay a graph instead of paying an eager forward's launch overhead.
        Only without prefill graphs, which serve these steps with one K/V read per chunk.
        Returns (token ids, context lengths, block tables) per row and each chunk's last row."""
        graphs = self.decode_graphs
        if graphs is None or any(c.mm_spans for c in chunks):
            return None
        if self.prefill_graphs is not None and any(c.num_tokens > 1 for c in chunks):
            # Each row would read its sequence's whole context again (15 rows after a 592-token prefix:
            # 16x the K/V traffic); the piecewise graphs read it once per chunk.
            return None
        num_rows = sum(c.num_tokens for c in chunks)
        if graphs.bucket_for(num_rows, max(c.end_position for c in chunks)) is None:
            return None
        token_ids: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        last_rows: list[int] = []
        for c in chunks:
            token_ids += c.token_ids
            seq_lens += range(c.start_position + 1, c.end_position + 1)
            tables += [c.block_table] * c.num_tokens
            last_rows.append(len(token_ids) - 1)
        return token_ids, seq_lens, tables, last_rows

    def can_continue(self, chunks) -> bool:
        """Whether a continuation of these decode chunks (one more token each) can run: only the graph
        path takes its input tokens on the device."""
        return self.decode_graphs is not None and self._runs_in_graph(chunks, extra_tokens=1)

    def _runs_in_graph(self, chunks, extra_tokens: int = 0) -> bool:
        graphs = self.decode_graphs
        if graphs is None or any(c.num_tokens != 1 or c.mm_spans for c in chunks):
            return False
        return graphs.bucket_for(len(chunks), max(c.end_position for c in chunks) + extra_tokens) is not None

    def _forward_eager(self, chunks, query_start_loc: list[int]) -> torch.Tensor:
        device = self.device
        token_ids = list(itertools.chain.from_iterable(c.token_ids for c in chunks))
        input_ids = to_device(torch.tensor(token_ids, dtype=torch.long), device)  # [T]
        meta, position_ids = AttentionMetadata.build(
            query_lens=[c.num_tokens for c in chunks],
            seq_lens=[c.end_position for c in chunks],
            block_tables=[c.block_table for c in chunks],
            block_size=self.block_size,
            device=device,
            backend=self.attention_backend,
        )
        embeds = self.model.embed_input_ids(input_ids)  # [T, H]
        self._inject_prompt_tables(embeds, chunks, meta.query_start_loc)
        graphs = self.prefill_graphs
        if graphs is not None and graphs.bucket_for(len(token_ids)) is not None:
            hidden = graphs.run(embeds, position_ids, meta)  # [T, H]
        elif self.is_cross_attention_model:
            hidden = self.model(embeds, position_ids, self.kv_caches, meta, self._cross_inputs(chunks, position_ids, meta))
        else:
            hidden = self.model(embeds, position_ids, self.kv_caches, meta)  # [T, H]
        assert meta.query_start_loc == query_start_loc
        return hidden

    def _inject_prompt_tables(self, embeds: torch.Tensor, chunks, query_start_loc: list[int]) -> None:
        for i, chunk in enumerate(chunks):
            tables = self._prompt_tables.get(chunk.request_id)
            for span in chunk.mm_spans:
                rows = span.overlap(chunk.start_position, chunk.end_position)
                if rows is None:
                    continue
                lo, hi = rows
                dst = query_start_loc[i] + span.offset + lo - chunk.start_position
                if tables is None or span.content_id not in tables:
                    raise RuntimeError(f"request {chunk.request_id}: no embedding held for {span.content_id}")
                table = tables[span.content_id]
                if table.device != embeds.device or table.dtype != embeds.dtype:
                    table = tables[span.content_id] = self._uploader.upload(table.to(embeds.dtype))
                embeds[dst : dst + hi - lo] = table[lo:hi]

    def _cross_inputs(self, chunks, positions: torch.Tensor, meta: AttentionMetadata) -> CrossAttentionInputs | None:
        states = [self._cross.get(c.request_id) for c in chunks]
        if all(s is None for s in states):
            return None
        kv, masks = [], []
        for i, state in enumerate(states):
            if state is None:
                kv.append(None)
                masks.append(None)
                continue
            kv.append(state.kv)
            masks.append(state.token_mask(positions[meta.query_start_loc[i] : meta.query_start_loc[i + 1]]))
        return CrossAttentionInputs(kv=kv, token_masks=masks)
