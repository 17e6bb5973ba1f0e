"""`EngineCore.from_model` around a decoder built from a config (no checkpoint file), as the benchmarks do:
weights shared with a Hugging Face model, greedy ids equal to HF `generate()` on those weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm_service.engine.engine_core import EngineConfig, EngineCore, GenerationInput
from llm_service.engine.sampling_params import SamplingParams
from llm_service.models.loader import build_decoder_from_config


@pytest.fixture(scope="module")
def hf_and_tokenizer(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llava"))
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_from_model_shares_weights_and_matches_hf(hf_and_tokenizer):
    hf, tokenizer = hf_and_tokenizer
    model = build_decoder_from_config(hf.config, dtype=torch.float32, device="cpu", weights=hf.state_dict())
    assert model.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr()  # shared, not copied
    engine = EngineCore.from_model(
        model, tokenizer, EngineConfig(model_dir="", block_size=4, num_kv_blocks=64, max_prefill_chunk_tokens=5)
    )
    prompts = [[1, 17, 300, 42, 9, 11, 250], [1, 5, 6]]
    for i, ids in enumerate(prompts):
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerationInput(f"r{i}", prompt_token_ids=ids, sampling=params))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )
        assert outputs[f"r{i}"] == ref[0, len(ids) :].tolist()


def test_from_model_checks_dtype_and_weights(hf_and_tokenizer):
    hf, tokenizer = hf_and_tokenizer
    model = build_decoder_from_config(hf.config, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="bfloat16"):
        EngineCore.from_model(model, tokenizer, EngineConfig(model_dir="", dtype="bfloat16", num_kv_blocks=8))
    weights = dict(hf.state_dict())
    del weights["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        build_decoder_from_config(hf.config, dtype=torch.float32, device="cpu", weights=weights)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model_dir="", attention_backend="flash")
