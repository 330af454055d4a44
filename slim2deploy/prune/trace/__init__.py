"""Tracing a model into coupled channel groups: ``trace_groups`` (and ``rescore``, ``prunable_masks``,
``branch_groups``).

One rule over the exported graph (``walk``): every tensor that carries channels has a layout
(``layout``), and each operator's handler (``ops_*``, found by name in ``registry``) says what
happens to it: passed through (element-wise ops, BatchNorm, pooling, padding of other
dimensions, depthwise convolutions, reshapes that keep channels whole), coupled (add/mul/...
operands, grouped convolutions), cut and joined (slices, splits, concatenations), or consumed
and produced (convolutions, linears). An operator without a handler, or one whose handler
cannot follow it, makes every group it touches unprunable, with the operator and module named
in the plan -- never a silently wrong model. A new op is one handler.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.model.sparsity import GammaGroup, bn_layers
from slim2deploy.prune.plan import PruningPlan, copy_group
from slim2deploy.prune.score import ScoreFn, max_abs_gamma
from slim2deploy.prune.trace import ops_elementwise, ops_layers, ops_shape, ops_spatial
from slim2deploy.prune.trace.branches import find_branches
from slim2deploy.prune.trace.registry import HANDLERS, handles
from slim2deploy.prune.trace.state import TraceState
from slim2deploy.prune.trace.walk import export, walk

__all__ = ["HANDLERS", "branch_groups", "groups_in_branches", "handles", "prunable_masks", "rescore", "trace_groups"]
_OPS = (ops_elementwise, ops_layers, ops_shape, ops_spatial)  # imported for their handlers


def trace_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    fold: bool = True,
    exact: bool = True,
    score: ScoreFn = max_abs_gamma,
) -> PruningPlan:
    """Trace ``model`` and return its coupled groups, scored by ``score``; nothing is pruned yet.

    ``fold=False`` gives up folding removed channels' constant output into the next layer's
    bias; groups that need it to be exact then become unprunable. ``exact=False`` also prunes
    groups that some layer reads raw (e.g. a pre-activation ResNet's residual stream, read by the
    next stage's shortcut convolution): their BatchNorms' gamma still ranks them, but cutting
    them changes the outputs, so fine-tuning has to recover it (``Group.approximate`` says where).
    The residual joins found are in ``plan.branches``: removable ones name the groups inside them.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise SlimError("example_input must be a batched tensor, e.g. torch.zeros(1, 3, 32, 32)")
    ep = export(model, example_input)
    state = TraceState(model, ep, fold, exact)
    walk(state)
    groups = state.groups()
    branches = find_branches(state, groups)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    shapes = {m.tensor: list(tensors[m.tensor].shape) for g in groups for m in g.members if m.role != "size"}
    used = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    # BatchNorm's step counter is never read in eval mode; that says nothing about the layer
    unused = sorted(
        {
            fqn.rpartition(".")[0]
            for name, fqn in state.fqn.items()
            if name not in used and not fqn.endswith("num_batches_tracked")
        }
    )
    notes = []
    if unused:
        notes.append(
            "not reached by the traced (eval-mode) forward and left as they are: "
            + ", ".join(unused[:8])
            + (" ..." if len(unused) > 8 else "")
            + "; the slim model is valid in eval mode only if they read pruned channels"
        )
    traced = PruningPlan(
        groups=groups,
        input_shape=list(example_input.shape[1:]),
        tensor_shapes=shapes,
        fold=fold,
        exact=exact,
        notes=notes,
        branches=branches,
    )
    return rescore(traced, model, score=score)


def rescore(traced: PruningPlan, model: nn.Module, *, score: ScoreFn = max_abs_gamma) -> PruningPlan:
    """The same groups scored with ``model``'s current weights (the structure is traced once)."""
    return replace(traced, groups=[copy_group(g, scores=score(model, g)) for g in traced.groups])


def prunable_masks(model: nn.Module, example_input: torch.Tensor, exact: bool = True) -> dict[str, torch.Tensor]:
    """For each BatchNorm weight, which of its channels lie in a prunable group of the pruning plan
    (``exact=False``: of the plan ``prune --approximate`` makes)."""
    traced = trace_groups(model, example_input, exact=exact)
    masks = {f"{name}.weight": torch.zeros(bn.num_features, dtype=torch.bool) for name, bn in bn_layers(model)}
    for group in traced.groups:
        if not group.prunable:
            continue
        for m in group.members:
            if m.role == "bn" and m.tensor in masks:
                masks[m.tensor][m.indices(list(range(group.size)))] = True
    return masks


def branch_groups(model: nn.Module, example_input: torch.Tensor) -> list[GammaGroup]:
    """The BatchNorm gammas of every group inside a removable residual branch of the pruning plan, one
    ``GammaGroup`` each (named after the branch's join): all zero, the group is empty and the branch goes."""
    return groups_in_branches(trace_groups(model, example_input))


def groups_in_branches(traced: PruningPlan) -> list[GammaGroup]:
    """``branch_groups`` of a model already traced."""
    found = []
    for b in traced.branches:
        for k, i in enumerate(b.groups if b.removable else []):
            g = traced.groups[i]
            channels: dict[str, list[int]] = {}
            for m in g.members:
                if m.role == "bn":
                    channels.setdefault(m.tensor, []).extend(m.indices(list(range(g.size))))
            found.append(GammaGroup(b.join if len(b.groups) == 1 else f"{b.join} #{k + 1}", channels))
    return found
