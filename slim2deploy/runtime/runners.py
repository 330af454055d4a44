"""One runner interface over ONNX Runtime, torch and TensorRT, in the manner of Polygraphy.

A runner is created cheaply (it only remembers its options); ``activate()`` does the heavy
work (create the session, load the checkpoint, deserialize the engine), ``infer()`` takes a
host array (or ``{input_name: array}``) and returns the first output as a host array, and
``deactivate()`` frees everything. ``infer`` returning a host array means the result is
complete: on a GPU the copy back synchronises, so a caller's wall clock measures end to end.
Backends that can time the device work alone put it in ``last_compute_ms``.

Heavy modules are imported inside the backends only: this file must import on a machine with
numpy and one runtime (onnxruntime, or tensorrt plus a CUDA binding) and no torch.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.cuda import CudaApi, cuda_api

if TYPE_CHECKING:
    import tensorrt as trt

    from slim2deploy.deploy.engine import LoadedEngine

Feed = Mapping[str, np.ndarray] | np.ndarray

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


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


class Runner(abc.ABC):
    backend = "base"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.is_active = False
        self.last_compute_ms: float | None = None
        self._info: RunnerInfo | None = None

    # -- interface -------------------------------------------------------------------------
    def activate(self) -> None:
        if not self.is_active:
            if not self.path.exists():
                raise SlimError(f"no such model file: {self.path}")
            self._info = self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, feed: Feed) -> np.ndarray:
        if not self.is_active:
            raise SlimError(f"runner for {self.path} is not active; call activate() or use it in a 'with' block")
        x = self._feed_array(feed)
        return self._infer(x)

    @property
    def info(self) -> RunnerInfo:
        if self._info is None:
            raise SlimError(f"runner for {self.path} is not active yet; its metadata is read on activate()")
        return self._info

    def supports_batch(self, batch: int) -> bool:
        info = self.info
        return batch >= info.min_batch and (info.max_batch is None or batch <= info.max_batch)

    def memory(self) -> dict[str, int]:
        """Backend-specific memory figures in bytes (empty when the backend cannot tell)."""
        return {}

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
                raise SlimError(f"{self.path.name} takes one input named {info.input_name!r}, got {sorted(feed)}")
            feed = feed[info.input_name]
        x = np.asarray(feed)
        if x.ndim != len(info.sample_shape) + 1 or tuple(x.shape[1:]) != info.sample_shape:
            raise SlimError(
                f"{self.path.name} expects input of shape (N, {', '.join(map(str, info.sample_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not self.supports_batch(x.shape[0]):
            hi = "any" if info.max_batch is None else info.max_batch
            raise SlimError(
                f"{self.path.name} supports batch {info.min_batch}..{hi}, got {x.shape[0]}; "
                "rebuild the engine with a larger profile (--batch) or use a smaller batch"
            )
        return np.ascontiguousarray(x, dtype=np.dtype(info.input_dtype))


# ---------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------
ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class OrtRunner(Runner):
    """An ``.onnx`` file on ONNX Runtime.

    ``device``: ``auto`` (CUDA when onnxruntime-gpu sees a GPU, else CPU), ``cpu``, ``cuda`` or
    ``tensorrt`` (TensorRT execution provider, falling back to CUDA/CPU for unsupported nodes).
    ``opt_level``: ORT graph optimisation level; judge a TensorRT-bound Q/DQ graph at ``basic``.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "auto",
        opt_level: str = "all",
        threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        super().__init__(path)
        if opt_level not in ORT_OPT_LEVELS:
            raise SlimError(f"unknown ONNX Runtime optimisation level {opt_level!r}; use one of {ORT_OPT_LEVELS}")
        if device not in ("auto", *ORT_PROVIDERS):
            raise SlimError(f"unknown ONNX Runtime device {device!r}; use auto, {', '.join(ORT_PROVIDERS)}")
        self.device = device
        self.opt_level = opt_level
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self._session: Any = None

    def _providers(self, available: list[str]) -> list[str]:
        if self.device == "auto":
            return ORT_PROVIDERS["cuda" if "CUDAExecutionProvider" in available else "cpu"]
        wanted = ORT_PROVIDERS[self.device]
        if wanted[0] not in available:
            raise SlimError(
                f"ONNX Runtime here has no {wanted[0]} (available: {', '.join(available)}); "
                "install onnxruntime-gpu for cuda/tensorrt or use --backend cpu"
            )
        return wanted

    def _activate(self) -> RunnerInfo:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise SlimError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)") from exc
        opts = ort.SessionOptions()
        level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.opt_level]
        opts.graph_optimization_level = level
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self.inter_op_threads:
            opts.inter_op_num_threads = self.inter_op_threads
        providers = self._providers(ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise SlimError(f"ONNX Runtime cannot load {self.path}: {first}; re-export the model") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise SlimError(f"{self.path.name} has {len(inputs)} inputs; slim2deploy runs single-input models")
        inp = inputs[0]
        if inp.type not in _ORT_DTYPES:
            raise SlimError(f"{self.path.name}: unsupported input type {inp.type}")
        dims = list(inp.shape)
        if any(not isinstance(d, int) for d in dims[1:]):
            raise SlimError(f"{self.path.name}: only the batch dimension may be dynamic, input shape is {dims}")
        static_batch = dims[0] if isinstance(dims[0], int) else None
        used = self._session.get_providers()
        return RunnerInfo(
            backend=self.backend,
            path=str(self.path),
            input_name=inp.name,
            sample_shape=tuple(int(d) for d in dims[1:]),
            input_dtype=_ORT_DTYPES[inp.type],
            min_batch=static_batch or 1,
            max_batch=static_batch,
            device="cpu" if used[0] == "CPUExecutionProvider" else "cuda",
            precision="unknown",
            options={
                "providers": used,
                "opt_level": self.opt_level,
                "threads": self.threads or 0,
                "onnxruntime": ort.__version__,
            },
        )

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self.info.input_name: x})[0]
        return np.asarray(out)

    def _deactivate(self) -> None:
        self._session = None


