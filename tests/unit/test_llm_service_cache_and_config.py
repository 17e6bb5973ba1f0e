"""LLM service pieces without a model: the embedding cache, the config and the CLI's flag parsing."""

from __future__ import annotations

import argparse

import pytest
import torch

from llm_service.__main__ import build_parser, config_from_args, parse_bytes
from llm_service.config import LlmServiceConfig, default_sampling
from llm_service.embedding_cache import EmbeddingCache
from llm_service.engine.model_runner import CROSS_ATTENTION, PROMPT_TABLE, MultimodalEmbedding
from vlm_protocol.errors import InvalidArgumentError

HIDDEN = 8


def _embedding(name: str, rows: int = 4, hidden: int = HIDDEN, dtype=torch.float32) -> MultimodalEmbedding:
    return MultimodalEmbedding("b3:" + name * 64, PROMPT_TABLE, torch.zeros(rows, hidden, dtype=dtype))


def test_cache_is_a_byte_bounded_lru_with_counters():
    size = 4 * HIDDEN * 4  # one [4, 8] float32 table
    cache = EmbeddingCache(2 * size, kind=PROMPT_TABLE, hidden_size=HIDDEN)
    a, b, c = _embedding("a"), _embedding("b"), _embedding("c")
    assert cache.put(a) and cache.put(b)
    assert cache.get(a.content_id) is a  # a is now the most recently used
    assert cache.put(c)  # evicts b, the least recently used
    found, missing = cache.lookup([a.content_id, b.content_id, c.content_id, b.content_id])
    assert set(found) == {a.content_id, c.content_id} and missing == [b.content_id]
    stats = cache.stats()
    assert (stats.num_entries, stats.num_bytes, stats.num_evictions) == (2, 2 * size, 1)
    assert (stats.num_hits, stats.num_misses) == (3, 1)
    assert not cache.put(_embedding("d", rows=12))  # larger than the whole budget: not cached
    assert len(cache) == 2


def test_cache_refuses_unusable_embeddings_and_rechecks_entries_on_use():
    cache = EmbeddingCache(1 << 20, kind=PROMPT_TABLE, hidden_size=HIDDEN)
    with pytest.raises(InvalidArgumentError, match="hidden size 4"):
        cache.put(_embedding("a", hidden=4))
    cross = MultimodalEmbedding(
        "b3:" + "b" * 64, CROSS_ATTENTION, torch.zeros(1, 1, 2, HIDDEN), num_tiles=(1,)
    )
    with pytest.raises(InvalidArgumentError, match="cross_attention"):
        cache.put(cross)
    with pytest.raises(InvalidArgumentError, match="non-float"):
        cache.put(_embedding("c", dtype=torch.int32))
    entry = _embedding("e")
    cache.put(entry)
    object.__setattr__(entry, "features", torch.zeros(5, HIDDEN))  # rows changed behind the cache's back
    assert cache.get(entry.content_id) is None and entry.content_id not in cache
    assert EmbeddingCache(0, kind=PROMPT_TABLE, hidden_size=HIDDEN).put(_embedding("z")) is False


def test_config_validates_and_maps_flags(tmp_path):
    with pytest.raises(InvalidArgumentError, match="max_num_batched_tokens"):
        LlmServiceConfig(model_dir="m", max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(InvalidArgumentError, match="port"):
        LlmServiceConfig(model_dir="m", port=70000)
    with pytest.raises(InvalidArgumentError, match="request_timeout_s"):
        LlmServiceConfig(model_dir="m", request_timeout_s=0)
    args = build_parser().parse_args(
        [
            "--model",
            "m",
            "--port",
            "0",
            "--num-kv-blocks",
            "64",
            "--max-queue-size",
            "3",
            "--device",
            "cpu",
            "--embedding-cache-bytes",
            "64MiB",
            "--encoder-address",
            "enc:50051",
            "--no-prefix-caching",
        ]
    )
    config = config_from_args(args)
    engine = config.engine_config()
    assert (engine.num_kv_blocks, engine.max_waiting_requests, engine.enable_prefix_caching) == (64, 3, False)
    assert config.embedding_cache_bytes == 64 << 20 and config.encoder_address == "enc:50051"
    assert config.server_config().port == 0
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("2G") == 2 * 10**9 and parse_bytes("1024") == 1024
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")


def test_default_sampling_follows_generation_config(tmp_path):
    assert default_sampling(tmp_path, 32).temperature == 0.0  # no generation_config.json: greedy
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    params = default_sampling(tmp_path, 32)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (32, 0.6, 0.9, 50)


def test_attention_and_graph_flags_reach_the_engine_config():
    args = build_parser().parse_args(["--model", "ckpt", "--device", "cpu", "--attention-backend", "reference"])
    engine = config_from_args(args).engine_config()
    assert engine.attention_backend == "reference" and not engine.use_cuda_graphs
    cuda = config_from_args(build_parser().parse_args(["--model", "ckpt", "--device", "cuda"])).engine_config()
    assert cuda.use_cuda_graphs  # the default on CUDA
    assert cuda.max_prefill_graph_tokens == 2048
    args = build_parser().parse_args(["--model", "ckpt", "--device", "cuda", "--max-prefill-graph-tokens", "0"])
    assert config_from_args(args).engine_config().max_prefill_graph_tokens == 0
    args = build_parser().parse_args(["--model", "ckpt", "--device", "cuda", "--enforce-eager"])
    assert not config_from_args(args).engine_config().use_cuda_graphs


def test_the_engine_runs_in_its_own_process_by_default_on_cuda_only():
    def parse(*flags: str) -> LlmServiceConfig:
        return config_from_args(build_parser().parse_args(["--model", "ckpt", *flags]))

    assert parse("--device", "cuda").use_engine_process
    assert parse("--device", "cuda:1").use_engine_process
    assert not parse("--device", "cpu").use_engine_process
    assert not parse("--device", "cuda", "--no-engine-process").use_engine_process
    assert parse("--device", "cpu", "--engine-process").use_engine_process
