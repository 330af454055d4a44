"""One checkpoint format: architecture spec + optional pruning plan + state_dict + metadata.

A checkpoint is a dict of plain data and tensors saved with ``torch.save`` and read with
``torch.load(weights_only=True)``, so loading it never runs code from the file. The model is
rebuilt from its name in the zoo (``arch`` + ``arch_kwargs``); a pruned checkpoint also carries
the plan, which ``apply_plan`` replays on the freshly built model before the weights are loaded.

Two things run code and so need an explicit opt-in (``trust_code=True``; the CLI's ``--trust-code``):
a plain pickled ``nn.Module`` (``torch.save(model)``), and an ``arch`` that names a user
factory ``package.module:factory`` (importing it runs that module). A pickled module has no
architecture name, so what is made from it (pruned, fine-tuned) is saved as this format with the
module pickled inside, and loading that needs the same opt-in.
"""

from __future__ import annotations

import math
import pickle
import platform
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slim2deploy.base.environment import check_memory
from slim2deploy.base.environment import library_versions as library_versions_of
from slim2deploy.base.errors import NeedsTrust, SlimError
from slim2deploy.base.files import atomic_path, check_input_file

FORMAT = "slim2deploy.checkpoint/1"
_FORMAT_FAMILY = "slim2deploy.checkpoint/"
PICKLED_ARCH = "<pickled nn.Module>"
# torch's weights_only unpickler names the class or function it refused ("GLOBAL module.name");
# any other failure (an unknown opcode, a name that is not a dotted identifier) means a damaged file
_REFUSED_GLOBAL = re.compile(r"(GLOBAL|Unsupported class) [A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_SCALARS = (bool, int, float, str, type(None))


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
        payload: dict[str, Any] = {
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
        if self.module is not None:
            payload["module"] = self.module  # a trusted pickled model: it has no architecture name
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str = "checkpoint") -> Checkpoint:
        problems = spec_problems(payload)
        if problems:
            raise SlimError(
                f"{source} is a slim2deploy checkpoint but its contents are inconsistent: {'; '.join(problems[:3])}"
                " (was it edited by hand?); re-create it"
            )
        check_tensors(payload["state_dict"], source)
        return cls(
            arch=payload["arch"],
            arch_kwargs=dict(payload["arch_kwargs"]),
            input_shape=tuple(payload["input_shape"]),  # type: ignore[arg-type]
            num_classes=payload["num_classes"],
            state_dict=dict(payload["state_dict"]),
            meta=dict(payload.get("meta") or {}),
            plan=payload.get("plan"),
            train_state=payload.get("train_state"),
            module=payload.get("module"),
        )

    @property
    def is_pruned(self) -> bool:
        return self.plan is not None

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The per-channel (mean, std) the model's inputs are normalised with; None where not recorded."""
        if "mean" not in self.meta:
            return None
        return tuple(map(float, self.meta["mean"])), tuple(map(float, self.meta["std"]))


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _SCALARS) and not (isinstance(value, float) and not math.isfinite(value))