# ---------------------------------------------------------------------------------------------
# torch (slim2deploy checkpoints)
# ---------------------------------------------------------------------------------------------
class TorchRunner(Runner):
    """A slim2deploy checkpoint run by torch.

    ``device`` cpu/cuda/auto; ``precision`` fp32/fp16 (fp16 on CUDA only: CPU fp16 convs are
    slow emulation, not a deployment target); ``channels_last``; ``cuda_graph`` captures one
    CUDA graph per batch size and replays it, which removes the Python/launch overhead that
    dominates small batches.
    """

    backend = "torch"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        cuda_graph: bool = False,
        threads: int | None = None,
        trust_pickle: bool = False,
    ) -> None:
        super().__init__(path)
        if precision not in ("fp32", "fp16"):
            raise SlimError(f"torch precision must be fp32 or fp16, got {precision!r}")
        if device not in ("auto", "cpu", "cuda"):
            raise SlimError(f"torch device must be auto, cpu or cuda, got {device!r}")
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self.threads = threads
        self.trust_pickle = trust_pickle
        self._model: Any = None
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self.params: int | None = None
        self.macs: int | None = None

    def _activate(self) -> RunnerInfo:
        import torch

        from slim2deploy.model.checkpoint import load_checkpoint
        from slim2deploy.model.stats import count_macs, count_params
        from slim2deploy.prune.rebuild import model_from_checkpoint

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SlimError("torch sees no CUDA GPU here; use --backend cpu")
        if device == "cpu" and (self.precision == "fp16" or self.cuda_graph):
            raise SlimError("fp16 and CUDA graphs need the cuda device; drop them or use --backend cuda")
        if self.threads:
            torch.set_num_threads(self.threads)
        ckpt = load_checkpoint(self.path, trust_pickle=self.trust_pickle)
        model = model_from_checkpoint(ckpt, trust_code=self.trust_pickle)
        sample_shape = tuple(int(d) for d in ckpt.input_shape)
        if not all(sample_shape):
            raise SlimError(f"{self.path.name} does not record its input shape; save it as a slim2deploy checkpoint")
        self.params = count_params(model)
        self.macs = count_macs(model, torch.zeros(1, *sample_shape))
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._torch_device = torch.device(device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self._model = model.to(self._torch_device, dtype=self._dtype).to(memory_format=fmt).eval()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats(self._torch_device)
        return RunnerInfo(
            backend=self.backend,
            path=str(self.path),
            input_name="input",
            sample_shape=sample_shape,
            input_dtype="float32",
            min_batch=1,
            max_batch=None,
            device=device,
            precision=self.precision,
            options={
                "channels_last": self.channels_last,
                "cuda_graph": self.cuda_graph,
                "threads": torch.get_num_threads(),
                "torch": str(torch.__version__),
            },
        )

    def _to_device(self, x: np.ndarray) -> Any:
        import torch

        t = torch.from_numpy(x).to(self._torch_device, dtype=self._dtype, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _graph_for(self, batch: int, example: Any) -> tuple[Any, Any, Any]:
        import torch

        if batch not in self._graphs:
            static_in = example.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # warm-up on a side stream, as capture requires (lazy init of cuDNN handles etc.)
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._model(static_in)
            self._graphs[batch] = (graph, static_in, static_out)
        return self._graphs[batch]

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = self._to_device(x)
            if self._torch_device.type != "cuda":
                return self._model(t).float().numpy()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self.cuda_graph:
                graph, static_in, static_out = self._graph_for(x.shape[0], t)
                static_in.copy_(t)
                start.record()
                graph.replay()
                end.record()
                out = static_out
            else:
                start.record()
                out = self._model(t)
                end.record()
            host = out.float().cpu().numpy()  # the copy back synchronises the stream
            self.last_compute_ms = start.elapsed_time(end)
            return host

    def memory(self) -> dict[str, int]:
        if not self.is_active or self._torch_device.type != "cuda":
            return {}
        import torch

        return {"torch_max_memory_allocated": int(torch.cuda.max_memory_allocated(self._torch_device))}

    def _deactivate(self) -> None:
        self._graphs.clear()
        self._model = None


# ---------------------------------------------------------------------------------------------
# TensorRT
# ---------------------------------------------------------------------------------------------
class TrtRunner(Runner):
    """A serialized TensorRT engine (``.engine``) with its manifest checked on load.

    Buffers are allocated once for the profile's largest batch. End-to-end time covers the
    host→device copy, the engine and the copy back; ``last_compute_ms`` the engine alone,
    timed with CUDA events. With ``cuda_graph`` the engine launch is captured once per input
    shape and replayed (TensorRT requires one plain enqueue after a shape change first).
    """

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike[str], cuda_graph: bool = True, check_manifest: bool = True) -> None:
        super().__init__(path)
        self.cuda_graph = cuda_graph
        self.check_manifest = check_manifest
        self._cuda: CudaApi | None = None
        self._loaded: LoadedEngine | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._buffers: dict[str, Any] = {}
        self._graphs: dict[tuple[int, ...], Any] = {}
        self._shape: tuple[int, ...] | None = None
        self._memory: dict[str, int] = {}

    def _activate(self) -> RunnerInfo:
        from slim2deploy.deploy.engine import dims_tuple, engine_available, load_engine

        ok, reason = engine_available()
        cuda = cuda_api()
        if not ok or cuda is None:
            raise SlimError(f"cannot run {self.path.name}: {reason}")
        import tensorrt as trt

        self._cuda = cuda
        self._dims_tuple = dims_tuple
        free_before = cuda.mem_free()
        loaded = load_engine(self.path, check=self.check_manifest)
        free_loaded = cuda.mem_free()
        engine, manifest = loaded.engine, loaded.manifest
        context = engine.create_execution_context()
        self._loaded, self._engine, self._context = loaded, engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise SlimError(f"{self.path.name} has {len(inputs)} inputs; slim2deploy runs single-input engines")
        self._input = inputs[0]
        lo, _opt, hi = engine.get_tensor_profile_shape(self._input, 0)
        max_shape = dims_tuple(hi)
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        if not context.set_input_shape(self._input, max_shape):
            raise SlimError(f"{self.path.name}: the engine rejects its own profile's max shape {max_shape}")
        sizes: dict[str, int] = {}
        for name in names:
            shape = dims_tuple(context.get_tensor_shape(name))
            sizes[name] = int(np.prod(shape)) * self._dtypes[name].itemsize
            self._buffers[name] = cuda.malloc(sizes[name])
            context.set_tensor_address(name, int(self._buffers[name]))
        self._stream = cuda.stream()
        self._events = [cuda.event() for _ in range(4)]
        self._memory = {
            "engine_device_memory": int(engine.device_memory_size_v2),
            "engine_load_device_bytes": max(free_before - free_loaded, 0),
            "io_buffer_bytes": sum(sizes.values()),
        }
        return RunnerInfo(
            backend=self.backend,
            path=str(self.path),
            input_name=self._input,
            sample_shape=max_shape[1:],
            input_dtype=str(self._dtypes[self._input]),
            min_batch=int(lo[0]),
            max_batch=int(hi[0]),
            device="cuda",
            precision=manifest.precision if manifest else "unknown",
            options={
                "cuda_graph": self.cuda_graph and cuda.graphs,
                "cuda_binding": cuda.name,
                "tensorrt": trt.__version__,
            },
        )

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        assert self._context is not None and self._cuda is not None
        if shape == self._shape:
            return
        if not self._context.set_input_shape(self._input, shape):
            raise SlimError(f"{self.path.name}: input shape {shape} is outside the engine's profile")
        self._shape = shape
        # one plain enqueue after a shape change lets TensorRT finish its shape-dependent set-up
        # outside the capture, as CUDA-graph capture requires
        self._enqueue()
        self._cuda.sync(self._stream)

    def _enqueue(self) -> None:
        assert self._context is not None and self._cuda is not None
        if not self._context.execute_async_v3(self._cuda.handle(self._stream)):
            raise SlimError(f"TensorRT failed to execute {self.path.name}; see the TensorRT log above")

    def _launch(self, shape: tuple[int, ...]) -> None:
        assert self._cuda is not None
        if not (self.cuda_graph and self._cuda.graphs):
            self._enqueue()
            return
        if shape not in self._graphs:
            try:
                self._graphs[shape] = self._cuda.capture(self._stream, self._enqueue)
            except SlimError:
                self.cuda_graph = False  # not capturable (e.g. data-dependent shapes): plain enqueue
                self._enqueue()
                return
        self._cuda.launch(self._graphs[shape], self._stream)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        assert self._context is not None and self._cuda is not None
        cuda, ev, stream = self._cuda, self._events, self._stream
        shape = tuple(x.shape)
        self._set_shape(shape)
        out_name = self._outputs[0]
        out = np.empty(self._dims_tuple(self._context.get_tensor_shape(out_name)), dtype=self._dtypes[out_name])
        cuda.record(ev[0], stream)
        cuda.h2d(self._buffers[self._input], x, stream)
        cuda.record(ev[1], stream)
        self._launch(shape)
        cuda.record(ev[2], stream)
        cuda.d2h(out, self._buffers[out_name], stream)
        cuda.record(ev[3], stream)
        cuda.sync(stream)
        self.last_compute_ms = cuda.elapsed_ms(ev[1], ev[2])
        return out

    def memory(self) -> dict[str, int]:
        return dict(self._memory)

    def _deactivate(self) -> None:
        if self._cuda is not None:
            for ptr in self._buffers.values():
                self._cuda.free(ptr)
        self._buffers.clear()
        self._graphs.clear()
        self._context = None
        self._engine = None
        self._loaded = None
        self._shape = None


# ---------------------------------------------------------------------------------------------
def runner_kind(path: str | os.PathLike[str]) -> str:
    """``onnx``, ``tensorrt`` or ``torch`` by file type."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if suffix in CHECKPOINT_SUFFIXES:
        return "torch"
    raise SlimError(
        f"cannot tell how to run {path}: expected .onnx, {'/'.join(ENGINE_SUFFIXES)} (TensorRT) "
        f"or {'/'.join(CHECKPOINT_SUFFIXES)} (slim2deploy checkpoint)"
    )


def open_runner(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    threads: int | None = None,
    opt_level: str = "all",
    precision: str = "fp32",
    channels_last: bool = False,
    cuda_graph: bool = False,
    trust_pickle: bool = False,
    check_manifest: bool = True,
) -> Runner:
    """A runner for ``path`` chosen by file type; options a backend does not use are ignored."""
    kind = runner_kind(path)
    if kind == "onnx":
        return OrtRunner(path, device=device, opt_level=opt_level, threads=threads)
    if kind == "tensorrt":
        if device not in ("auto", "cuda", "tensorrt"):
            raise SlimError(f"{path} is a TensorRT engine; it runs on a GPU only (got device {device!r})")
        return TrtRunner(path, cuda_graph=cuda_graph, check_manifest=check_manifest)
    return TorchRunner(
        path,
        device="cuda" if device == "tensorrt" else device,
        precision=precision,
        channels_last=channels_last,
        cuda_graph=cuda_graph,
        threads=threads,
        trust_pickle=trust_pickle,
    )
