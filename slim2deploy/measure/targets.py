"""Deployment targets: a runtime + device + batch + precision that latency is measured on.

One concept for profiling (``slim2deploy profile``), budgets (``--speedup``) and verification:

- ``ort-cpu``: ONNX Runtime on the CPU (``threads``), fp32 or fp16 graphs;
- ``torch-cpu``: a slim2deploy checkpoint run by torch on the CPU;
- ``torch-cuda``: torch on a GPU, channels-last, CUDA graphs;
- ``torch-cuda-compiled``: torch.compile (inductor) on a GPU;
- ``trt``: TensorRT engines.

Every target times whole models through the runner interface (``runtime.runners``), interleaved
(``measure.benchmark.measure``). Targets that run ONNX also time single layers for a latency
table (``layer_ms``), built as standalone ONNX graphs. Measured layer cells are cached on disk,
keyed by target, device, library versions, batch, precision and the layer's signature and widths.

Nothing here imports torch.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tqdm import tqdm

from slim2deploy.base.environment import cpu_model, nvidia_smi, package_version
from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_text, check_output, temporary_folder
from slim2deploy.base.formats import read_json
from slim2deploy.deploy.layer_onnx import write_layer_onnx
from slim2deploy.measure.benchmark import measure
from slim2deploy.prune.latency import LayerSpec
from slim2deploy.runtime.base import Runner
from slim2deploy.runtime.registry import open_runner

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slim2deploy" / "latency"
PRECISIONS = ("fp32", "fp16")
CELLS_AT_ONCE = 16  # layer cells timed interleaved together (and saved to the cache) at a time
# how cells and models are timed; part of the cache key, so cells timed another way are not reused
# (2: ONNX Runtime thread pools without spinning, see runtime.ort.ort_session)
TIMING_METHOD = 2


class Target(abc.ABC):
    """Where latency is measured. ``artifact`` is what a model must be turned into to run here."""

    name: ClassVar[str]
    artifact: ClassVar[str]  # "onnx" or "checkpoint"

    def __init__(self, batch: int = 64, precision: str = "fp32", threads: int | None = None) -> None:
        if isinstance(batch, bool) or not (isinstance(batch, int) and batch >= 1):
            raise SlimError(f"the target batch must be a positive integer, got {batch!r}")
        if precision not in PRECISIONS:
            raise SlimError(f"target precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.batch = batch
        self.precision = precision
        self.threads = threads

    def runner_options(self) -> dict[str, Any]:
        """``open_runner``'s keyword arguments for this target's artifacts (what a benchmark passes on)."""
        raise SlimError(f"target {self.name} has no runner in this version")

    def open(self, path: str | os.PathLike[str]) -> Runner:
        """A runner for one model artifact on this target."""
        return open_runner(path, **self.runner_options())

    def device(self) -> str:
        return cpu_model()

    def versions(self) -> dict[str, str | None]:
        return {}

    def key(self) -> dict[str, Any]:
        """Everything a measurement depends on besides the model: what the cache is keyed by."""
        return {
            "target": self.name,
            "device": self.device(),
            "versions": self.versions(),
            "batch": self.batch,
            "precision": self.precision,
            "threads": self.threads or 0,
            "timing": TIMING_METHOD,
        }

    def describe(self) -> str:
        return f"{self.name} batch {self.batch} {self.precision}"

    def latencies(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        iterations: int = 60,
        rounds: int = 6,
        warmup_s: float = 0.2,
    ) -> list[float]:
        """Latency (ms) of each model at the target's batch, measured interleaved (see ``time_runners``)."""
        return self.time_runners([self.open(p) for p in paths], iterations=iterations, rounds=rounds, warmup_s=warmup_s)

    def time_runners(
        self, runners: Sequence[Runner], *, iterations: int = 60, rounds: int = 6, warmup_s: float = 0.2
    ) -> list[float]:
        """The lowest per-round median (ms) of each runner, interleaved: on a shared machine a round
        that lost the CPU to another process says something about the machine, not the model."""
        try:
            for r in runners:
                r.activate()
            results = measure(runners, [self.batch], warmup_s=warmup_s, iterations=iterations, rounds=rounds)
        finally:
            for r in runners:
                r.deactivate()
        return [min(res[0][0].round_medians_ms) for res in results]

    def layer_ms(self, cells: Sequence[tuple[LayerSpec, int, int]]) -> list[float]:
        """Latency (ms) of each ``(layer, c_in, c_out)`` as a standalone layer at the target's batch."""
        raise SlimError(
            f"target {self.name} cannot time single layers; profile on another target and give the table as `table`"
        )


