"""The runner interface every runtime implements, in the manner of Polygraphy.

A runner is created cheaply (it only remembers its options); ``activate()`` does the heavy
work (create the session, load the checkpoint, deserialize the engine), ``infer()`` takes a
host array (or ``{input_name: array}``) and returns the first output as a host array, and
``deactivate()`` frees everything. ``infer`` returning a host array means the result is
complete: on a GPU the copy back synchronises, so a caller's wall clock measures end to end.
Backends that can time the device work alone put it in ``last_compute_ms``.

Callers (the benchmark, the parity and agreement checks) use only this interface: what a
backend can tell about itself (costs, memory, a memory probe in a fresh process) is asked of
the runner, never found out by checking its class.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.formats import read_json

Feed = Mapping[str, np.ndarray] | np.ndarray


@dataclass
class RunnerInfo:
    """What a runner knows about the model it runs (valid after ``activate``)."""

    backend: str
    path: str
    input_name: str
    sample_shape: tuple[int, ...]  # input shape without the batch dimension
    input_dtype: str
    min_batch: int
    max_batch: int | None  # None: no upper limit known
    device: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sample_shape": list(self.sample_shape)}

    def input_bytes(self) -> int:
        """Bytes of one sample of the input."""
        return math.prod(self.sample_shape) * np.dtype(self.input_dtype).itemsize


class Runner(abc.ABC):
    kind = "base"  # the registry's name for this runtime (``open_runner(..., backend=kind)``)
    library: str | None = None  # the library that runs the model (what RunnerInfo.backend reports), if any
    # a fresh process that opens this runner by ``kind`` and ``options`` measures the model's own
    # peak host memory; None where that number would mean nothing (GPU memory is reported instead)
    rss_prefix: str | None = None

    def __init__(self, path: str | os.PathLike[str] | None, options: dict[str, Any] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.options = dict(options or {})  # JSON-able: enough to open the same runner again
        self.is_active = False
        self.last_compute_ms: float | None = None
        self._info: RunnerInfo | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else f"in-memory {self.kind} model"

    # -- interface -------------------------------------------------------------------------
    def activate(self) -> None:
        if not self.is_active:
            if self.path is not None and not self.path.exists():
                raise SlimError(f"no such model file: {self.path}")
            self._info = self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, feed: Feed) -> np.ndarray:
        if not self.is_active:
            raise SlimError(f"runner for {self.name} is not active; call activate() or use it in a 'with' block")
        x = self._feed_array(feed)
        return self._infer(x)

    @property
    def info(self) -> RunnerInfo:
        if self._info is None:
            raise SlimError(f"runner for {self.name} is not active yet; its metadata is read on activate()")
        return self._info

    def supports_batch(self, batch: int) -> bool:
        info = self.info
        return batch >= info.min_batch and (info.max_batch is None or batch <= info.max_batch)

    def memory(self) -> dict[str, int]:
        """Backend-specific memory figures in bytes (empty when the backend cannot tell)."""
        return {}

    def sample_bytes(self) -> int | None:
        """Host bytes one sample needs at once in a forward pass, at least, once active; None when unknown
        (the benchmark checks a batch against the memory with it before drawing the batch)."""
        return None

    def costs(self) -> tuple[dict[str, int], str]:
        """``({"params": .., "macs": ..}, where they came from)``; by default a ``<model>.json`` beside the file."""
        costs = sidecar_costs(self.path) if self.path is not None else {}
        return costs, "sidecar json" if costs else "none"

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- backend hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def _activate(self) -> RunnerInfo: ...

    @abc.abstractmethod
    def _infer(self, x: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    # -- helpers ---------------------------------------------------------------------------
    def _feed_array(self, feed: Feed) -> np.ndarray:
        info = self.info
        if isinstance(feed, Mapping):
            if set(feed) != {info.input_name}:
                raise SlimError(f"{self.name} takes one input named {info.input_name!r}, got {sorted(feed)}")
            feed = feed[info.input_name]
        x = np.asarray(feed)
        if x.ndim != len(info.sample_shape) + 1 or tuple(x.shape[1:]) != info.sample_shape:
            raise SlimError(
                f"{self.name} expects input of shape (N, {', '.join(map(str, info.sample_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not self.supports_batch(x.shape[0]):
            hi = "any" if info.max_batch is None else info.max_batch
            raise SlimError(
                f"{self.name} supports batch {info.min_batch}..{hi}, got {x.shape[0]}; "
                "rebuild the engine with a larger profile (`engine_batch`) or use a smaller batch"
            )
        return np.ascontiguousarray(x, dtype=np.dtype(info.input_dtype))


def sidecar_costs(path: Path) -> dict[str, int]:
    """``<model>.json`` next to the model (an engine's manifest is one), if it records params/MACs."""
    side = path.with_name(path.name + ".json")
    if not side.exists():
        return {}
    try:
        data = read_json(side, "model's side file")
    except SlimError:  # only numbers for the report: without them the costs are unknown
        return {}
    return {k: int(data[k]) for k in ("params", "macs") if isinstance(data, dict) and isinstance(data.get(k), int)}
