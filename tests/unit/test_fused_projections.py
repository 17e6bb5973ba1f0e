"""Fused q/k/v and gate/up projections (`MergedLinear`) against HF's separate ones.

Parity runs whole models, where a swapped or shifted slice of a small tensor (a bias, one KV head)
might not change a greedy token. These checks look at the projections themselves, with every
weight and bias random and distinct, and at a checkpoint that lacks one of the pieces.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llm_service.layers.linear import MergedLinear
from llm_service.models.loader import (
    CheckpointInfo,
    build_decoder,
    build_decoder_from_config,
    fused_weight_views,
    inspect_checkpoint,
)

_SIZES = dict(hidden_size=64, num_attention_heads=4, vocab_size=96, pad_token_id=0)
_LLAMA_SIZES = dict(_SIZES, intermediate_size=80, num_key_value_heads=2, num_hidden_layers=2)  # GQA: k/v != q


_HF_MODELS = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**_LLAMA_SIZES)),
    "llama_mlp_bias": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(**_LLAMA_SIZES, attention_bias=True, mlp_bias=True),
    ),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**_LLAMA_SIZES)),  # q/k/v biases
    "opt": (
        transformers.OPTForCausalLM,
        transformers.OPTConfig(**_SIZES, ffn_dim=80, num_hidden_layers=2, word_embed_proj_dim=64),
    ),
    "mllama": (
        transformers.MllamaForCausalLM,
        transformers.MllamaTextConfig(**dict(_LLAMA_SIZES, num_hidden_layers=3), cross_attention_layers=[1]),
    ),
}


def _hf_model(name: str) -> transformers.PreTrainedModel:
    cls, config = _HF_MODELS[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # HF zeroes biases at init: make every tensor distinct
            param.copy_(torch.randn_like(param))
    return model


def _self_attention_layers(ours, hf):
    inner, hf_inner = (ours.model.decoder, hf.model.decoder) if hasattr(ours.model, "decoder") else (ours.model, hf.model)
    for layer, hf_layer in zip(inner.layers, hf_inner.layers, strict=True):
        if hasattr(layer, "self_attn"):
            yield layer, hf_layer


@pytest.mark.parametrize("name", sorted(_HF_MODELS))
def test_fused_projections_equal_hf_separate_ones(name):
    hf = _hf_model(name)
    ours = build_decoder_from_config(hf.config, dtype=torch.float32, device="cpu", weights=hf.state_dict())
    x = torch.randn(5, hf.config.hidden_size)  # [T, H]
    num_checked = 0
    with torch.no_grad():
        for layer, hf_layer in _self_attention_layers(ours, hf):
            attn, hf_attn = layer.self_attn, hf_layer.self_attn
            assert isinstance(attn.qkv_proj, MergedLinear)
            assert (attn.qkv_proj.bias is not None) == (hf_attn.q_proj.bias is not None)
            q, k, v = attn.project_qkv(x)
            # a misplaced slice is off by O(1); the tolerance only allows for GEMM blocking differences
            torch.testing.assert_close(q, hf_attn.q_proj(x).view(5, attn.num_heads, attn.head_dim), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(k, hf_attn.k_proj(x).view(5, attn.num_kv_heads, attn.head_dim), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, hf_attn.v_proj(x).view(5, attn.num_kv_heads, attn.head_dim), rtol=1e-5, atol=1e-5)
            num_checked += 1
        for layer, hf_layer in zip(getattr(ours.model, "layers", []), getattr(hf.model, "layers", []), strict=True):
            assert isinstance(layer.mlp.gate_up_proj, MergedLinear)  # cross-attention layers' MLPs too
            torch.testing.assert_close(layer.mlp(x), hf_layer.mlp(x), rtol=1e-5, atol=1e-5)
    assert num_checked >= 2


def test_fused_weight_views_let_hf_share_our_tensors():
    """What benchmarks/llm_setup.py does: HF's q/k/v and gate/up become views of our fused tensors."""
    hf = _hf_model("qwen2")
    ours = build_decoder_from_config(hf.config, dtype=torch.float32, device="cpu", weights=hf.state_dict())
    ids = torch.tensor([[3, 17, 42, 9]])
    with torch.no_grad():
        before = hf(ids).logits
        result = hf.load_state_dict(fused_weight_views(ours), strict=False, assign=True)
        after = hf(ids).logits
    assert not result.unexpected_keys
    fused = ours.model.layers[1].self_attn.qkv_proj
    for part in ("q_proj", "k_proj", "v_proj"):
        for kind in ("weight", "bias"):
            hf_param = getattr(getattr(hf.model.layers[1].self_attn, part), kind)
            assert hf_param.untyped_storage().data_ptr() == getattr(fused, kind).untyped_storage().data_ptr()
    assert torch.equal(before, after)


