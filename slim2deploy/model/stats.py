"""Parameter and MAC counts, measured by running the model once with hooks."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slim2deploy.base.environment import check_memory
from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import first_line


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


def forward_bytes(model: nn.Module, input_shape: Sequence[int]) -> tuple[object, int]:
    """One forward pass of a zero batch of one, in eval mode without gradients: the model's output and
    the bytes one image needs at once, at least (the largest input plus output of any layer). On the
    meta device it would cost no memory but import torch._dynamo, two seconds a process. Whatever the
    model raises on an input it cannot take is raised as is."""
    largest = 0

    def hook(_mod: nn.Module, inputs: tuple[object, ...], out: object) -> None:
        nonlocal largest
        sizes = [t.numel() * t.element_size() for t in (*inputs, out) if isinstance(t, torch.Tensor)]
        largest = max(largest, sum(sizes))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()  # BatchNorm in training mode refuses a batch of one
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out, largest


# an input larger than this gets its one-image pass measured on the meta device (no memory) before it runs
META_ABOVE_BYTES = 16 << 20


def check_one_image(
    meta_model: Callable[[], nn.Module], input_shape: Sequence[int], what: str, images: int = 1
) -> None:
    """Refuse an input shape whose forward pass of ``images`` images cannot fit in this machine's memory,
    before it runs.

    The rule: the input tensor itself is a lower bound; for an input over ``META_ABOVE_BYTES`` (far
    above 3 x 1024 x 1024 floats, so ordinary sizes pay nothing) the pass is measured as ``forward_bytes``
    measures it, with the model ``meta_model()`` builds on the meta device, where tensors have shapes
    but no memory. A model the meta device cannot run keeps the input bound. ``what`` names the shape.
    """
    need = math.prod(input_shape) * 4
    if need > META_ABOVE_BYTES:
        need = max(need, _meta_bytes(meta_model, input_shape))
    advice = "it cannot run on this machine: use a machine with more memory, or a model made for smaller inputs"
    passes = "one image" if images == 1 else f"a pass of {images} images"
    check_memory(need * images, what, list(input_shape), f"{passes} through the model", advice=advice)


def _meta_bytes(meta_model: Callable[[], nn.Module], input_shape: Sequence[int]) -> int:
    try:
        with torch.device("meta"):
            return forward_bytes(meta_model(), input_shape)[1]
    except Exception:  # noqa: BLE001 - any model code may refuse meta tensors: then the input is the bound
        return 0


def meta_copy(model: nn.Module) -> Callable[[], nn.Module]:
    """``check_one_image``'s ``meta_model`` for a model that exists: a copy of it on the meta device."""
    return lambda: copy.deepcopy(model).to("meta")


def image_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes one image needs at once in a forward pass (``forward_bytes``). That pass is also the one
    general check that the model takes images of this shape (too small for its pooling, another channel
    count): refused here, before any work, instead of as a traceback from deep inside training. A shape
    whose pass cannot fit in memory is refused before it (``check_one_image``)."""
    check_one_image(meta_copy(model), input_shape, "the input shape")
    try:
        return forward_bytes(model, input_shape)[1]
    except Exception as exc:  # noqa: BLE001 - whatever a model raises for inputs it cannot take
        raise SlimError(
            f"the model does not run on {tuple(input_shape)} images (C, H, W): {first_line(exc)}; give images "
            "of the size and channel count it takes (for a folder, `image_size`)"
        ) from exc


def check_memory_for(per_image: int, batch: int, flag: str) -> None:
    """Refuse a batch of images needing ``per_image`` bytes each at once that cannot be in memory."""
    check_memory(per_image * batch, flag, batch, "one batch through the model")
