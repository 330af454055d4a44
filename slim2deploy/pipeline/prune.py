"""The ``prune`` stage: sparse checkpoint in, pruned checkpoint (architecture + plan + slim weights) out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import Checkpoint, checkpoint_for, load_checkpoint, save_checkpoint, with_input_shape
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import Rebuilt, rebuild
from slim2deploy.prune.select import Selection, select
from slim2deploy.prune.summary import summarize
from slim2deploy.prune.surgery import apply_plan
from slim2deploy.prune.trace import trace_groups


def prune_checkpoint(
    src: str | Path,
    dst: str | Path,
    selection: Selection,
    *,
    fold: bool = True,
    exact: bool = True,
    trust_code: bool = False,
    input_shape: tuple[int, int, int] | None = None,
) -> tuple[PruningPlan, str]:
    """What ``slim2deploy prune`` does: plan, cut, save arch + plan + slim weights; returns the table.

    A trusted pickled module (``input_shape`` given) has no architecture name to replay the plan
    on, so its slim copy is saved pickled inside the checkpoint and needs trust to load again.
    """
    ckpt, rebuilt = load_for_pruning(src, trust_code, input_shape)
    model = rebuilt.model
    x = torch.zeros(1, *ckpt.input_shape)
    plan = select(trace_groups(model, x, fold=fold, exact=exact, score=selection.score), selection)
    slim = apply_plan(model, plan)
    table = summarize(plan, model, x, slim)
    save_pruned(ckpt, src, slim, plan, selection, dst)
    return plan, table


def load_for_pruning(
    src: str | Path, trust_code: bool = False, input_shape: tuple[int, int, int] | None = None
) -> tuple[Checkpoint, Rebuilt]:
    """A sparse-trained checkpoint and its model; a pruned checkpoint is refused."""
    ckpt = with_input_shape(load_checkpoint(src, trust_code=trust_code), input_shape, str(src))
    if ckpt.is_pruned:
        raise SlimError(
            f"{src} is already pruned; prune the sparse-trained checkpoint it came from with a larger ratio instead"
        )
    return ckpt, rebuild(ckpt, trust_code=trust_code)


def save_pruned(
    ckpt: Checkpoint, src: str | Path, slim: nn.Module, plan: PruningPlan, selection: Selection, dst: str | Path
) -> None:
    """The pruned checkpoint: the source's architecture (or pickled module), the plan and the slim weights."""
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("val_acc", "versions")}
    meta["pruned"] = {"from": str(src), "selection": selection.to_dict(), "val_acc_before": ckpt.meta.get("val_acc")}
    save_checkpoint(
        checkpoint_for(slim, ckpt.arch, ckpt.arch_kwargs, ckpt.input_shape, ckpt.num_classes, meta, plan.to_dict()),
        dst,
    )
