"""CLIP/SigLIP towers that return the hidden state of chosen layers, and nothing more.

LLaVA-style models read `hidden_states[k]` of the vision tower (k = -2 for LLaVA-1.5, -1 for
OneVision). HF gets it with `output_hidden_states=True`, which keeps every layer's activations alive
until the call returns: for a OneVision batch of a few hundred 384 px crops that is tens of GB. Here
the layers after the deepest selected one are dropped at load time (they never influence the
result) and the selected outputs are caught with forward hooks, so only what is used is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn


class LayerSelectingTower(nn.Module):
    """Wrap a CLIP/SigLIP vision model: `forward(pixel_values) -> [B, tokens, hidden * len(layers)]`.

    `feature_layers` uses HF's `hidden_states` indexing: 0 is the embedding output (not supported:
    no checkpoint we serve reads it), i >= 1 the output of encoder layer i - 1, negatives count from
    the end. Several layers are concatenated along the channel dim in the given order, as HF does.
    """

    def __init__(self, tower: nn.Module, feature_layers: int | Sequence[int]) -> None:
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
        self._lock = threading.Lock()  # hooks write into per-call state; one forward at a time

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
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


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    # transformers 5.24 flattened CLIP/SigLIP vision models; older ones keep a `vision_model` level.
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def _truncate_encoder(tower: nn.Module, num_layers: int) -> None:
    inner = getattr(tower, "vision_model", tower)
    inner.encoder.layers = nn.ModuleList(list(inner.encoder.layers)[:num_layers])


class TowerProjector(nn.Module):
    """The compute of the LLaVA-style families: `[N, 3, S, S]` pixels -> `[N, rows, llm_hidden]`.

    Tower hidden state (a `LayerSelectingTower`), the CLS row dropped when `drop_cls`, then the
    projector. Children are named by role (`vision_tower`, `projector_role`), as `submodules()` reports.
    """

    def __init__(
        self, tower: LayerSelectingTower, projector: nn.Module, *, drop_cls: bool, projector_role: str
    ) -> None:
        super().__init__()
        self.drop_cls = drop_cls
        self.projector_role = projector_role
        self.vision_tower = tower
        self.add_module(projector_role, projector)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values)  # [N, 1 + P, vision_hidden * layers]
        if self.drop_cls:
            hidden = hidden[:, 1:]
        return getattr(self, self.projector_role)(hidden)  # [N, rows, llm_hidden]
