"""The engine with an fp8 KV cache (`kv_cache_dtype="fp8_e4m3"`) on CPU: the cache tensor and block budget,
exact agreement with a full-precision cache that holds e4m3-rounded K/V, logits within what e4m3's
precision predicts, greedy decoding through every runner path, prefix reuse, and mllama's
cross-attention K/V (which stay in the model dtype).

Tolerance: e4m3 keeps 3 mantissa bits, a unit roundoff of 2**-4 against bf16's 2**-8, so rounding the
cached K/V to e4m3 should move the logits at most about 16x as far as rounding them to bf16 does (the
logit error grows about linearly with the K/V rounding error: measured here, 0.016 for fp16, 0.22 for
bf16, 1.95 for e4m3, on logits up to 8.3; these tiny random-weight models amplify every rounding).
"""

from __future__ import annotations

import pytest
import torch

import llm_service.layers.rotary as rotary
from llm_service.engine.engine_core import (
    EngineConfig,
    EngineCore,
    GenerationInput,
    kv_blocks_for_memory,
    kv_cache_bytes_per_block,
)
from llm_service.engine.sampling_params import SamplingParams
from llm_service.layers.attention import AttentionMetadata, write_kv
from llm_service.model_info import describe_model

FP8 = torch.float8_e4m3fn
UNIT_ROUNDOFF = {FP8: 2.0**-4, torch.bfloat16: 2.0**-8}
PROMPTS = [
    "USER: Tell me a story about a small robot. ASSISTANT:",
    "The weather today is",
    "Name three colours please",
]


def _engine(ckpt, kv_cache_dtype: str = "auto", **kwargs) -> EngineCore:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("num_kv_blocks", 64)
    kwargs.setdefault("max_prefill_chunk_tokens", 7)
    return EngineCore(EngineConfig(model_dir=str(ckpt), kv_cache_dtype=kv_cache_dtype, **kwargs))


