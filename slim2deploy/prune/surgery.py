"""Surgery: cut the removed channels out for real, giving a new dense and thinner model.

``apply_plan`` deep-copies the model and replaces every parameter and buffer named in the plan
by the slice that keeps the group's channels, lowers the channel counts that modules hold as
attributes (e.g. the sizes a ``torch.split`` uses), then updates the sizes that layers store
(``SIZE_UPDATERS``: one entry per layer type). It works from the plan alone: the resulting
structure depends on the architecture and the plan, never on weight values, so a pruned
checkpoint is rebuilt as *original architecture -> apply_plan -> load the slim state_dict*.
Before it returns, the slim model must run the plan's example input (``prune.verify``).

Folding. A removed channel whose gamma is zero still emits the constant act(beta). Where the
plan marks an input as ``fold`` (a linear, or a convolution without padding, reading a value
the planner proved constant), that constant times the removed weights is added to the layer's
bias. The constants are measured by running the copy once with the removed channels' gammas
set to zero; layers without a bias get one (listed in ``plan.new_biases``).

Depth. A group that keeps no channel is not cut: the residual branch it lies in is removed as a
whole after the channel cut (``prune.depth``), its constant output computed on the slim model.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.depth import check_branches_fit, remove_branches
from slim2deploy.prune.plan import Group, Member, PruningPlan
from slim2deploy.prune.verify import verify_slim


def apply_plan(model: nn.Module, plan: PruningPlan, *, verify: bool = True) -> nn.Module:
    """A new model with the plan's channels removed; ``model`` itself is left untouched.

    With ``verify`` (the default) the slim model is run on the plan's example input shape and
    compared with ``model`` (``prune.verify.verify_slim``); a failure raises ``SlimError``
    naming the group, so a model that does not run is never returned.
    """
    slim = cut(model, plan)
    if verify and any(g.pruned for g in plan.groups):  # an emptied group is pruned too
        verify_slim(model, slim, plan, cut)
    return slim


def cut(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """The surgery itself, without the check that the result runs."""
    slim = copy.deepcopy(model)
    check_fits(slim, plan)
    # a group that keeps nothing goes with its branch, after the channels of the others are cut
    pruned = [g for g in plan.groups if g.pruned and g.keep]
    if pruned:
        _cut_channels(slim, plan, pruned)
    remove_branches(slim, plan)
    return slim


def _cut_channels(slim: nn.Module, plan: PruningPlan, pruned: list[Group]) -> None:
    for fqn in plan.new_biases:
        module = slim.get_submodule(fqn.rpartition(".")[0])
        w: torch.Tensor = module.weight  # type: ignore[assignment]
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    folds = [(g, m) for g in pruned for m in g.members if m.fold]
    if folds:
        _fold(slim, plan, pruned, folds)
    removed: dict[tuple[str, int], list[int]] = defaultdict(list)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for g in pruned:
        gone = g.removed
        for m in g.members:
            if m.role == "size":
                counts[(m.tensor, m.dim)] += len(gone)
            else:
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
    for (fqn, index), n in counts.items():
        _lower_count(slim, fqn, index, n)
    for module in touched.values():
        update_sizes(module)


def check_fits(model: nn.Module, plan: PruningPlan) -> None:
    """The plan was made for this architecture: every tensor and count it names is there, in its shape."""
    plan.check()
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
    for g in plan.groups:
        for m in g.members:
            if m.role == "size" and _count_holder(model, m) is None:
                raise SlimError(
                    f"the pruning plan does not fit this model: it expects {m.tensor}"
                    f"{'' if m.dim < 0 else f'[{m.dim}]'} to hold a channel count, and it does not; "
                    "apply a plan to the architecture it was made for"
                )
    check_branches_fit(model, plan)


def _count_holder(model: nn.Module, m: Member) -> Any:
    try:
        value = getattr(model.get_submodule(m.module), m.attribute)
    except AttributeError:
        return None
    if m.dim < 0:
        return value if type(value) is int else None
    if isinstance(value, (list, tuple)) and m.dim < len(value) and type(value[m.dim]) is int:
        return value
    return None


def _lower_count(slim: nn.Module, fqn: str, index: int, n: int) -> None:
    module_name, _, attr = fqn.rpartition(".")
    module = slim.get_submodule(module_name)
    value = getattr(module, attr)
    if index < 0:
        setattr(module, attr, value - n)
    else:
        items = list(value)
        items[index] -= n
        setattr(module, attr, type(value)(items))


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


# -- the sizes layers store next to their weights, one updater per layer type


SIZE_UPDATERS: dict[type[nn.Module], Callable[[Any], None]] = {}


def updates_sizes(*types: type[nn.Module]) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Decorator: ``fn(module)`` makes the stored sizes of modules of these types match their weights."""

    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        for t in types:
            SIZE_UPDATERS[t] = fn
        return fn

    return register


def update_sizes(module: nn.Module) -> None:
    for cls in type(module).__mro__:
        if cls in SIZE_UPDATERS:
            SIZE_UPDATERS[cls](module)
            return


@updates_sizes(nn.modules.conv._ConvNd)
def _conv(module: Any) -> None:
    w = module.weight
    if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
        module.groups = module.in_channels = module.out_channels = int(w.shape[0])  # depthwise stays depthwise
    else:  # dense, or grouped with the same channels removed from every group: groups is unchanged
        module.out_channels, module.in_channels = int(w.shape[0]), int(w.shape[1]) * module.groups


@updates_sizes(nn.modules.batchnorm._BatchNorm)
def _batchnorm(module: Any) -> None:
    ref = module.weight if module.weight is not None else module.running_mean
    if ref is not None:
        module.num_features = int(ref.shape[0])


@updates_sizes(nn.Linear)
def _linear(module: Any) -> None:
    module.out_features, module.in_features = (int(v) for v in module.weight.shape)


@updates_sizes(nn.PReLU)
def _prelu(module: Any) -> None:
    module.num_parameters = int(module.weight.shape[0])
