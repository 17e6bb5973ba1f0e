"""CLIP/SigLIP towers that return the hidden state of chosen layers, and nothing more.

LLaVA-style models read `hidden_states[k]` of the vision tower (k = -2 for LLaVA-1.5, -1 for
OneVision). HF gets it with `output_hidden_states=True`, which keeps every layer's activations alive
until the call returns: for a OneVision batch of a few hundred 384 px crops that is tens of GB. Here
the layers after the deepest selected one are dropped at load time (they never influence the
result), and the tower is walked layer by layer (embeddings, CLIP's pre-layernorm, the kept encoder
layers), keeping only the selected outputs. The walk also skips what HF's forward adds after the last
layer and nobody here reads: CLIP's post-layernorm of the CLS row, SigLIP's post-layernorm of every
row and its attention-pooling head. It has no hooks, locks or Python state, so `torch.compile`
captures the whole compute as one graph.

The walk is used for the CLIP and SigLIP vision models of transformers 5 (the towers every family
here loads); any other tower runs HF's forward with forward hooks on the selected layers.

`fuse_qkv` (default on) replaces each layer's three q/k/v projections by one `[3 * hidden, hidden]`
linear and calls `scaled_dot_product_attention` itself: one GEMM instead of three per layer, the
same weights and the same math (HF's CLIP/SigLIP attention is SDPA without a mask in eval mode).

`unfold_patches` (default on) runs the patch convolution as one GEMM over unfolded patches
(`patch_embedding.PatchLinear`, which says why).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from encoder_service.engines.patch_embedding import PatchLinear, is_patch_convolution

# Vision models whose forward is embeddings -> [pre_layrnorm] -> encoder.layers -> post-processing
# nobody here reads; `LayerSelectingTower` walks them directly.
WALKABLE_TOWERS = frozenset(
    {"CLIPVisionModel", "CLIPVisionTransformer", "SiglipVisionModel", "SiglipVisionTransformer"}
)


class FusedSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with one fused q/k/v projection.

    Built from a CLIP/SigLIP attention module (`from_attention`); called like it, by the HF encoder
    layer: `(hidden_states, attention_mask=None, **kwargs) -> (output, None)`.
    """

    def __init__(self, qkv: nn.Linear, out_proj: nn.Linear, *, num_heads: int, scale: float) -> None:
        super().__init__()
        self.qkv = qkv
        self.out_proj = out_proj
        self.num_heads = num_heads
        self.head_dim = out_proj.in_features // num_heads
        self.scale = scale

    @classmethod
    def from_attention(cls, attention: nn.Module) -> FusedSelfAttention:
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        qkv = nn.Linear(
            q.in_features,
            3 * q.out_features,
            bias=q.bias is not None,
            device=q.weight.device,
            dtype=q.weight.dtype,
        )
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        qkv.requires_grad_(attention.q_proj.weight.requires_grad)
        return cls(qkv, attention.out_proj, num_heads=attention.num_heads, scale=attention.scale)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, tokens, head_dim]
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=self.scale
        )
        attended = attended.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.out_proj(attended), None


def can_fuse_qkv(attention: nn.Module) -> bool:
    """A CLIP/SigLIP-style attention: separate q/k/v/out linears of one width, no causal mask."""
    projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections):
        return False
    q, k, v, out = projections
    same_shape = q.weight.shape == k.weight.shape == v.weight.shape and out.in_features == q.out_features
    same_bias = (q.bias is None) == (k.bias is None) == (v.bias is None)
    return (
        same_shape
        and same_bias
        and isinstance(getattr(attention, "num_heads", None), int)
        and isinstance(getattr(attention, "scale", None), float)
        and not getattr(attention, "is_causal", False)
    )


