"""ONNX Runtime: the one session factory of the package, and the runner on top of it.

Every ONNX Runtime session (the benchmark, the parity gate, precision agreement, the memory
probe in a fresh process) is made by ``ort_session``, so every one honours the level the file
asks for in its metadata (``slim2deploy.ort_optimization``: int8 graphs bound for TensorRT are
judged at BASIC). The hint is read from the file's top-level protobuf fields directly, so
neither the ``onnx`` package nor a second session is needed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.export import ORT_LEVEL_KEY, PRECISION_KEY
from slim2deploy.deploy.onnx_info import onnx_costs
from slim2deploy.runtime.base import Runner, RunnerInfo, sidecar_costs

if TYPE_CHECKING:
    import onnxruntime

ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
_METADATA_FIELD = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1; value = 2}


def _varint(f: IO[bytes]) -> int | None:
    value = shift = 0
    while byte := f.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None


def _fields(f: IO[bytes], wanted: int) -> list[bytes]:
    """The length-delimited values of field ``wanted`` in a protobuf message, skipping everything else."""
    found = []
    while (key := _varint(f)) is not None:
        number, wire = key >> 3, key & 7
        if wire == 0:
            _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            size = _varint(f) or 0
            if number == wanted:
                found.append(f.read(size))
            else:
                f.seek(size, os.SEEK_CUR)  # the graph, with every weight, is never read
        else:
            return []  # not a message this reader understands; ONNX Runtime will say what is wrong
    return found


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` without the onnx package; empty for an unreadable file."""
    meta = {}
    with open(path, "rb") as f:
        for entry in _fields(f, _METADATA_FIELD):
            parts = {}
            for number in (1, 2):
                values = _fields(io.BytesIO(entry), number)
                parts[number] = values[0].decode(errors="replace") if values else ""
            meta[parts[1]] = parts[2]
    return meta


def resolve_level(path: str | os.PathLike[str], optimization: str = "auto") -> str:
    """``auto`` becomes the file's own hint (``all`` without one); anything else is checked."""
    if optimization == "auto":
        optimization = onnx_metadata(path).get(ORT_LEVEL_KEY, "all")
    if optimization not in ORT_OPT_LEVELS:
        raise SlimError(
            f"unknown ONNX Runtime optimisation level {optimization!r}; use auto or one of {', '.join(ORT_OPT_LEVELS)}"
        )
    return optimization


def providers_for(device: str, available: list[str]) -> list[str]:
    if device == "auto":
        return ORT_PROVIDERS["cuda" if "CUDAExecutionProvider" in available else "cpu"]
    if device not in ORT_PROVIDERS:
        raise SlimError(f"unknown ONNX Runtime device {device!r}; use auto, {', '.join(ORT_PROVIDERS)}")
    wanted = ORT_PROVIDERS[device]
    if wanted[0] not in available:
        raise SlimError(
            f"ONNX Runtime here has no {wanted[0]} (available: {', '.join(available)}); "
            "install onnxruntime-gpu for cuda/tensorrt or use the cpu `device`"
        )
    return wanted


