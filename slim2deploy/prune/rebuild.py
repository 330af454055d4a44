"""Rebuild a model from a checkpoint: architecture from its name, the plan replayed, weights loaded.

A pruned checkpoint is *architecture spec + plan + state_dict*: the architecture is built fresh,
``apply_plan`` cuts it to the planned widths, and the slim weights load strictly. No pickled
classes are involved unless the user trusted a pickled module.
"""

from __future__ import annotations

import copy

from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import Checkpoint, first_line
from slim2deploy.model.zoo import create_model, is_user_factory
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.surgery import apply_plan


def model_from_checkpoint(ckpt: Checkpoint, *, trust_code: bool = False) -> nn.Module:
    """Rebuild the (possibly pruned) model in eval mode, weights loaded strictly."""
    if ckpt.module is not None:
        return copy.deepcopy(ckpt.module).eval()
    if is_user_factory(ckpt.arch) and not trust_code:
        raise SlimError(
            f"the checkpoint's model comes from {ckpt.arch!r}; importing it runs that module's code. "
            "Pass --trust-pickle (trust_code=True) if you trust it"
        )
    model = create_model(ckpt.arch, **ckpt.arch_kwargs)
    if ckpt.plan is not None:
        model = apply_plan(model, PruningPlan.from_dict(ckpt.plan))
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise SlimError(
            f"the checkpoint's weights do not fit its architecture {ckpt.arch} {ckpt.arch_kwargs}: "
            f"{first_line(exc)}; the file is inconsistent (was it edited by hand?)"
        ) from exc
    return model.eval()