def spec_problems(payload: dict[str, Any]) -> list[str]:
    """What is wrong with a checkpoint dict, checked as data before anything is built from it."""
    problems = []
    missing = [k for k in ("arch", "arch_kwargs", "input_shape", "num_classes", "state_dict") if k not in payload]
    if missing:
        return [f"it lacks {', '.join(missing)}"]
    arch, kwargs, shape = payload["arch"], payload["arch_kwargs"], payload["input_shape"]
    if not isinstance(arch, str) or not arch:
        problems.append(f"arch must be a model name, got {arch!r}")
    elif arch == PICKLED_ARCH and not isinstance(payload.get("module"), nn.Module):
        problems.append("it names a pickled module but holds none")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and _plain(v) for k, v in kwargs.items()):
        problems.append(f"arch_kwargs must map names to plain values, got {kwargs!r}"[:200])
    shape_ok = isinstance(shape, (list, tuple)) and len(shape) == 3
    if not (shape_ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        problems.append(f"input_shape must be three positive integers C, H, W, got {shape!r}"[:200])
    n = payload["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"num_classes must be a positive integer, got {n!r}")
    sd = payload["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        problems.append("state_dict must map parameter names to tensors")
    for key in ("meta", "plan", "train_state"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            problems.append(f"{key} must be a dict or absent, got {type(payload[key]).__name__}")
    plan = payload.get("plan")
    planned = plan.get("input_shape") if isinstance(plan, dict) else list(shape)
    if not problems and not (isinstance(planned, list | tuple) and list(planned) == list(shape)):
        # surgery replays the plan on an input of the plan's shape: another one than the model's is an edit
        problems.append(f"plan.input_shape {planned!r} differs from input_shape {list(shape)}"[:200])
    if isinstance(payload.get("meta"), dict) and not problems:
        problems += _stats_problems(payload["meta"], shape[0])
        classes = payload["meta"].get("classes")
        # names are matched to outputs by position; data may lack the last classes, so fewer is fine
        if isinstance(classes, (list, tuple)) and len(classes) > n:
            problems.append(f"meta.classes names {len(classes)} classes but num_classes is {n}")
    return problems


def _stats_problems(meta: dict[str, Any], channels: int) -> list[str]:
    """The input normalisation: both or neither of mean and std, one value or one per input channel."""
    present = [k for k in ("mean", "std") if k in meta]
    if len(present) == 1:
        return [f"meta has {present[0]} but not {'std' if present[0] == 'mean' else 'mean'}"]
    problems = []
    for key in present:
        values = meta[key]
        numbers = isinstance(values, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
        if not numbers or len(values) not in (1, channels):
            counts = "1" if channels == 1 else f"1 or {channels}"
            problems.append(
                f"meta.{key} must be a list of {counts} finite numbers (one, or one per channel of input_shape), "
                f"got {values!r}"[:200]
            )
        elif key == "std" and min(values) <= 0:
            problems.append(f"meta.std must be positive, got {values!r}"[:200])
    return problems


def tensor_fault(state: dict[str, torch.Tensor]) -> str | None:
    """What makes weights unusable, if anything: NaN or infinity, or a BatchNorm running_var below zero;
    and, checked first because the others would allocate the tensor's full extent, a tensor that is not
    dense or whose storage is smaller than its elements (an expanded view: 1e11 elements over one stored
    value would be a 400 GB finiteness check). No model saves such weights.

    Shared by the checkpoint loader and the training loop, so a tensor a diverged run would save is
    exactly one the loader would refuse.
    """
    for name, tensor in state.items():
        if tensor.layout != torch.strided:
            return f"tensor {name!r} is stored as {tensor.layout}, not as a dense tensor as weights are"
        stored = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if tensor.numel() > stored:
            return (
                f"tensor {name!r} {tuple(tensor.shape)} repeats {stored:,} stored values over {tensor.numel():,} "
                "elements (an expanded view, stride 0), which no saved model holds"
            )
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor[~finite]
            kinds = " and ".join(k for k, n in (("NaN", bad.isnan().sum()), ("infinity", bad.isinf().sum())) if n)
            return f"tensor {name!r} {tuple(tensor.shape)} holds {kinds} ({bad.numel()} of {tensor.numel()} values)"
        if name.endswith("running_var") and bool((tensor < 0).any()):
            return f"tensor {name!r} {tuple(tensor.shape)} has negative values, which a BatchNorm variance cannot have"
    return None


def check_tensors(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse damaged weights (see ``tensor_fault``): they give silent garbage."""
    fault = tensor_fault(state)
    if fault is not None:
        raise SlimError(
            f"{source}: {fault}; the weights are damaged (edited, or saved from a diverged run): "
            "re-create the file or use an earlier one"
        )


def _kind(tensor: torch.Tensor) -> str:
    if tensor.is_floating_point():
        return "floating"
    if tensor.is_complex():
        return "complex"
    return "bool" if tensor.dtype == torch.bool else "integer"


def dtype_problem(name: str, own: torch.Tensor, loaded: torch.Tensor) -> str | None:
    """Why ``loaded`` cannot stand for the model's ``own`` tensor ``name``, or None when it can.

    load_state_dict casts silently, so integer weights would load as whole numbers (every gamma of
    an int64 file rounds to 0) and give an all-zero model with no error. A float of another width
    (a half-precision file into a float32 model) is a faithful cast and is allowed.
    """
    if _kind(own) == _kind(loaded):
        return None
    found, wanted = (str(t.dtype).removeprefix("torch.") for t in (loaded, own))
    return f"{name} is {found} but the model's is {wanted}"


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
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's C++ writer reports a full disk or a size limit this way
            raise SlimError(
                f"could not write {path}: the write failed (is the disk full?); nothing was changed"
            ) from exc
    return Path(path)


def _pickled_module(path: Path, trust_code: bool, wanted: str) -> Any:
    if not trust_code:
        raise NeedsTrust(path, wanted)
    warnings.warn(f"unpickling {path} with weights_only=False: this runs any code it contains", stacklevel=4)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling runs the file's code, which may raise anything
        raise SlimError(f"{path} could not be unpickled ({first_line(exc)}); is the code it needs importable?") from exc


# what torch.load raises for a file that is damaged or not a torch file at all
_DAMAGED = (
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    ValueError,
    OSError,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    OverflowError,
)


def load_torch_file(path: Path, what: str, *, trust_code: bool = False, wanted: str = "pickled Python objects") -> Any:
    """``torch.load`` of a file a user gave, without running its code unless ``trust_code``.

    Only a file whose pickle names a class or function to import (a pickled object, refused by the
    weights-only reader) needs the opt-in, and only it gets the advice to pass it (``NeedsTrust``,
    ``wanted`` says what it holds); anything else that cannot be read (random bytes, a text file, a
    truncated file) is reported as damaged, with or without the opt-in.
    """
    check_input_file(path, what)
    # torch files are stored uncompressed: the file's size is about what loading it takes
    check_memory(path.stat().st_size, f"the {what}", path, "loading it", advice="it cannot be read on this machine")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _REFUSED_GLOBAL.search(str(exc)):
            raise SlimError(
                f"{path} is corrupt or not a torch {what} (its data cannot be unpickled); re-create or re-download it"
            ) from exc
    except _DAMAGED as exc:
        raise SlimError(
            f"{path} is truncated or not a torch {what} ({first_line(exc)}); re-create or re-download it"
        ) from exc
    return _pickled_module(path, trust_code, wanted)


def load_checkpoint(path: str | Path, *, trust_code: bool = False) -> Checkpoint:
    """Read a checkpoint safely; see the module docstring for what needs ``trust_code``."""
    path = Path(path)
    if not path.exists():
        raise SlimError(f"no such checkpoint: {path}")
    if path.is_dir():
        raise SlimError(f"{path} is a directory, not a checkpoint file")
    wanted = "pickled Python objects (for example a whole nn.Module saved with torch.save(model))"
    obj = load_torch_file(path, "checkpoint", trust_code=trust_code, wanted=wanted)
    if isinstance(obj, nn.Module):
        check_tensors(obj.state_dict(), str(path))
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
            f"{path} is a bare state_dict without an architecture; make a checkpoint of it first with "
            "'slim2deploy import', giving its architecture and input shape (README, quick start 2), or start "
            "training from it with 'slim2deploy train', giving its architecture and the file as its weights"
        )
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"].startswith(_FORMAT_FAMILY):
        raise SlimError(
            f"{path} is a slim2deploy checkpoint in format {obj['format']!r}, newer than the {FORMAT!r} this "
            "version reads; upgrade slim2deploy to read it"
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
        module=inner.cpu() if arch == PICKLED_ARCH else None,
    )


def with_input_shape(ckpt: Checkpoint, shape: tuple[int, int, int] | None, source: str) -> Checkpoint:
    """Give a pickled module the input shape it does not record (``input_shape``); check any other.

    The class count of a pickled module is read from its output on a zero input of that shape.
    """
    known = all(ckpt.input_shape)
    if shape is None:
        if not known:
            raise SlimError(
                f"{source} is a pickled nn.Module, which records no input shape; pass one as `input_shape` "
                "(channels, height, width, e.g. 3,32,32)"
            )
        return ckpt
    if known:
        if tuple(shape) != tuple(ckpt.input_shape):
            raise SlimError(
                f"`input_shape` {','.join(map(str, shape))} differs from the {','.join(map(str, ckpt.input_shape))} "
                f"that {source} records; drop `input_shape`"
            )
        return ckpt
    assert ckpt.module is not None  # only a bare pickled module lacks a shape
    was_training = ckpt.module.training
    try:
        with torch.no_grad():
            out = ckpt.module.eval()(torch.zeros(1, *shape))
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything on a wrong shape
        raise SlimError(
            f"{source} does not run on an input of shape {shape} ({first_line(exc)}); check `input_shape`"
        ) from exc
    finally:
        ckpt.module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SlimError(f"{source} must return N x classes logits, got {getattr(out, 'shape', type(out).__name__)}")
    ckpt.input_shape, ckpt.num_classes = (shape[0], shape[1], shape[2]), int(out.shape[1])
    return ckpt
