"""Depth surgery: a removed residual branch's modules become ``Const`` (its constant output) or ``Skip``.

A branch one of whose groups keeps no channel (``PruningPlan.removed_branches``) outputs a constant
once that group's gammas are zero (``prune.trace.branches``). We cannot edit the model's forward,
so the modules the plan names are swapped: a ``Const`` returns its module's recorded output, a
``Skip`` (a module whose output only other replaced modules read) returns zeros of its shape. The
forward then computes ``stream + value``, the ``value`` broadcast over the batch; the ONNX
exporter folds what is left of the branch into one initializer, so the join becomes an Add of a
constant.

A removed branch's constant holds its full spatial map (zero padding inside the branch makes the
borders differ), so the slim model takes the plan's input size only: a pre-hook (``InputSizeCheck``)
says so instead of the join's broadcasting error (an ONNX graph has a fixed C x H x W anyway).

The constants are computed, not guessed: after the channel cut, the model runs once on a batch
of one with the branch's chosen gammas (``Branch.gammas``) set to zero, and each ``Const``
module's output is recorded (and each ``Skip`` module's shape, which the channel cut may have
changed). Which modules are replaced comes from the plan alone, so a pruned checkpoint is rebuilt
as usual (architecture -> plan -> state_dict): the values come back as the ``value`` buffers of
the state_dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.prune.plan import PruningPlan


def _batch_of(args: tuple[Any, ...]) -> tuple[Any, torch.Tensor | None]:
    """The batch size of the first tensor argument (left symbolic: an exporter may trace it) and the tensor."""
    like = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return (like.shape[0] if like is not None and like.dim() else 1), like


def skip_output(shape: tuple[int, ...], batched: bool, *args: Any) -> torch.Tensor:
    """Zeros standing for a skipped module's output, which only other replaced modules read: one sample of
    its traced shape, so that functional ops left between replaced modules still run; in a batched branch
    (1, ...) per sample instead, as the batch size is all the branch's constant needs from it and a full
    batch of zeros would cost what the branch did."""
    n, like = _batch_of(args)
    size = (n,) + (1,) * len(shape) if batched else (1, *shape)
    if like is None:
        return torch.zeros(size)
    return torch.zeros(size, dtype=like.dtype, device=like.device)


def const_output(value: torch.Tensor, batched: bool, *args: Any) -> torch.Tensor:
    """A fresh copy of ``value`` (the join may add into it in place): one sample, or the input's batch
    where the join writes into it in place (``Branch.batched``), which cannot broadcast."""
    n, _ = _batch_of(args)
    if batched and n != value.shape[0]:
        return value.expand(n, *value.shape[1:]).clone()
    return value.clone()


# torch.fx (Conv+BN folding in runtime.torch) must record these calls, not trace their branches
torch.fx.wrap("skip_output")
torch.fx.wrap("const_output")


class Skip(nn.Module):
    """Stands in for a module of a removed branch whose output only other replaced modules read."""

    def __init__(self, shape: tuple[int, ...], batched: bool = False):
        super().__init__()
        self.shape, self.batched = tuple(shape), batched

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return skip_output(self.shape, self.batched, *args, *kwargs.values())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, batched={self.batched}"


class Const(nn.Module):
    """Stands in for a module of a removed branch: returns that module's output, recorded as ``value``."""

    def __init__(self, value: torch.Tensor, batched: bool = False):
        super().__init__()
        self.batched = batched
        self.value: torch.Tensor
        self.register_buffer("value", value)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return const_output(self.value, self.batched, *args, *kwargs.values())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.value.shape)}, batched={self.batched}"


class InputSizeCheck:
    """Forward pre-hook of a model with removed branches: their constants were recorded at one input size
    (zero padding inside a branch makes them differ at the borders, so they are not per-channel values),
    and at another the join fails with a bare broadcasting error; this says why first."""

    def __init__(self, shape: tuple[int, ...], removed: int):
        self.shape, self.removed = tuple(shape), removed

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) == self.shape:
            return
        raise SlimError(
            f"this slim model takes {'x'.join(map(str, self.shape))} inputs only, got "
            f"{'x'.join(map(str, x.shape[1:]))}: the constant outputs of its {self.removed} removed residual "
            "branch(es) were computed at that size; prune with `depth=False` for a model that takes other sizes"
        )


def check_branches_fit(model: nn.Module, plan: PruningPlan) -> None:
    """Every module a removable branch would replace is in ``model``."""
    for b in plan.branches:
        for path in b.modules():
            try:
                model.get_submodule(path)
            except AttributeError:
                raise SlimError(
                    f"the pruning plan does not fit this model: it replaces the layer {path} of the branch joined "
                    f"at {b.join}, which the model does not have; apply a plan to the architecture it was made for"
                ) from None


def remove_branches(slim: nn.Module, plan: PruningPlan) -> None:
    """Replace the modules of every removed branch of ``plan`` in ``slim`` (in place)."""
    gone = plan.removed_branches()
    if not gone:
        return
    zero = [
        fqn
        for b in gone
        for gi, names in zip(b.groups, b.gammas, strict=True)
        if not plan.groups[gi].keep
        for fqn in names
    ]
    outputs = _outputs(slim, plan.input_shape, zero, [p for b in gone for p in b.modules()])
    for b in gone:
        for path in b.modules():
            outs = outputs[path]
            if not outs or any(not isinstance(o, torch.Tensor) or o.dim() != len(b.shapes[path]) + 1 for o in outs):
                raise SlimError(
                    f"the pruning plan does not fit this model: the layer {path} of the branch joined at {b.join} "
                    f"did not run, or did not return a tensor of {len(b.shapes[path]) + 1} dimensions; "
                    "apply a plan to the architecture it was made for"
                )
        for path in b.skip:  # the shape after the channel cut, which the plan's traced one is not
            slim.set_submodule(path, Skip(tuple(outputs[path][0].shape[1:]), b.batched))
        for path in b.const:
            if len(outputs[path]) != 1:
                raise SlimError(f"the layer {path} of the branch joined at {b.join} runs more than once; re-plan")
            slim.set_submodule(path, Const(outputs[path][0], b.batched))
    slim.register_forward_pre_hook(InputSizeCheck(tuple(plan.input_shape), len(gone)))


def _outputs(slim: nn.Module, input_shape: list[int], zero: list[str], paths: list[str]) -> dict[str, list[Any]]:
    """Each module's outputs in ``paths`` on a batch of one, with the gammas in ``zero`` set to zero."""
    seen: dict[str, list[Any]] = {p: [] for p in paths}

    def record(path: str, out: Any) -> None:  # a copy: the join may add into the output in place
        seen[path].append(out.detach().clone() if isinstance(out, torch.Tensor) else out)

    handles = [slim.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: record(p, out)) for p in paths]
    saved = {fqn: slim.get_parameter(fqn).detach().clone() for fqn in zero}
    modes = {m: m.training for m in slim.modules()}
    ref = next(slim.parameters())
    try:
        slim.eval()
        with torch.no_grad():
            for fqn in zero:
                slim.get_parameter(fqn).zero_()
            slim(torch.zeros(1, *input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        with torch.no_grad():
            for fqn, value in saved.items():
                slim.get_parameter(fqn).copy_(value)
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return seen