def ort_session(
    path: str | os.PathLike[str],
    optimization: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    inter_op_threads: int | None = None,
    spinning: bool = False,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session for ``path``; ``optimization`` is auto (the file's hint) or an explicit level.

    Thread-pool spinning is off unless ``spinning`` (for one session timed alone). ONNX Runtime's
    default keeps a session's idle pool threads busy-waiting for the next run, which pays off for one
    session alone; but every measurement here keeps several sessions open and times them
    interleaved, and the pools of the sessions not running take the cores from the one that is.
    Measured on the 2-core CPU machine (``bench/ort_spinning.py``): a 64->64 3x3 conv at b64 varied
    1.9-7.0 ms between rounds with spinning (1.5 ms alone), 1.6-2.0 ms without; a latency table
    profiled with spinning predicted 2.18 ms for a model that ran 3.53 ms."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SlimError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)") from exc
    if not Path(path).is_file():
        raise SlimError(f"no such model file: {path}")
    level = resolve_level(path, optimization)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        opts.intra_op_num_threads = threads
    if inter_op_threads:
        opts.inter_op_num_threads = inter_op_threads
    for pool in ("intra_op", "inter_op"):
        opts.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    providers = providers_for(device, ort.get_available_providers())
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise SlimError(
            f"ONNX Runtime cannot load {path} ({first}); it is truncated or not a valid ONNX model: export it again"
        ) from exc


class OrtRunner(Runner):
    """An ``.onnx`` file on ONNX Runtime.

    ``device``: ``auto`` (CUDA when onnxruntime-gpu sees a GPU, else CPU), ``cpu``, ``cuda`` or
    ``tensorrt`` (TensorRT execution provider, falling back to CUDA/CPU for unsupported nodes).
    ``opt_level``: ``auto`` (the file's hint, else ``all``) or an explicit ORT graph optimisation level.
    ``spinning``: let the thread pools spin between runs (ORT's default; see ``ort_session``), only
    for a model timed alone.
    """

    kind = "onnx"
    library = "onnxruntime"
    rss_prefix = "ort"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "auto",
        opt_level: str = "auto",
        threads: int | None = None,
        inter_op_threads: int | None = None,
        spinning: bool = False,
    ) -> None:
        options = {
            "device": device,
            "opt_level": opt_level,
            "threads": threads,
            "inter_op_threads": inter_op_threads,
            "spinning": spinning,
        }
        super().__init__(path, options)
        if opt_level not in ("auto", *ORT_OPT_LEVELS):
            raise SlimError(f"unknown ONNX Runtime optimisation level {opt_level!r}; use auto, {ORT_OPT_LEVELS}")
        if device not in ("auto", *ORT_PROVIDERS):
            raise SlimError(f"unknown ONNX Runtime device {device!r}; use auto, {', '.join(ORT_PROVIDERS)}")
        self.device = device
        self.opt_level = opt_level
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self.spinning = spinning
        self._session: Any = None

    def _activate(self) -> RunnerInfo:
        import onnxruntime as ort

        assert self.path is not None
        level = resolve_level(self.path, self.opt_level)
        self._session = ort_session(self.path, level, self.device, self.threads, self.inter_op_threads, self.spinning)
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise SlimError(f"{self.name} has {len(inputs)} inputs; slim2deploy runs single-input models")
        inp = inputs[0]
        if inp.type not in _ORT_DTYPES:
            raise SlimError(f"{self.name}: unsupported input type {inp.type}")
        dims = list(inp.shape)
        if any(isinstance(d, int) and d <= 0 for d in dims):
            # ONNX Runtime would only fail at the first run, with its own InvalidArgument message
            raise SlimError(
                f"{self.name}: input {inp.name} has shape {dims}, with a dimension that is not positive; "
                "the file is damaged or was edited: export the model again"
            )
        if any(not isinstance(d, int) for d in dims[1:]):
            raise SlimError(f"{self.name}: only the batch dimension may be dynamic, input shape is {dims}")
        static_batch = dims[0] if isinstance(dims[0], int) else None
        used = self._session.get_providers()
        meta = self._session.get_modelmeta().custom_metadata_map
        return RunnerInfo(
            backend=self.library or self.kind,
            path=str(self.path),
            input_name=inp.name,
            sample_shape=tuple(int(d) for d in dims[1:]),
            input_dtype=_ORT_DTYPES[inp.type],
            min_batch=static_batch or 1,
            max_batch=static_batch,
            device="cpu" if used[0] == "CPUExecutionProvider" else "cuda",
            precision=meta.get(PRECISION_KEY, "unknown"),
            options={
                "providers": used,
                "opt_level": level,
                "threads": self.threads or 0,
                "spinning": self.spinning,
                "onnxruntime": ort.__version__,
            },
        )

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self.info.input_name: x})[0]
        return np.asarray(out)

    def costs(self) -> tuple[dict[str, int], str]:
        assert self.path is not None
        costs = onnx_costs(self.path)
        side = sidecar_costs(self.path)
        if costs and "macs" not in costs and "macs" in side:
            return {**costs, "macs": side["macs"]}, "onnx graph, MACs from the sidecar json"
        if costs:
            return costs, "onnx graph"
        return side, "sidecar json" if side else "none"

    def _deactivate(self) -> None:
        self._session = None
