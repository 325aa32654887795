"""No-grad passes of a LoRA network with the adapter folded into the base weights.

A peft LoRA layer computes base(x) + s * B(A(x)): on a small UNet the adapter branch adds about 40% to a
forward pass (a rank-16 3x3 conv next to 32-128-channel convs). A target pass needs no gradients, so it can
run base layers whose weights are W + s * B @ A instead: the same function, one conv per layer. The merged
weights are new tensors passed through ``torch.func.functional_call``; nothing in the network is modified
except the adapter on/off switch, so call it only from the thread that owns ``net``.
"""
from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import layer as lora_layer
from torch.func import functional_call

ADAPTER = "default"


def lora_layers(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers of ``net`` by module path."""
    return {name: m for name, m in net.named_modules() if isinstance(m, lora_layer.LoraLayer)}


def mergeable(net: torch.nn.Module) -> bool:
    """Every LoRA layer is a plain Linear or ungrouped Conv2d adapter (no DoRA), which :func:`delta_weight` covers."""
    found = lora_layers(net)
    return bool(found) and all(
        type(m) in (lora_layer.Linear, lora_layer.Conv2d) and not m.use_dora.get(ADAPTER, False)
        and not getattr(m, "fan_in_fan_out", False) and getattr(m.get_base_layer(), "groups", 1) == 1
        for m in found.values())


def delta_weight(module: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s * B @ A shaped like the base layer's weight (Linear: (out, in); Conv2d: (out, in, k, k), B is 1x1)."""
    scale = module.scaling[ADAPTER]
    if a.dim() == 2:
        return (b @ a) * scale
    return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * scale


def merged_weights(net: torch.nn.Module, adapter: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{path.base_layer.weight: W + s B A}`` for every LoRA layer; ``adapter`` overrides the layers' own A, B
    tensors (keys as in ``net.named_parameters()``, e.g. an EMA copy)."""
    adapter = adapter or {}
    out = {}
    for name, module in lora_layers(net).items():
        a_key, b_key = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
        a = adapter.get(a_key, module.lora_A[ADAPTER].weight)
        b = adapter.get(b_key, module.lora_B[ADAPTER].weight)
        base = module.get_base_layer().weight
        out[f"{name}.base_layer.weight"] = base + delta_weight(module, a, b).to(base.dtype)
    return out


class MergedLoRA(torch.nn.Module):
    """``net`` (a LoRA network) called with its adapter, or ``adapter`` tensors, folded into the base weights."""

    def __init__(self, net: torch.nn.Module, adapter: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.net, self.adapter = net, adapter

    @property
    def config(self) -> Any:
        return self.net.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            weights = merged_weights(self.net, self.adapter)
        self.net.disable_adapters()
        try:
            return functional_call(self.net, weights, args, kwargs, strict=False, tie_weights=False)
        finally:
            self.net.enable_adapters()
