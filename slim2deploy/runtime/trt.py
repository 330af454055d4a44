"""TensorRT: a serialized engine with its manifest checked on load, CUDA through ``deploy.cuda``.

Written from the TensorRT 10 documentation and type-checked against ``tensorrt-stubs``: no
TensorRT runs here. torch-free, so it works on a GPU box with tensorrt and a CUDA binding only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.cuda import CudaApi, cuda_api
from slim2deploy.deploy.engine import LoadedEngine, dims_tuple, engine_available, load_engine
from slim2deploy.runtime.base import Runner, RunnerInfo, sidecar_costs

if TYPE_CHECKING:
    import tensorrt as trt


class TrtRunner(Runner):
    """A serialized TensorRT engine (``.engine``) with its manifest checked on load.

    Buffers are allocated once for the profile's largest batch. End-to-end time covers the
    host→device copy, the engine and the copy back; ``last_compute_ms`` the engine alone,
    timed with CUDA events. With ``cuda_graph`` the engine launch is captured once per input
    shape and replayed (TensorRT requires one plain enqueue after a shape change first).
    """

    kind = "tensorrt"
    library = "tensorrt"

    def __init__(self, path: str | os.PathLike[str], cuda_graph: bool = True, check_manifest: bool = True) -> None:
        super().__init__(path, {"cuda_graph": cuda_graph, "check_manifest": check_manifest})
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
        ok, reason = engine_available()
        cuda = cuda_api()
        if not ok or cuda is None:
            raise SlimError(f"cannot run {self.name}: {reason}")
        import tensorrt as trt

        self._cuda = cuda
        free_before = cuda.mem_free()
        assert self.path is not None
        loaded = load_engine(self.path, check=self.check_manifest)
        free_loaded = cuda.mem_free()
        engine, manifest = loaded.engine, loaded.manifest
        context = engine.create_execution_context()
        self._loaded, self._engine, self._context = loaded, engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise SlimError(f"{self.name} has {len(inputs)} inputs; slim2deploy runs single-input engines")
        self._input = inputs[0]
        lo, _opt, hi = engine.get_tensor_profile_shape(self._input, 0)
        max_shape = dims_tuple(hi)
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        if not context.set_input_shape(self._input, max_shape):
            raise SlimError(f"{self.name}: the engine rejects its own profile's max shape {max_shape}")
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
            backend=self.library or self.kind,
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
            raise SlimError(f"{self.name}: input shape {shape} is outside the engine's profile")
        self._shape = shape
        # one plain enqueue after a shape change lets TensorRT finish its shape-dependent set-up
        # outside the capture, as CUDA-graph capture requires
        self._enqueue()
        self._cuda.sync(self._stream)

    def _enqueue(self) -> None:
        assert self._context is not None and self._cuda is not None
        if not self._context.execute_async_v3(self._cuda.handle(self._stream)):
            raise SlimError(f"TensorRT failed to execute {self.name}; see the TensorRT log above")

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
        out = np.empty(dims_tuple(self._context.get_tensor_shape(out_name)), dtype=self._dtypes[out_name])
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

    def costs(self) -> tuple[dict[str, int], str]:
        assert self.path is not None
        costs = sidecar_costs(self.path)  # the engine's manifest records the costs of its ONNX
        return costs, "engine manifest" if costs else "none"

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
