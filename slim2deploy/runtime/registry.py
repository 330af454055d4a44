"""Which runtime runs what: file suffixes and devices -> a runner class, imported only when used.

Adding a runtime is one runner module plus one entry in RUNTIMES. The runner class is named
by a dotted path and imported with importlib on first use, so opening an ``.onnx`` file never
imports torch or TensorRT.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slim2deploy.base.errors import SlimError
from slim2deploy.runtime.base import Runner

# choices of the torch runner's options, here so a command line can offer them without importing torch
TORCH_MODES = ("eager", "folded", "compiled")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Runtime:
    kind: str
    runner: str  # "package.module:Class"
    suffixes: tuple[str, ...]
    what: str  # how the files are described in messages
    # the device a caller asks for (bench/latency.py --backend) -> the device this runtime is given
    devices: dict[str, str]

    def runner_class(self) -> type[Runner]:
        module, _, name = self.runner.partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Runner), self.runner
        return cls


RUNTIMES = {
    r.kind: r
    for r in (
        Runtime(
            "onnx",
            "slim2deploy.runtime.ort:OrtRunner",
            (".onnx",),
            ".onnx (ONNX Runtime)",
            {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "tensorrt": "tensorrt"},
        ),
        Runtime(
            "tensorrt",
            "slim2deploy.runtime.trt:TrtRunner",
            (".engine", ".plan", ".trt"),
            ".engine/.plan/.trt (TensorRT)",
            {"auto": "cuda", "cuda": "cuda", "tensorrt": "cuda"},
        ),
        Runtime(
            "torch",
            "slim2deploy.runtime.torch:TorchRunner",
            (".pt", ".pth", ".ckpt"),
            ".pt/.pth/.ckpt (slim2deploy checkpoint on torch)",
            {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"},
        ),
    )
}


def device_choices() -> list[str]:
    """Every device some runtime accepts, in a stable order (``bench/latency.py --backend``)."""
    seen: dict[str, None] = {}
    for r in RUNTIMES.values():
        seen.update(dict.fromkeys(r.devices))
    return list(seen)


def runner_kind(path: str | os.PathLike[str]) -> str:
    """The runtime kind (a key of RUNTIMES) for a file, by its suffix."""
    suffix = Path(path).suffix.lower()
    for r in RUNTIMES.values():
        if suffix in r.suffixes:
            return r.kind
    raise SlimError(f"cannot tell how to run {path}: expected {', or '.join(r.what for r in RUNTIMES.values())}")


def open_runner(source: Any, *, backend: str | None = None, device: str = "auto", **options: Any) -> Runner:
    """A runner for ``source``: a file (kind by suffix unless ``backend`` names one) or an in-memory model.

    ``options`` are the runner's constructor arguments (threads, opt_level, precision, mode,
    channels_last, cuda_graph, compile_mode, trust_code, check_manifest, input_shape, ...);
    those a runtime does not take are ignored, so one set of options serves mixed files.
    """
    if backend is None:
        if not isinstance(source, str | os.PathLike):
            raise SlimError("an in-memory model needs backend= (e.g. backend='torch')")
        backend = runner_kind(source)
    runtime = RUNTIMES.get(backend)
    if runtime is None:
        raise SlimError(f"unknown runtime {backend!r}; use one of {', '.join(RUNTIMES)}")
    if device not in runtime.devices:
        raise SlimError(
            f"{source} runs on {runtime.kind}, which takes device {', '.join(runtime.devices)}, "
            f"not {device!r}" + ("; it runs on a GPU only" if "cpu" not in runtime.devices else "")
        )
    cls = runtime.runner_class()
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {"device": runtime.devices[device], **options}.items() if k in accepted}
    return cls(source, **kwargs)
