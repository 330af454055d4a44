"""One checkpoint format: architecture spec + optional pruning plan + state_dict + metadata.

A checkpoint is a dict of plain data and tensors saved with ``torch.save`` and read with
``torch.load(weights_only=True)``, so loading it never runs code from the file. The model is
rebuilt from its name in the zoo (``arch`` + ``arch_kwargs``); a pruned checkpoint also carries
the plan, which ``apply_plan`` replays on the freshly built model before the weights are loaded.

Two things run code and so need an explicit opt-in (``trust_code=True``, ``--trust-pickle``):
a plain pickled ``nn.Module`` (``torch.save(model)``), and an ``arch`` that names a user
factory ``package.module:factory`` (importing it runs that module).
"""

from __future__ import annotations

import pickle
import platform
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slim2deploy.base.environment import library_versions as library_versions_of
from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_path

FORMAT = "slim2deploy.checkpoint/1"
PICKLED_ARCH = "<pickled nn.Module>"


@dataclass
class Checkpoint:
    arch: str
    arch_kwargs: dict[str, Any]
    input_shape: tuple[int, int, int]
    num_classes: int
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    train_state: dict[str, Any] | None = None
    module: nn.Module | None = field(default=None, repr=False)  # only for trusted pickled modules

    def to_payload(self) -> dict[str, Any]:
        if self.module is not None:
            raise SlimError(
                "this model came from a pickled nn.Module and has no architecture spec, so it cannot be "
                "saved in the slim2deploy format; rebuild it from the zoo or a 'package.module:factory'"
            )
        return {
            "format": FORMAT,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "meta": self.meta,
            "plan": self.plan,
            "train_state": self.train_state,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str = "checkpoint") -> Checkpoint:
        missing = [k for k in ("arch", "arch_kwargs", "input_shape", "num_classes", "state_dict") if k not in payload]
        if missing:
            raise SlimError(f"{source} is a slim2deploy checkpoint but lacks {', '.join(missing)}; it is damaged")
        return cls(
            arch=str(payload["arch"]),
            arch_kwargs=dict(payload["arch_kwargs"]),
            input_shape=tuple(int(v) for v in payload["input_shape"]),  # type: ignore[arg-type]
            num_classes=int(payload["num_classes"]),
            state_dict=dict(payload["state_dict"]),
            meta=dict(payload.get("meta") or {}),
            plan=payload.get("plan"),
            train_state=payload.get("train_state"),
        )

    @property
    def is_pruned(self) -> bool:
        return self.plan is not None


def library_versions() -> dict[str, str]:
    versions = library_versions_of("torch", "numpy", "slim2deploy")
    return {
        "python": platform.python_version(),
        **{k: v for k, v in versions.items() if v is not None},
        "slim2deploy": versions["slim2deploy"] or "source",  # running from a source tree without installation
    }


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically (temp file + rename): an interrupted save leaves the old file."""
    payload = ckpt.to_payload()
    payload["meta"] = {**payload["meta"], "versions": library_versions()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _pickled_module(path: Path, trust_pickle: bool) -> Any:
    if not trust_pickle:
        raise SlimError(
            f"{path} contains pickled Python objects (for example a whole nn.Module saved with "
            "torch.save(model)); unpickling them can run arbitrary code, so it is refused. If you trust "
            "the file's origin, pass --trust-pickle (trust_pickle=True); better, save a state_dict and "
            "create a slim2deploy checkpoint from it"
        )
    warnings.warn(f"unpickling {path} with weights_only=False: this runs any code it contains", stacklevel=3)
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint safely; see the module docstring for what needs ``trust_pickle``."""
    path = Path(path)
    if not path.exists():
        raise SlimError(f"no such checkpoint: {path}")
    if path.is_dir():
        raise SlimError(f"{path} is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise SlimError(f"{path} is not a readable torch checkpoint ({first_line(exc)})") from exc
        obj = _pickled_module(path, trust_pickle)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as exc:
        raise SlimError(
            f"{path} is truncated or not a torch checkpoint ({first_line(exc)}); re-create or re-download it"
        ) from exc
    if isinstance(obj, nn.Module):
        return Checkpoint(
            arch=PICKLED_ARCH,
            arch_kwargs={},
            input_shape=(0, 0, 0),
            num_classes=0,
            state_dict=obj.state_dict(),
            meta={"source": str(path)},
            module=obj,
        )
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return Checkpoint.from_payload(obj, str(path))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SlimError(
            f"{path} is a bare state_dict without an architecture; build the model and save it with "
            "slim2deploy.Checkpoint(arch=..., arch_kwargs=..., ...) or train it with 'slim2deploy train'"
        )
    raise SlimError(f"{path} is a torch file but not a slim2deploy checkpoint (found {type(obj).__name__})")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def checkpoint_for(
    model: nn.Module,
    arch: str,
    arch_kwargs: dict[str, Any],
    input_shape: tuple[int, int, int],
    num_classes: int,
    meta: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
) -> Checkpoint:
    """A checkpoint of ``model`` (unwrapped from DDP if needed)."""
    inner = getattr(model, "module", model)
    return Checkpoint(
        arch,
        dict(arch_kwargs),
        (int(input_shape[0]), int(input_shape[1]), int(input_shape[2])),
        num_classes,
        {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()},
        dict(meta or {}),
        plan,
    )