class LayerSelectingTower(nn.Module):
    """Wrap a CLIP/SigLIP vision model: `forward(pixel_values) -> [B, tokens, hidden * len(layers)]`.

    `feature_layers` uses HF's `hidden_states` indexing: 0 is the embedding output (not supported:
    no checkpoint we serve reads it), i >= 1 the output of encoder layer i - 1, negatives count from
    the end. Several layers are concatenated along the channel dim in the given order, as HF does.
    `fuse_qkv`: fuse each layer's q/k/v projections; `unfold_patches`: the patch convolution as a
    GEMM (see the module docstring). Both apply to towers that walk their layers only.
    """

    def __init__(
        self,
        tower: nn.Module,
        feature_layers: int | Sequence[int],
        *,
        fuse_qkv: bool = True,
        unfold_patches: bool = True,
    ) -> None:
        super().__init__()
        layers = _encoder_layers(tower)
        num_layers = len(layers)
        requested = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        indices = [i if i >= 0 else num_layers + 1 + i for i in requested]
        if not indices or any(not 1 <= i <= num_layers for i in indices):
            raise ValueError(
                f"vision feature layers {requested} are out of range for a {num_layers}-layer tower "
                "(the embedding output, index 0, is not supported)"
            )
        self.tower = tower
        self.num_layers_kept = max(indices)
        self.layer_indices = indices
        # Later layers cannot affect the selected hidden states; dropping them saves their compute.
        _truncate_encoder(tower, self.num_layers_kept)
        self.walks_layers = _is_walkable(tower)
        self.fused_qkv = False
        if fuse_qkv and self.walks_layers:
            attentions = [layer.self_attn for layer in _encoder_layers(tower)]
            if all(can_fuse_qkv(attention) for attention in attentions):
                for layer, attention in zip(_encoder_layers(tower), attentions, strict=True):
                    layer.self_attn = FusedSelfAttention.from_attention(attention)
                self.fused_qkv = True
        self.unfolds_patches = False
        embeddings = getattr(_inner(tower), "embeddings", None)
        if unfold_patches and self.walks_layers and is_patch_convolution(
            getattr(embeddings, "patch_embedding", None)
        ):
            embeddings.patch_embedding = PatchLinear(embeddings.patch_embedding)
            self.unfolds_patches = True
        self._lock = threading.Lock()  # the hook path writes into per-call state; one forward at a time

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.walks_layers:
            return self._walk(pixel_values)
        return self._hooked_forward(pixel_values)

    @property
    def encoder_layers(self) -> nn.ModuleList:
        """The kept encoder layers, in order."""
        return _encoder_layers(self.tower)

    def _walk(
        self, pixel_values: torch.Tensor, layers: Sequence[Callable[..., torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """The layer walk; `layers` stand in for the encoder layers (compiled ones, `RegionalForward`)."""
        inner = _inner(self.tower)
        hidden = inner.embeddings(pixel_values)
        pre_layernorm = getattr(inner, "pre_layrnorm", None)  # CLIP only (HF's spelling)
        if pre_layernorm is not None:
            hidden = pre_layernorm(hidden)
        wanted = set(self.layer_indices)
        captured: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(inner.encoder.layers if layers is None else layers, start=1):
            hidden = layer(hidden, None)
            if isinstance(hidden, tuple):  # layers of some transformers versions return (hidden, ...)
                hidden = hidden[0]
            if index in wanted:
                captured[index] = hidden
        selected = [captured[i] for i in self.layer_indices]  # each [B, tokens, hidden]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    def _hooked_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        layers = _encoder_layers(self.tower)
        captured: dict[int, torch.Tensor] = {}

        def make_hook(index: int):
            def hook(module, args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output

            return hook

        with self._lock:
            handles = [layers[i - 1].register_forward_hook(make_hook(i)) for i in set(self.layer_indices)]
            try:
                self.tower(pixel_values=pixel_values)
            finally:
                for handle in handles:
                    handle.remove()
        selected = [captured[i] for i in self.layer_indices]  # each [B, tokens, hidden]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


def _is_walkable(tower: nn.Module) -> bool:
    """A known CLIP/SigLIP vision model whose layers take `(hidden_states, attention_mask)`."""
    inner = _inner(tower)
    if type(inner).__name__ not in WALKABLE_TOWERS or not hasattr(inner, "embeddings"):
        return False
    for layer in inner.encoder.layers:
        parameters = list(inspect.signature(layer.forward).parameters.values())
        required = [
            p
            for p in parameters
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        if len(required) > 2:  # e.g. older CLIP layers that also want a causal mask
            return False
    return True


def _inner(tower: nn.Module) -> nn.Module:
    # transformers 5.24 flattened CLIP/SigLIP vision models; older ones keep a `vision_model` level.
    return getattr(tower, "vision_model", tower)


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    return _inner(tower).encoder.layers


def _truncate_encoder(tower: nn.Module, num_layers: int) -> None:
    inner = _inner(tower)
    inner.encoder.layers = nn.ModuleList(list(inner.encoder.layers)[:num_layers])


class TowerProjector(nn.Module):
    """The compute of the LLaVA-style families: `[N, 3, S, S]` pixels -> `[N, rows, llm_hidden]`.

    Tower hidden state (a `LayerSelectingTower`), the CLS row dropped when `drop_cls`, then the
    projector. Children are named by role (`vision_tower`, `projector_role`), as `submodules()` reports.
    Every output row depends on its own input row only, so batches may be padded or split
    (`engines.compiled.BucketedCompute`), and the forward has no graph breaks when the tower walks
    its layers (`supports_compile`).
    """

    def __init__(
        self, tower: LayerSelectingTower, projector: nn.Module, *, drop_cls: bool, projector_role: str
    ) -> None:
        super().__init__()
        self.drop_cls = drop_cls
        self.projector_role = projector_role
        self.vision_tower = tower
        self.add_module(projector_role, projector)

    @property
    def supports_compile(self) -> bool:
        return self.vision_tower.walks_layers

    @property
    def projector_module(self) -> nn.Module:
        """The projector, registered under its role's name (`projector_role`)."""
        return getattr(self, self.projector_role)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._project(self.vision_tower(pixel_values), self.projector_module)

    def _project(
        self, hidden: torch.Tensor, projector: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        # hidden [N, 1 + P, vision_hidden * layers] -> [N, rows, llm_hidden]
        if self.drop_cls:
            hidden = hidden[:, 1:]
        return projector(hidden)

    def compiled_regions(
        self, compile_region: Callable[[nn.Module], Callable[..., torch.Tensor]]
    ) -> RegionalForward:
        """This forward with each encoder layer and the projector compiled apart (`RegionalForward`)."""
        return RegionalForward(self, compile_region)


class RegionalForward:
    """`TowerProjector.forward` with every encoder layer and the projector run through a region
    compiled on its own, `compile_region(module)` (torch.compile in the service).

    The layers are instances of one class whose weights Dynamo passes as graph inputs, so the first
    layer's graph serves all of them: compiling costs about one layer plus the projector instead of
    the whole tower (and max-autotune tunes a handful of GEMM shapes). The embeddings, CLIP's
    pre-layernorm and the CLS drop run eager (a few small kernels). Not a module: the weights stay
    listed once, under `compute`; nothing of `compute` is changed, so dropping this object returns
    to eager.
    """

    def __init__(
        self, compute: TowerProjector, compile_region: Callable[[nn.Module], Callable[..., torch.Tensor]]
    ) -> None:
        if not compute.supports_compile:
            raise ValueError("regional compilation needs a tower that walks its layers")
        self.compute = compute
        self.layers = [compile_region(layer) for layer in compute.vision_tower.encoder_layers]
        self.projector = compile_region(compute.projector_module)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.compute.vision_tower._walk(pixel_values, self.layers)
        return self.compute._project(hidden, self.projector)  # [N, rows, llm_hidden]