class OrtCpuTarget(Target):
    name = "ort-cpu"
    artifact = "onnx"

    def runner_options(self) -> dict[str, Any]:
        return {"backend": "onnx", "device": "cpu", "threads": self.threads}

    def versions(self) -> dict[str, str | None]:
        return {"onnxruntime": package_version("onnxruntime"), "onnx": package_version("onnx")}

    def layer_ms(self, cells: Sequence[tuple[LayerSpec, int, int]]) -> list[float]:
        """Cells of one layer are timed interleaved, so load drifting meanwhile hits all of them alike."""
        out: list[float] = []
        with temporary_folder("slim2deploy-probe-") as tmp:
            paths = []
            for i, (layer, ci, co) in enumerate(cells):
                paths.append(write_layer_onnx(layer, ci, co, Path(tmp) / f"probe{i}.onnx", self.precision))
            for start in range(0, len(paths), CELLS_AT_ONCE):
                out += self.latencies(paths[start : start + CELLS_AT_ONCE], iterations=15, rounds=3, warmup_s=0.0)
        return out


class TorchTarget(Target):
    """torch on the CPU or a GPU, checkpoints in, Conv+BN folded at load as every deployment runtime does."""

    artifact = "checkpoint"
    torch_device: ClassVar[str] = "cpu"
    mode: ClassVar[str] = "folded"
    cuda_graph: ClassVar[bool] = False

    def runner_options(self) -> dict[str, Any]:
        return {
            "backend": "torch",
            "device": self.torch_device,
            "precision": self.precision,
            "mode": self.mode,
            "channels_last": self.torch_device == "cuda",
            "cuda_graph": self.cuda_graph,
            "threads": self.threads,
        }

    def versions(self) -> dict[str, str | None]:
        return {"torch": package_version("torch")}

    def layer_ms(self, cells: Sequence[tuple[LayerSpec, int, int]]) -> list[float]:
        """Each cell as a small in-memory module (conv or linear + ReLU) on the torch runner."""
        import torch  # noqa: F401 - fails early, with torch's own message, where torch is missing
        from torch import nn

        runners = []
        for layer, ci, co in cells:
            module: nn.Module
            if layer.op == "conv":
                groups = ci if layer.depthwise else 1
                conv = nn.Conv2d(
                    ci,
                    ci if layer.depthwise else co,
                    (layer.kernel[0], layer.kernel[1]),
                    (layer.stride[0], layer.stride[1]),
                    (layer.padding[0], layer.padding[1]),
                    (layer.dilation[0], layer.dilation[1]),
                    groups=groups,
                )
                module, shape = nn.Sequential(conv, nn.ReLU()), (ci, *layer.in_hw)
            else:
                module, shape = nn.Sequential(nn.Linear(ci, co), nn.ReLU()), (ci,)
            runners.append(
                open_runner(
                    module.eval(),
                    backend="torch",
                    device=self.torch_device,
                    precision=self.precision,
                    mode=self.mode,
                    channels_last=self.torch_device == "cuda" and layer.op == "conv",
                    cuda_graph=self.cuda_graph,
                    threads=self.threads,
                    input_shape=shape,
                )
            )
        out: list[float] = []
        for start in range(0, len(runners), CELLS_AT_ONCE):
            out += self.time_runners(runners[start : start + CELLS_AT_ONCE], iterations=15, rounds=3, warmup_s=0.0)
        return out


class TorchCpuTarget(TorchTarget):
    name = "torch-cpu"


class TorchCudaTarget(TorchTarget):
    name = "torch-cuda"
    torch_device = "cuda"
    cuda_graph = True

    def device(self) -> str:
        return nvidia_smi().get("gpu_name") or "no GPU"


class TorchCudaCompiledTarget(TorchCudaTarget):
    name = "torch-cuda-compiled"
    mode = "compiled"


