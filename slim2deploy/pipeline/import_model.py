"""The ``import`` stage: an existing model + its weights + an input shape in, a slim2deploy checkpoint out.

The checkpoint records the architecture by name, so ``prune``, ``export``, ``build`` and the
benchmarks work on it directly, and the normalisation its inputs need (``model.preprocess``: the
library's convention for torchvision/timm weights, ImageNet's for others, unless given).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import checkpoint_for, first_line, save_checkpoint
from slim2deploy.model.preprocess import describe_stats, starting_stats
from slim2deploy.model.sparsity import draw_sparse_gammas
from slim2deploy.model.weights import WeightsReport, build_with_weights
from slim2deploy.model.zoo import check_code, create_model, factory_args, split_name

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def import_model(
    arch: str,
    out: str | Path,
    input_shape: tuple[int, int, int],
    *,
    weights: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    width: float | None = None,
    stats: Stats | None = None,
    image_size: int | None = None,
    trust_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, WeightsReport | None]:
    """Build ``arch`` with the given weights, check it runs on ``input_shape`` and save a checkpoint.

    The normalisation is ``stats``, else the one rule of ``model.preprocess.starting_stats`` for weights
    trained elsewhere; a ``package.module:factory`` is imported only with ``trust_code``.
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise SlimError(f"`input_shape` is C,H,W with positive sizes, e.g. 3,224,224; got {input_shape}")
    check_code(arch, trust_code)
    if image_size is not None and image_size < input_shape[1]:
        raise SlimError(
            f"`image_size` {image_size} is smaller than the input's {input_shape[1]} pixels: the center crop to "
            f"{input_shape[1]} must fit in the resized image; give {input_shape[1]} or more"
        )
    if num_classes is not None and num_classes < 1:
        raise SlimError(f"`num_classes` must be at least 1, got {num_classes}")
    if not (weights or pretrained):
        raise SlimError("import needs the weights to start from: `weights` (a file) or `pretrained`")
    kwargs: dict[str, Any] = {} if split_name(arch)[0] else {"in_channels": input_shape[0]}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if width is not None:
        kwargs["width"] = width
    kwargs = factory_args(arch, kwargs)
    model, kwargs, report = build_with_weights(
        arch, kwargs, weights=weights, pretrained=pretrained, trust_code=trust_code
    )
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # noqa: BLE001 - a model may raise anything on an input it cannot take
        raise SlimError(f"{arch} does not run on inputs of shape {input_shape} (C,H,W): {first_line(exc)}") from exc
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SlimError(f"{arch} returns {shape}; a classifier returning N x classes logits is needed")
    stats, said = starting_stats(arch, weights=True, given=stats, channels=input_shape[0])
    if stats is None:
        raise SlimError(
            f"weights trained elsewhere for {input_shape[0]}-channel inputs have no common normalisation: give the "
            "one they were trained with (`mean` and `std`, one value per channel)"
        )
    if len(stats[0]) != input_shape[0]:
        raise SlimError(
            f"the normalisation has {len(stats[0])} values ({said}) but the input has {input_shape[0]} channels; "
            "give `mean` and `std` with one value per channel"
        )
    meta = {
        "mean": list(stats[0]),
        "std": list(stats[1]),
        "normalisation": said,
        "classes": [str(i) for i in range(logits.shape[1])],
        "preprocess": {"image_size": image_size or input_shape[1], "crop": input_shape[1]},
        "imported": {"arch": arch, "weights": weights, "pretrained": pretrained},
        **({"weights": report.to_dict()} if report is not None else {}),
    }
    ckpt = checkpoint_for(model, arch, kwargs, input_shape, int(logits.shape[1]), meta)
    if log is not None:
        log(describe_stats(stats, said))
    return save_checkpoint(ckpt, out), report


def sparse_like_checkpoint(
    arch: str,
    out: str | Path,
    input_shape: tuple[int, int, int],
    *,
    near_zero: float = 0.5,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    **arch_kwargs: Any,
) -> Path:
    """A checkpoint of ``arch`` with random weights and BatchNorm gamma drawn as sparse training
    leaves it (``draw_sparse_gammas``): for latency studies, where only the network's shape matters."""
    torch.manual_seed(seed)
    model = draw_sparse_gammas(create_model(arch, **arch_kwargs).eval(), near_zero, seed)
    with torch.no_grad():
        classes = int(model(torch.zeros(1, *input_shape)).shape[1])
    return save_checkpoint(checkpoint_for(model, arch, arch_kwargs, input_shape, classes, meta or {}), out)
