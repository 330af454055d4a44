"""The ``prune`` stage: sparse checkpoint in, pruned checkpoint (architecture + plan + slim weights) out."""

from __future__ import annotations

from pathlib import Path

import torch

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.rebuild import model_from_checkpoint
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
    trust_code: bool = False,
) -> tuple[PruningPlan, str]:
    """What ``slim2deploy prune`` does: plan, cut, save arch + plan + slim weights; returns the table."""
    ckpt = load_checkpoint(src, trust_pickle=trust_code)
    if ckpt.is_pruned:
        raise SlimError(
            f"{src} is already pruned; prune the sparse-trained checkpoint it came from with a larger ratio instead"
        )
    model = model_from_checkpoint(ckpt, trust_code=trust_code)
    if ckpt.module is not None:
        raise SlimError(
            f"{src} is a pickled nn.Module without an architecture name; a pruned copy could not be rebuilt"
        )
    x = torch.zeros(1, *ckpt.input_shape)
    plan = select(trace_groups(model, x, fold=fold), selection)
    slim = apply_plan(model, plan)
    table = summarize(plan, model, x, slim)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("val_acc", "versions")}
    meta["pruned"] = {"from": str(src), "selection": selection.to_dict(), "val_acc_before": ckpt.meta.get("val_acc")}
    save_checkpoint(
        checkpoint_for(slim, ckpt.arch, ckpt.arch_kwargs, ckpt.input_shape, ckpt.num_classes, meta, plan.to_dict()),
        dst,
    )
    return plan, table
