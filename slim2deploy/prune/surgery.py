"""Surgery: cut the removed channels out for real, giving a new dense and thinner model.

``apply_plan`` deep-copies the model and replaces every parameter and buffer named in the plan
by the slice that keeps the group's channels, then updates the channel counts that convs,
BatchNorms and linears store as attributes. It works from the plan alone: the resulting
structure depends on the architecture and the plan, never on weight values, so a pruned
checkpoint is rebuilt as *original architecture -> apply_plan -> load the slim state_dict*.

Folding. A removed channel whose gamma is zero still emits the constant act(beta). Where the
plan marks an input as ``fold`` (a linear, or a convolution without padding, reading a value
the planner proved constant), that constant times the removed weights is added to the layer's
bias. The constants are measured by running the copy once with the removed channels' gammas
set to zero; layers without a bias get one (listed in ``plan.new_biases``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.plan import (
    Group,
    Member,
    PruningPlan,
)


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A new model with the plan's channels removed; ``model`` itself is left untouched."""
    slim = copy.deepcopy(model)
    _check_fits(slim, plan)
    pruned = [g for g in plan.groups if g.pruned]
    if not pruned:
        return slim
    for fqn in plan.new_biases:
        module = slim.get_submodule(fqn.rpartition(".")[0])
        w: torch.Tensor = module.weight  # type: ignore[assignment]
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    folds = [(g, m) for g in pruned for m in g.members if m.fold]
    if folds:
        _fold(slim, plan, pruned, folds)
    removed: dict[tuple[str, int], list[int]] = defaultdict(list)
    for g in pruned:
        gone = g.removed
        for m in g.members:
            removed[(m.tensor, m.dim)] += m.indices(gone)
    touched: dict[str, nn.Module] = {}
    for (fqn, dim), idx in removed.items():
        module_name, _, attr = fqn.rpartition(".")
        module = slim.get_submodule(module_name)
        old = getattr(module, attr)
        keep = torch.ones(old.shape[dim], dtype=torch.bool)
        keep[idx] = False
        new = old.detach().index_select(dim, keep.nonzero().flatten().to(old.device))
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, attr, new)
        touched[module_name] = module
    for module in touched.values():
        _update_sizes(module)
    return slim


def _check_fits(model: nn.Module, plan: PruningPlan) -> None:
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for fqn, shape in plan.tensor_shapes.items():
        t = state.get(fqn)
        if t is None or list(t.shape) != list(shape):
            found = "nothing" if t is None else f"shape {list(t.shape)}"
            raise SlimError(
                f"the pruning plan does not fit this model: it expects {fqn} of shape {list(shape)}, found "
                f"{found}; apply a plan to the architecture it was made for"
            )
    for fqn in plan.new_biases:
        if fqn in state:
            raise SlimError(f"the pruning plan adds {fqn}, but the model already has it; was the plan applied twice?")


def _fold(slim: nn.Module, plan: PruningPlan, pruned: list[Group], folds: list[tuple[Group, Member]]) -> None:
    with torch.no_grad():
        for g in pruned:
            gone = g.removed
            for m in g.members:
                if m.role == "bn":  # these entries are cut out below, so zeroing them in the copy is free
                    slim.get_parameter(m.tensor)[m.indices(gone)] = 0
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in {m.module for _, m in folds}:

        def record(_mod: nn.Module, args: tuple, name: str = name) -> None:
            seen[name] = args[0].detach()

        handles.append(slim.get_submodule(name).register_forward_pre_hook(record))
    modes = {m: m.training for m in slim.modules()}
    ref = next(slim.parameters())
    try:
        slim.eval()
        with torch.no_grad():
            slim(torch.zeros(1, *plan.input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        for h in handles:
            h.remove()
        for mod, training in modes.items():
            mod.training = training
    with torch.no_grad():
        for g, m in folds:
            layer: Any = slim.get_submodule(m.module)
            idx = torch.tensor(m.indices(g.removed), device=ref.device)
            w = layer.weight.index_select(1, idx)
            x, bias = seen[m.module], layer.bias
            if isinstance(layer, nn.Linear):
                value = x.reshape(-1, x.shape[-1])[0].index_select(0, idx)
                bias += w @ value
            else:  # a convolution without padding reading a spatially constant input
                value = x[0].index_select(0, idx).flatten(1).mean(1)
                bias += (w * value.view(1, -1, *[1] * (w.dim() - 2))).sum(dim=tuple(range(1, w.dim())))


def _update_sizes(module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        if module.groups > 1:  # only depthwise convs are pruned; they stay depthwise
            module.groups = module.in_channels = module.out_channels = int(w.shape[0])
        else:
            module.out_channels, module.in_channels = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        if ref is not None:
            module.num_features = int(ref.shape[0])
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = (int(v) for v in module.weight.shape)
