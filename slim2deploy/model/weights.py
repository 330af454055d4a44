"""Start from weights the user already has: a state_dict file or a library's pretrained weights.

- ``--weights PATH``: a state_dict in a ``.pt``/``.pth`` file (read with ``torch.load(weights_only=True)``;
  a pickled ``nn.Module`` only with ``trust_code``) or a ``.safetensors`` file. Common wrappers
  (``{"state_dict": ...}``, ``{"model": ...}``, a slim2deploy checkpoint) and DDP's ``module.`` prefix
  are unwrapped.
- ``--pretrained``: the library's own loading code (torchvision's weights enum, timm's
  ``pretrained=True``), which downloads into the library's cache on first use.

The weights are loaded into the model built for the target class count. Tensors whose shape
differs only because the class count differs (the classifier) keep their fresh initialisation;
any other shape difference is an error. Missing and unexpected keys are reported, and a file of
which nothing matches is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import check_input_file
from slim2deploy.model.checkpoint import check_tensors, dtype_problem, load_torch_file
from slim2deploy.model.zoo import create_model, create_pretrained, split_name

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


@dataclass
class WeightsReport:
    """What loading a state_dict into a model did, key by key."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # the classifier, for a new class count

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "reinitialised": self.reinitialised,
        }

    def summary(self) -> str:
        lines = [f"weights from {self.source}: {self.loaded} tensors loaded"]
        for what, keys in (
            ("re-initialised for the new class count", self.reinitialised),
            ("missing from the file (left as initialised)", self.missing),
            ("unexpected in the file (ignored)", self.unexpected),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {len(keys)} {what}: {shown}")
        return "\n".join(lines)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, nn.Module):
            return dict(obj.state_dict())
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = {str(k): v for k, v in obj.items()}
            if all(k.startswith("module.") for k in state):
                state = {k[len("module.") :]: v for k, v in state.items()}
            return state
        inner = [k for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), (dict, nn.Module))]
        if not inner:
            break
        obj = obj[inner[0]]
    found = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise SlimError(
        f"{path} holds no state_dict (a dict of tensor names to tensors); found {found}. "
        "Save the weights with torch.save(model.state_dict(), path) or safetensors"
    )


def read_state_dict(path: str | Path, *, trust_code: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see the module docstring); never runs code without ``trust_code``."""
    path = check_input_file(path, "weights file")
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise SlimError(
                "reading .safetensors needs the safetensors package: pip install 'slim2deploy[timm]'"
            ) from exc
        try:
            state = dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise SlimError(f"{path} is not a readable .safetensors file ({exc})") from exc
        check_tensors(state, str(path))
        return state
    wanted = "pickled Python objects besides tensors (re-save it with torch.save(model.state_dict(), path))"
    state = _unwrap(load_torch_file(path, "weights file", trust_code=trust_code, wanted=wanted), path)
    check_tensors(state, str(path))
    return state


def _is_safetensors(path: Path) -> bool:
    """A .safetensors file by its name (any case) or its content: an 8-byte little-endian header length that
    fits the file, then the JSON header's ``{``, as the format defines (a torch file starts otherwise)."""
    if path.suffix.lower() == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def classifier_keys(arch: str, kwargs: dict[str, Any]) -> set[str]:
    """Keys whose shape depends on the class count: built twice on the meta device, compared."""
    n = int(kwargs.get("num_classes", 1000))
    try:
        with torch.device("meta"):
            a = create_model(arch, **{**kwargs, "num_classes": n}).state_dict()
            b = create_model(arch, **{**kwargs, "num_classes": n + 1}).state_dict()
    except (TypeError, RuntimeError, NotImplementedError):
        return set()  # a factory without a num_classes argument: no tensor may change shape
    return {k for k in a if k in b and a[k].shape != b[k].shape}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], head: set[str], source: str) -> WeightsReport:
    """Copy the tensors of ``state`` that fit ``model``; the ``head`` keys may differ in shape."""
    own = model.state_dict()
    fitting, report = {}, WeightsReport(source, 0)
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif (problem := dtype_problem(key, own[key], value)) is not None:
            raise SlimError(f"{source}: {problem}; the weights are damaged or of another kind: re-create the file")
        elif own[key].shape == value.shape:
            fitting[key] = value
        elif key in head:
            report.reinitialised.append(key)
        else:
            raise SlimError(
                f"{source}: {key} has shape {tuple(value.shape)} but the model's is {tuple(own[key].shape)}; "
                "the weights belong to another variant of the architecture (check `arch`)"
            )
    report.missing = sorted(k for k in own if k not in state)
    if not fitting:
        raise SlimError(
            f"none of the {len(state)} tensors in {source} fit the model (its keys look like "
            f"{', '.join(sorted(own)[:3])}; the file's like {', '.join(sorted(state)[:3])}); check `arch`"
        )
    model.load_state_dict(fitting, strict=False)
    report.loaded = len(fitting)
    return report


def _count_from_head(state: dict[str, torch.Tensor], head: set[str]) -> int | None:
    counts = {int(state[k].shape[0]) for k in head if k in state and state[k].dim() >= 1}
    return counts.pop() if len(counts) == 1 else None


def build_with_weights(
    arch: str,
    arch_kwargs: dict[str, Any],
    *,
    weights: str | None = None,
    pretrained: bool = False,
    trust_code: bool = False,
) -> tuple[nn.Module, dict[str, Any], WeightsReport | None]:
    """``create_model(arch, **arch_kwargs)`` with ``weights`` (a file) or the library's pretrained ones.

    Without ``num_classes`` in ``arch_kwargs`` the class count is the one of the weights' classifier.
    Returns the model, the kwargs it was built with (for the checkpoint) and what loading did.
    """
    if weights and pretrained:
        raise SlimError("give either `weights` or `pretrained`, not both")
    kwargs = dict(arch_kwargs)
    if not (weights or pretrained):
        return create_model(arch, **kwargs), kwargs, None
    if weights:
        state, source = read_state_dict(weights, trust_code=trust_code), str(weights)
    else:
        library, _ = split_name(arch)
        state, source = create_pretrained(arch).state_dict(), f"{library} pretrained weights of {arch}"
    head = classifier_keys(arch, kwargs)
    if "num_classes" not in kwargs:
        found = _count_from_head(state, head)
        if found is not None:
            kwargs["num_classes"] = found
    model = create_model(arch, **kwargs)
    return model, kwargs, load_into(model, state, head, source)