class TrtTarget(Target):
    name = "trt"
    artifact = "engine"

    REFUSAL = (
        "target trt measures TensorRT engines, which this version builds only in 'slim2deploy build'; "
        "prune to a latency target on ort-cpu or torch-cuda"
    )

    def runner_options(self) -> dict[str, Any]:
        raise SlimError(self.REFUSAL)

    def layer_ms(self, cells: Sequence[tuple[LayerSpec, int, int]]) -> list[float]:
        # the generic advice (profile elsewhere, pass --table) would end at open() all the same
        raise SlimError(self.REFUSAL)


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (OrtCpuTarget, TorchCpuTarget, TorchCudaTarget, TorchCudaCompiledTarget, TrtTarget)
}


def make_target(name: str, batch: int = 64, precision: str = "fp32", threads: int | None = None) -> Target:
    if name not in TARGETS:
        raise SlimError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name](batch=batch, precision=precision, threads=threads)


class CellCache:
    """Measured layer cells on disk: one JSON file per target key, cells keyed by signature and widths.

    Only a cache, so nothing in it stops a run: a file that cannot be read is ignored, a cell that is not
    a finite positive number of milliseconds (an edited or damaged one) is dropped and timed again, and a
    folder that cannot be written (a read-only home) means timing without keeping: each with a note.
    """

    def __init__(
        self,
        target: Target,
        directory: str | os.PathLike[str] | None = DEFAULT_CACHE,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.key = target.key()
        self.note = note or (lambda text: print(f"note: {text}", file=sys.stderr))
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = None if directory is None else Path(directory) / f"{target.name}-{digest}.json"
        self.cells: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            self.cells = self._read(self.path)
        if directory is not None:
            try:
                check_output(directory, "the cell cache", folder=True)
            except SlimError as exc:
                self.note(
                    f"{exc}; timing without keeping the cells (give a writable cache folder, or turn the cache off)"
                )
                self.path = None

    def _read(self, path: Path) -> dict[str, float]:
        try:
            cells = read_json(path, "cell cache", advice="ignoring it, the cells are timed again")["cells"]
            if not isinstance(cells, dict):
                raise SlimError(f"the cell cache {path} holds no cells; ignoring it, the cells are timed again")
        except (SlimError, KeyError, TypeError) as exc:
            self.note(str(exc) if isinstance(exc, SlimError) else f"the cell cache {path} is malformed; ignoring it")
            return {}
        good = {str(k): float(v) for k, v in cells.items() if _positive_ms(v)}
        if len(good) < len(cells):
            self.note(f"{len(cells) - len(good)} cells in {path} are not positive milliseconds; they are timed again")
        return good

    @staticmethod
    def cell_key(layer: LayerSpec, ci: int, co: int) -> str:
        return f"{layer.signature()} {ci},{co}"

    def measure(
        self,
        target: Target,
        cells: Sequence[tuple[LayerSpec, int, int]],
        log: Callable[[str], None] | None = None,
    ) -> int:
        """Fill ``cells`` into their layers, timing only what the cache does not know; returns how many were timed."""
        todo = [c for c in cells if self.cell_key(*c) not in self.cells]
        unique = list({self.cell_key(*c): c for c in todo}.values())
        if unique:
            if log:
                log(f"timing {len(unique)} layer cells on {target.describe()} ({len(cells) - len(todo)} cached)")
            with tqdm(total=len(unique), desc="profiling", unit="cell", disable=log is None, leave=False) as bar:
                for start in range(0, len(unique), CELLS_AT_ONCE):  # each chunk timed interleaved
                    chunk = unique[start : start + CELLS_AT_ONCE]
                    for cell, ms in zip(chunk, target.layer_ms(chunk), strict=True):
                        self.cells[self.cell_key(*cell)] = ms
                    self.save()  # an interrupted profile keeps what it measured
                    bar.update(len(chunk))
        for layer, ci, co in cells:
            layer.record(ci, co, self.cells[self.cell_key(layer, ci, co)])
        return len(unique)

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"key": self.key, "cells": self.cells}, indent=0))
        except (OSError, SlimError) as exc:  # the cells are in this run's table all the same
            self.note(f"cannot keep the cells in {self.path} ({exc}); going on without the cache")
            self.path = None


def _positive_ms(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
