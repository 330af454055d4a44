"""A small model zoo, found by name (never by pickled classes).

Names:
- ``vgg11/13/16/19``: CIFAR-style VGG with BatchNorm, as in the Network Slimming paper.
- ``resnet20/56/164``: pre-activation ResNets for 32x32 inputs; 164 uses bottleneck blocks.
- ``densenet40``: DenseNet-40 with growth rate 12 (no bottleneck, no compression), as in the paper.
- ``torchvision:NAME``: any torchvision classification builder, ``weights=None``.
- ``timm:NAME``: any timm model (``pip install 'slim2deploy[timm]'``), ``pretrained=False``.
- ``package.module:factory``: a user's own model. ``factory`` is a function, a class or a classmethod
  (``package.module:Class.method``) returning an ``nn.Module``; it is called with ``num_classes=N`` and
  ``in_channels=C`` where it takes them (by name or through ``**kwargs``), and with nothing else.

**What a name may make slim2deploy import or open** (one rule, ``check_code`` and ``create_model``): the
zoo and the installed model libraries (torchvision, timm) are imported by their names; a
``package.module:factory`` imports that module, which runs its code, so it is built only with
``trust_code`` -- whether the name comes from the command line or from a checkpoint. A zoo or library
model is built only with numbers and switches (``_size_argument``: ``num_classes``, ``width_mult``, ...):
strings, lists and mappings can name a file or a URL (timm's ``checkpoint_path``, ``pretrained_cfg``,
torchvision's ``weights``) and ``pretrained`` downloads, so a checkpoint's ``arch_kwargs`` never make the
tool open a file or the network; a trusted factory gets its own recorded arguments.

Models are always built with fresh weights: a checkpoint rebuilds its model this way and then
loads its own state_dict, so nothing downloads when a checkpoint is read. ``create_pretrained``
asks the library for its pretrained weights (see ``model/weights.py``).

Every zoo model takes ``in_channels``, ``num_classes`` and a width multiplier ``width`` and works
at 28x28 and 32x32 (pooling uses ``ceil_mode`` and a global average pool before the classifier).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slim2deploy.base.environment import check_memory
from slim2deploy.base.errors import SlimError
from slim2deploy.model.nets import REGISTRY
from slim2deploy.model.stats import count_params

LIBRARIES = ("torchvision", "timm")
ZOO_ARGS = ("in_channels", "num_classes", "width")
FACTORY_ARGS = ("num_classes", "in_channels")  # what a user factory is offered
DOWNLOAD_SWITCHES = ("pretrained",)  # a library argument that fetches weights, whatever its type


def _size_argument(key: str, value: Any) -> bool:
    """A builder argument a name or a checkpoint may set for a zoo or library model: a number or a switch
    (``num_classes``, ``width_mult``, ``drop_rate``), never a string, list or mapping (a path, a URL, a
    config naming a file) and never a download switch."""
    plain = isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value))
    return plain and key not in DOWNLOAD_SWITCHES


def list_models() -> list[str]:
    """Zoo names; ``torchvision:NAME``, ``timm:NAME`` and ``package.module:factory`` are accepted as well."""
    return sorted(REGISTRY)


def split_name(name: str) -> tuple[str, str]:
    """("torchvision" | "timm", model name) for a library model, ("", name) otherwise."""
    library, sep, rest = name.partition(":")
    return (library, rest) if sep and library in LIBRARIES else ("", name)


def is_user_factory(name: str) -> bool:
    """True for ``package.module:factory`` references, which import and run user code."""
    return ":" in name and not split_name(name)[0]


def check_code(name: str, trust_code: bool) -> None:
    """Refuse a model name whose building would import and run a user's module, unless trusted."""
    if is_user_factory(name) and not trust_code:
        raise SlimError(
            f"the model {name!r} is made by importing {name.partition(':')[0]!r}, which runs that module's code; "
            "pass `trust_code` if you trust it"
        )