def _teacher_forced_logits(engine: EngineCore, token_ids: list[int], chunk: int) -> torch.Tensor:
    """Logits `[len(token_ids), V]` of one sequence fed in chunks of `chunk` tokens (1: decode steps),
    each chunk attending to the cached K/V of the earlier ones and its own."""
    runner, model = engine.runner, engine.runner.model
    runner.kv_cache.zero_()
    block_size = engine.config.block_size
    table = list(range(-(-len(token_ids) // block_size)))
    logits = []
    with torch.inference_mode():
        for start in range(0, len(token_ids), chunk):
            end = min(start + chunk, len(token_ids))
            meta, positions = AttentionMetadata.build(
                query_lens=[end - start],
                seq_lens=[end],
                block_tables=[table[: -(-end // block_size)]],
                block_size=block_size,
                device=engine.device,
                backend=runner.attention_backend,
            )
            embeds = model.embed_input_ids(torch.tensor(token_ids[start:end]))
            logits.append(model.compute_logits(model(embeds, positions, runner.kv_caches, meta)))
    return torch.cat(logits)


def _rounded_writes(monkeypatch, dtype: torch.dtype) -> None:
    """K/V rounded to `dtype` (torch's cast) on their way into a full-precision cache."""

    def write(key, value, k_cache, v_cache, slots):
        write_kv(key.to(dtype).to(key.dtype), value.to(dtype).to(value.dtype), k_cache, v_cache, slots)

    monkeypatch.setattr(rotary, "write_kv", write)


@pytest.fixture(scope="module")
def token_ids():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(5, 700, (45,), generator=generator).tolist()


def _greedy(engine: EngineCore, prompts=PROMPTS, max_tokens: int = 10) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationInput(f"r{i}", prompt=prompt, sampling=params))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs


def test_fp8_cache_tensor_and_block_budget(tiny_checkpoint):
    ckpt = tiny_checkpoint("llava")
    engine = _engine(ckpt, "fp8_e4m3")
    assert engine.runner.kv_cache.dtype == FP8 and engine.runner.kv_cache_dtype == FP8
    assert all(k.dtype == v.dtype == FP8 for k, v in engine.runner.kv_caches)
    assert next(engine.model.parameters()).dtype == torch.float32  # the model keeps its dtype
    description = describe_model(engine, ckpt)
    assert (description.dtype, description.kv_cache_dtype) == ("float32", "float8_e4m3fn")
    assert describe_model(_engine(ckpt), ckpt).kv_cache_dtype == "float32"

    # the block budget in the cache dtype: for the same memory, 2x the blocks of bf16, 4x those of fp32
    model = engine.model
    configs = {
        name: EngineConfig(
            model_dir="", device="cuda", dtype=dtype, kv_cache_dtype=kv, kv_memory_fraction=0.5
        )
        for name, dtype, kv in (
            ("fp32", "float32", "auto"),
            ("bf16", "bfloat16", "auto"),
            ("bf16+fp8", "bfloat16", "fp8_e4m3"),
            ("fp32+fp8", "float32", "fp8_e4m3"),
        )
    }
    per_block = {name: kv_cache_bytes_per_block(model, config) for name, config in configs.items()}
    num_kv_heads, head_dim = model.kv_shape
    assert (
        per_block["bf16+fp8"] == 2 * model.num_layers * 16 * num_kv_heads * head_dim
    )  # one byte per element
    assert per_block["bf16"] == 2 * per_block["bf16+fp8"] and per_block["fp32"] == 4 * per_block["fp32+fp8"]
    free = 10_000 * per_block["bf16"] + 123
    blocks = {name: kv_blocks_for_memory(model, config, free) for name, config in configs.items()}
    assert blocks["bf16"] == 5_000 and blocks["bf16+fp8"] == 10_000 == blocks["fp32+fp8"]
    with pytest.raises(RuntimeError, match="no GPU memory left"):
        kv_blocks_for_memory(
            model, configs["bf16+fp8"], per_block["bf16+fp8"]
        )  # half a block after the fraction


@pytest.mark.parametrize("backend", ["reference", "batched"])
def test_fp8_cache_equals_a_cache_of_e4m3_rounded_values(tiny_checkpoint, token_ids, monkeypatch, backend):
    """The fp8 cache changes nothing but the stored values: its logits are bit for bit those of an fp32
    cache whose K/V writes are rounded to e4m3 (torch's cast), prefill in chunks and decode alike."""
    ckpt = tiny_checkpoint("llava")
    fp8 = _engine(ckpt, "fp8_e4m3", attention_backend=backend)
    full = _engine(ckpt, attention_backend=backend)
    for chunk in (45, 7, 1):
        logits_fp8 = _teacher_forced_logits(fp8, token_ids, chunk)
        with monkeypatch.context() as patch:
            _rounded_writes(patch, FP8)
            logits_rounded = _teacher_forced_logits(full, token_ids, chunk)
        assert torch.equal(logits_fp8, logits_rounded), f"chunks of {chunk}"
        assert torch.equal(fp8.runner.kv_cache.float(), full.runner.kv_cache), f"chunks of {chunk}"


def test_fp8_logits_within_e4m3_precision(tiny_checkpoint, token_ids, monkeypatch):
    """Against the fp32 cache: the fp8 cache's logit error is at most the bf16 cache's scaled by the
    ratio of unit roundoffs (16), and not zero (the values really are rounded)."""
    ckpt = tiny_checkpoint("llava")
    full = _engine(ckpt, attention_backend="reference")
    exact = _teacher_forced_logits(full, token_ids, 7)
    with monkeypatch.context() as patch:
        _rounded_writes(patch, torch.bfloat16)
        bf16_error = float((_teacher_forced_logits(full, token_ids, 7) - exact).abs().max())
    fp8_logits = _teacher_forced_logits(
        _engine(ckpt, "fp8_e4m3", attention_backend="reference"), token_ids, 7
    )
    assert bool(torch.isfinite(fp8_logits).all())
    fp8_error = float((fp8_logits - exact).abs().max())
    bound = UNIT_ROUNDOFF[FP8] / UNIT_ROUNDOFF[torch.bfloat16] * bf16_error
    assert 0 < bf16_error < fp8_error <= bound, (
        bf16_error,
        fp8_error,
        bound,
    )  # measured: 0.22 < 1.95 <= 3.53


def _with_graph_paths(engine: EngineCore) -> None:
    """The decode-graph and piecewise-prefill-graph paths over their static buffers, run eagerly (CPU)."""
    engine.runner.enable_decode_graphs(capture=False)
    engine.runner.max_prefill_graph_tokens = 64
    engine.runner.enable_prefill_graphs(capture=False)
    assert engine.runner.decode_graphs is not None and engine.runner.prefill_graphs is not None


def test_fp8_greedy_decoding_on_every_path(tiny_checkpoint):
    """Greedy ids with an fp8 cache: the reference, batched and graph (static buffer) paths read the same
    fp8 values, so they agree with each other exactly; against the fp32 cache the first token of each
    prompt (after the chunked prefill) is the same. Later tokens may differ: one flipped argmax changes
    this tiny model's whole continuation."""
    ckpt = tiny_checkpoint("llava")
    reference = _greedy(_engine(ckpt, "fp8_e4m3", attention_backend="reference"))
    batched = _greedy(_engine(ckpt, "fp8_e4m3", attention_backend="batched"))
    graphs_engine = _engine(ckpt, "fp8_e4m3", attention_backend="batched", max_num_batched_tokens=64)
    _with_graph_paths(graphs_engine)
    graphs = _greedy(graphs_engine)
    assert reference == batched == graphs
    full = _greedy(_engine(ckpt))
    assert all(len(tokens) == 10 for tokens in reference.values())
    assert {rid: tokens[0] for rid, tokens in reference.items()} == {
        rid: tokens[0] for rid, tokens in full.items()
    }


def test_fp8_prefix_reuse_reads_the_cached_blocks(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("llava"), "fp8_e4m3")
    prompt = [PROMPTS[0]]
    first = _greedy(engine, prompt)["r0"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    request = engine.add_request(GenerationInput("again", prompt=prompt[0], sampling=params))
    again: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            again += out.new_token_ids
    assert request.num_cached_prompt_tokens > 0 and again == first


def test_mllama_cross_attention_kv_stay_in_the_model_dtype(references):
    """Only the paged self-attention cache is fp8; the per-request cross-attention K/V (not paged, not in
    the block budget) keep the model dtype."""
    ckpt, cases = references("mllama")
    prompt, ref = next((p, r) for p, r in cases if r.embeddings)
    engine = _engine(ckpt, "fp8_e4m3", max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    engine.add_request(GenerationInput("img", prompt=prompt, embeddings=ref.embeddings, sampling=params))
    (cross,) = engine.runner._cross.values()
    assert engine.runner.kv_cache.dtype == FP8
    assert all(k.dtype == v.dtype == torch.float32 for k, v in cross.kv)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens and tokens[0] == ref.output_token_ids[0]