def _checkpoint_copy(tiny_checkpoint, family, tmp_path, edit) -> CheckpointInfo:
    """A copy of the tiny checkpoint whose weights went through `edit(dict) -> None`."""
    root = shutil.copytree(tiny_checkpoint(family), tmp_path / family)
    path = root / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return inspect_checkpoint(root)


# fused module name -> the HF tensors it holds, in row order (spelled out here, not read from the model)
_PIECES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.mark.parametrize("family", ["llava_onevision", "blip2", "mllama"])
def test_build_decoder_fills_fused_rows_from_the_hf_tensors(tiny_checkpoint, family):
    info = inspect_checkpoint(tiny_checkpoint(family))
    model = build_decoder(info, dtype=torch.float32, device="cpu")
    checkpoint = load_file(tiny_checkpoint(family) / "model.safetensors")
    kinds_checked = set()
    for name, module in model.named_modules():
        if not isinstance(module, MergedLinear):
            continue
        parent, _, fused = name.rpartition(".")
        for kind in ("weight", "bias"):
            if getattr(module, kind) is None:
                assert f"language_model.{parent}.{_PIECES[fused][0]}.{kind}" not in checkpoint
                continue
            expected = torch.cat([checkpoint[f"language_model.{parent}.{part}.{kind}"] for part in _PIECES[fused]])
            assert torch.equal(getattr(module, kind), expected), f"{name}.{kind}"
            kinds_checked.add((fused, kind))
    if family != "mllama":  # Qwen2 and OPT have q/k/v biases
        assert ("qkv_proj", "bias") in kinds_checked
    assert ("qkv_proj", "weight") in kinds_checked


@pytest.mark.parametrize(
    ("family", "key"),
    [
        ("llava", "language_model.model.layers.0.self_attn.k_proj.weight"),
        ("llava_onevision", "language_model.model.layers.1.self_attn.v_proj.bias"),
        ("blip2", "language_model.model.decoder.layers.0.self_attn.q_proj.bias"),
        ("mllama", "language_model.model.layers.0.mlp.up_proj.weight"),
    ],
)
def test_checkpoint_missing_a_fused_piece_names_it(tiny_checkpoint, tmp_path, family, key):
    info = _checkpoint_copy(tiny_checkpoint, family, tmp_path, lambda tensors: tensors.pop(key))
    ours_name = key.removeprefix("language_model.")  # the loader's name for it
    with pytest.raises(ValueError, match=re.escape(f"missing from the checkpoint: [{ours_name!r}]")):
        build_decoder(info, dtype=torch.float32, device="cpu")


def test_checkpoint_with_a_misshapen_fused_piece_names_it(tiny_checkpoint, tmp_path):
    key = "language_model.model.layers.0.self_attn.k_proj.weight"

    def widen(tensors):  # a k_proj with q's shape (GQA checkpoint read as MHA)
        tensors[key] = tensors[key.replace("k_proj", "q_proj")].clone()

    info = _checkpoint_copy(tiny_checkpoint, "llava", tmp_path, widen)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape"):
        build_decoder(info, dtype=torch.float32, device="cpu")


def test_weights_missing_a_fused_piece_names_it():
    hf = _hf_model("llama")
    weights = dict(hf.state_dict())
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"weights lack \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        build_decoder_from_config(hf.config, dtype=torch.float32, device="cpu", weights=weights)
