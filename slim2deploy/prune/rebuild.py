"""Rebuild a model from a checkpoint: architecture from its name, the plan replayed, weights loaded.

A pruned checkpoint is *architecture spec + plan + state_dict*: the architecture is built fresh,
``apply_plan`` cuts it to the planned widths, and the slim weights load strictly. No pickled
classes are involved unless the user trusted a pickled module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import Checkpoint, dtype_problem, first_line
from slim2deploy.model.stats import check_memory_for, check_one_image, forward_bytes, image_bytes
from slim2deploy.model.zoo import create_model, is_user_factory
from slim2deploy.prune.plan import PruningPlan
from slim2deploy.prune.surgery import apply_plan


@dataclass
class Rebuilt:
    """A model rebuilt from its checkpoint, with the bytes one image needs at once in its forward pass
    (``stats.forward_bytes``), measured once per command: by the pass that checked the checkpoint,
    else (a pickled module, which has none) by the first batch check that asks."""

    model: nn.Module
    input_shape: tuple[int, ...]
    measured: int | None = None

    def bytes_per_image(self) -> int:
        if self.measured is None:
            self.measured = image_bytes(self.model, self.input_shape)
        return self.measured

    def check_batch(self, batch: int, flag: str) -> None:
        """Refuse a batch of this model's input shape that cannot be in memory at once, without another pass."""
        check_memory_for(self.bytes_per_image(), batch, flag)


def model_from_checkpoint(ckpt: Checkpoint, *, trust_code: bool = False) -> nn.Module:
    """Rebuild the (possibly pruned) model in eval mode, weights loaded strictly (see ``rebuild``)."""
    return rebuild(ckpt, trust_code=trust_code).model


def rebuild(ckpt: Checkpoint, *, trust_code: bool = False) -> Rebuilt:
    """Rebuild the (possibly pruned) model in eval mode, weights loaded strictly.

    Every command that builds a model from a checkpoint comes through here, so one forward pass on a
    zero input of the checkpoint's ``input_shape`` checks that the recorded shape fits the model, and
    its output width that the recorded ``num_classes`` does (labels are checked against that count);
    the same pass measures what one image needs in memory, for the batch checks. A shape whose pass
    cannot fit in memory at all is refused before anything runs on it (``stats.check_one_image``).
    """
    if ckpt.module is not None:
        return Rebuilt(copy.deepcopy(ckpt.module).eval(), tuple(ckpt.input_shape))
    if is_user_factory(ckpt.arch) and not trust_code:
        raise SlimError(
            f"the checkpoint's model comes from {ckpt.arch!r}; importing it runs that module's code. "
            "Pass `trust_code` if you trust it"
        )
    # replaying a plan checks the slim model against the unpruned one on two images of the input shape
    images = 1 if ckpt.plan is None else 2
    check_one_image(
        lambda: create_model(ckpt.arch, **ckpt.arch_kwargs), ckpt.input_shape, "the checkpoint's input_shape", images
    )
    model = create_model(ckpt.arch, **ckpt.arch_kwargs)
    if ckpt.plan is not None:
        model = apply_plan(model, PruningPlan.from_dict(ckpt.plan))
    mismatch = _mismatch(model.state_dict(), ckpt.state_dict)
    if mismatch:
        raise SlimError(
            f"the checkpoint's weights do not fit its architecture {ckpt.arch} {ckpt.arch_kwargs}: "
            f"{mismatch}; the file is inconsistent (was it edited by hand?): re-create it"
        )
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.eval()
    try:
        out, measured = forward_bytes(model, ckpt.input_shape)
    except Exception as exc:  # noqa: BLE001 - a model may raise anything on an input it does not take
        raise SlimError(
            f"the checkpoint's input_shape {list(ckpt.input_shape)} does not fit its model {ckpt.arch} "
            f"({first_line(exc)}); the file is inconsistent (was it edited by hand?): re-create it"
        ) from exc
    width = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
    if width != (ckpt.num_classes,):
        raise SlimError(
            f"the checkpoint records num_classes {ckpt.num_classes} but its model {ckpt.arch} gives outputs of "
            f"shape {width}; the file is inconsistent (was it edited by hand?): re-create it"
        )
    return Rebuilt(model, tuple(ckpt.input_shape), measured)


def _mismatch(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], shown: int = 3) -> str:
    """The first few missing, unexpected and wrongly shaped tensors, named; empty when they fit."""
    missing = [k for k in own if k not in loaded]
    unexpected = [k for k in loaded if k not in own]
    shapes = [
        f"{k} is {tuple(loaded[k].shape)} but the model's is {tuple(v.shape)}"
        for k, v in own.items()
        if k in loaded and loaded[k].shape != v.shape
    ]
    dtypes = [p for k, v in own.items() if k in loaded and (p := dtype_problem(k, v, loaded[k]))]
    parts = []
    for what, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", shapes),
        ("wrong type", dtypes),
    ):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > shown else ""
            parts.append(f"{what}: {', '.join(items[:shown])}{more}")
    return "; ".join(parts)
