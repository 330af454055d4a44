"""Parameter and MAC counts, measured by running the model once with hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerCost:
    name: str
    kind: str
    params: int
    macs: int
    out_shape: tuple[int, ...]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs for one sample (batch dimension divided out)."""
    per_sample = out[0].numel() if out.dim() > 0 else 1
    if isinstance(module, nn.modules.conv._ConvNd):
        k = module.weight[0].numel()  # in_channels/groups * prod(kernel)
        return per_sample * k
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


def layer_costs(model: nn.Module, example_input: torch.Tensor) -> list[LayerCost]:
    """Per-layer params and MACs of convs and linears for one sample of ``example_input``."""
    costs: list[LayerCost] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):

            def hook(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
                costs.append(
                    LayerCost(
                        name=name,
                        kind=type(mod).__name__,
                        params=sum(p.numel() for p in mod.parameters(recurse=False)),
                        macs=_layer_macs(mod, out),
                        out_shape=tuple(out.shape[1:]),
                    )
                )

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return costs


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of convs and linears for one sample (FLOPs ~= 2 x MACs)."""
    return sum(c.macs for c in layer_costs(model, example_input))