def _three_channels(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    in_channels = kwargs.pop("in_channels", 3)
    if "width" in kwargs:
        raise SlimError(f"{name} has no width multiplier; drop `width` for torchvision and timm models")
    if in_channels != 3:
        raise SlimError(
            f"{name} takes 3 input channels, the data has {in_channels}; use a zoo model "
            f"({', '.join(list_models())}) or your own factory for other channel counts"
        )
    return kwargs


def _torchvision(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    import torchvision

    kwargs = _three_channels(f"torchvision:{name}", kwargs)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise SlimError(f"unknown torchvision classifier {name!r}; available: {', '.join(sorted(available))}")
    if not pretrained:
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except (TypeError, ValueError) as exc:  # an argument the builder does not take, or a bad value
            raise SlimError(f"cannot build torchvision:{name} with {kwargs}: {exc}") from exc
    try:
        return torchvision.models.get_model(name, weights="DEFAULT")
    except ValueError as exc:
        raise SlimError(f"torchvision has no pretrained weights for {name}") from exc
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError
        raise SlimError(
            f"could not get torchvision's pretrained weights for {name} ({exc}); they download into "
            "$TORCH_HOME/hub/checkpoints on first use, so this needs internet once (or pass the file as `weights`)"
        ) from exc


def _timm_module() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise SlimError("timm models need the timm package: pip install 'slim2deploy[timm]'") from exc
    return timm


def _timm(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    timm = _timm_module()
    kwargs = _three_channels(f"timm:{name}", kwargs)
    if not timm.is_model(name.split(".", 1)[0]):
        close = timm.list_models(f"*{name.split('.', 1)[0]}*")[:10]
        raise SlimError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if not pretrained:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except (TypeError, ValueError) as exc:  # an argument the model does not take, or a bad value
            raise SlimError(f"cannot build timm:{name} with {kwargs}: {exc}") from exc
    try:
        return timm.create_model(name, pretrained=True)
    except RuntimeError as exc:
        raise SlimError(f"timm has no pretrained weights for {name} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - the hub client raises its own error types when offline
        raise SlimError(
            f"could not get timm's pretrained weights for {name} ({type(exc).__name__}: {exc}); they download "
            "into the Hugging Face cache on first use, so this needs internet once (or pass the file as `weights`)"
        ) from exc


def create_pretrained(name: str) -> nn.Module:
    """The library's own pretrained model (at its own class count); downloads on first use."""
    library, model_name = split_name(name)
    if library == "torchvision":
        return _torchvision(model_name, {}, pretrained=True)
    if library == "timm":
        return _timm(model_name, {}, pretrained=True)
    raise SlimError(
        f"`pretrained` is for torchvision:NAME and timm:NAME models, not {name!r}; give the file as `weights`"
    )


def pretrained_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation (mean, std) the library's pretrained weights expect."""
    library, model_name = split_name(name)
    if library == "timm":
        cfg = _timm_module().get_pretrained_cfg(model_name)
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    if library == "torchvision":
        import torchvision

        preset = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
        return tuple(preset.mean), tuple(preset.std)
    raise SlimError(f"{name} has no library normalisation; pass `mean` and `std`")


def _factory(ref: str) -> Callable[..., Any]:
    """The callable ``package.module:attr`` names (``attr`` may be dotted: a classmethod, a nested function)."""
    module_name, _, attr = ref.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SlimError(f"cannot import {module_name!r} for model {ref!r}: {exc}; is it on PYTHONPATH?") from exc
    for part in attr.split("."):
        found = getattr(found, part, None)
    if not attr or not callable(found):
        raise SlimError(
            f"{module_name!r} has no callable {attr!r}; expected 'package.module:factory' (a function, a class or "
            "'Class.classmethod')"
        )
    return found  # type: ignore[no-any-return]


def factory_kwargs(factory: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``offered`` that ``factory`` takes, by name or through ``**kwargs``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or extension callable without a signature: offer everything
        return dict(offered)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


def _user_factory(ref: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = _factory(ref)
    try:
        model = factory(**kwargs)
    except TypeError as exc:  # most often an argument the factory does not take
        raise SlimError(f"{ref} cannot be called with {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise SlimError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def factory_args(name: str, offered: dict[str, Any]) -> dict[str, Any]:
    """The build arguments to record for ``name``: a user factory gets those of ``offered`` it takes
    (``FACTORY_ARGS``), every other model all of them."""
    if not is_user_factory(name):
        return dict(offered)
    if "width" in offered:
        raise SlimError(f"{name} is your own factory: `width` is for zoo models; build the width you want in it")
    return factory_kwargs(_factory(name), {k: v for k, v in offered.items() if k in FACTORY_ARGS})


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name with freshly initialised weights (see the module docstring)."""
    library, model_name = split_name(name)
    if is_user_factory(name):
        return _user_factory(name, kwargs)
    refused = sorted(k for k, v in kwargs.items() if not _size_argument(k, v))
    if refused:
        raise SlimError(
            f"{name} is built here only with numbers and switches (sizes such as num_classes or width_mult), not "
            f"{', '.join(f'{k}={kwargs[k]!r:.40}' for k in refused)}: a string or a mapping can name a file or a "
            "URL, and pretrained downloads, which a name or a checkpoint must not make this tool do"
        )
    if library == "torchvision":
        return _torchvision(model_name, kwargs)
    if library == "timm":
        return _timm(model_name, kwargs)
    if name not in REGISTRY:
        raise SlimError(
            f"unknown model {name!r}; zoo models: {', '.join(list_models())}; "
            "or use 'torchvision:NAME', 'timm:NAME' or 'package.module:factory'"
        )
    unknown = sorted(set(kwargs) - set(ZOO_ARGS))
    if unknown:
        raise SlimError(f"unknown argument(s) {', '.join(unknown)} for {name}; zoo models take {', '.join(ZOO_ARGS)}")
    width = kwargs.get("width", 1.0)
    if not (isinstance(width, (int, float)) and 0 < width and math.isfinite(width)):
        raise SlimError(f"width must be a positive number, got {width!r}")
    for key in ("in_channels", "num_classes"):
        value = kwargs.get(key, 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise SlimError(f"{key} must be a positive integer, got {value!r}")
    if width > 1:
        # parameters grow with width squared: a wider model's size first, without allocating, so a
        # huge --width is one clear error. Not below 1 (no bigger than the architecture itself), as the
        # meta device's first use costs a process about two seconds (it imports torch._dynamo).
        with torch.device("meta"):
            params = count_params(REGISTRY[name](**kwargs))
        check_memory(params * 4, "`width`", width, f"{name} with its {params:,} float32 parameters")
    return REGISTRY[name](**kwargs)
