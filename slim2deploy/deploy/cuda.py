"""CUDA through whichever Python binding is installed (cuda-python preferred, else pycuda).

Only what the TensorRT engine builder and runner need: device info, memory, streams, copies,
events, graph capture. torch-free, so it works on a GPU box with tensorrt and a binding only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError


class _CudaPython:
    """cuda-python's runtime API: every call returns ``(err, *values)``."""

    name = "cuda-python"
    graphs = True

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6 layout
        self.rt: Any = cudart

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(err)
            raise SlimError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        err, count = self.rt.cudaGetDeviceCount()
        return int(count) if err == self.rt.cudaError_t.cudaSuccess else 0

    def device_info(self) -> dict[str, Any]:
        props = self._check(self.rt.cudaGetDeviceProperties(0))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        driver = int(self._check(self.rt.cudaDriverGetVersion()))
        runtime = int(self._check(self.rt.cudaRuntimeGetVersion()))
        return {
            "gpu_name": name.rstrip("\x00"),
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_bytes": int(props.totalGlobalMem),
            "cuda_driver_api": f"{driver // 1000}.{driver % 1000 // 10}",
            "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
        }

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr))

    def mem_free(self) -> int:
        free, _total = self._check(self.rt.cudaMemGetInfo())
        return int(free)

    def stream(self) -> Any:
        return self._check(self.rt.cudaStreamCreate())

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))

    def event(self) -> Any:
        return self._check(self.rt.cudaEventCreate())

    def record(self, event: Any, stream: Any) -> None:
        self._check(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._check(self.rt.cudaEventElapsedTime(start, end)))

    def sync(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def capture(self, stream: Any, work: Any) -> Any:
        """Capture ``work()`` issued on ``stream`` into an instantiated CUDA graph."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.rt.cudaStreamBeginCapture(stream, mode))
        try:
            work()
        finally:
            graph = self._check(self.rt.cudaStreamEndCapture(stream))
        return self._check(self.rt.cudaGraphInstantiate(graph, 0))

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self._check(self.rt.cudaGraphLaunch(graph_exec, stream))

    def handle(self, stream: Any) -> int:
        return int(stream)


class _PyCuda:
    name = "pycuda"
    graphs = False  # pycuda's graph API differs across versions; replay is cuda-python only

    def __init__(self) -> None:
        import pycuda.driver as drv

        drv.init()
        self.drv: Any = drv
        self._ctx: Any = None

    def device_count(self) -> int:
        return int(self.drv.Device.count())

    def device_info(self) -> dict[str, Any]:
        dev = self.drv.Device(0)
        major, minor = dev.compute_capability()
        driver = int(self.drv.get_driver_version())
        return {
            "gpu_name": dev.name(),
            "compute_capability": f"{major}.{minor}",
            "gpu_memory_bytes": int(dev.total_memory()),
            "cuda_driver_api": f"{driver // 1000}.{driver % 1000 // 10}",
        }

    def _context(self) -> None:
        if self._ctx is None:
            self._ctx = self.drv.Device(0).retain_primary_context()
            self._ctx.push()

    def malloc(self, nbytes: int) -> Any:
        self._context()
        return self.drv.mem_alloc(max(nbytes, 1))

    def free(self, ptr: Any) -> None:
        ptr.free()

    def mem_free(self) -> int:
        self._context()
        free, _total = self.drv.mem_get_info()
        return int(free)

    def stream(self) -> Any:
        self._context()
        return self.drv.Stream()

    def h2d(self, dst: Any, src: np.ndarray, stream: Any) -> None:
        self.drv.memcpy_htod_async(dst, src, stream)

    def d2h(self, dst: np.ndarray, src: Any, stream: Any) -> None:
        self.drv.memcpy_dtoh_async(dst, src, stream)

    def event(self) -> Any:
        return self.drv.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(end.time_since(start))

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def capture(self, stream: Any, work: Any) -> Any:
        raise NotImplementedError

    def launch(self, graph_exec: Any, stream: Any) -> None:
        raise NotImplementedError

    def handle(self, stream: Any) -> int:
        return int(stream.handle)


CudaApi = _CudaPython | _PyCuda


def cuda_api() -> CudaApi | None:
    """The installed CUDA binding (cuda-python preferred), or None."""
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _PyCuda()
    except Exception:  # pycuda missing, or its driver init fails without a GPU
        return None


def cuda_device_info() -> dict[str, Any] | None:
    """GPU 0's name, compute capability and CUDA versions, or None without a GPU or binding."""
    api = cuda_api()
    if api is None or api.device_count() == 0:
        return None
    return api.device_info()
