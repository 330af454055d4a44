"""A fake ``cuda.bindings.runtime`` (cuda-python's CUDA runtime API), written from its documentation.

Every call returns ``(cudaError_t, *values)`` as cuda-python does. "Device" memory is host
memory (so a copy is a memmove), streams execute their work at once, in order, unless they are
being captured into a graph, in which case the work is recorded and runs when the graph is
launched. Copies check that the side they call "device" really is device memory, and the GPU is
the one ``FAKE_CUDA_DEVICE`` names (``name;major.minor``, or ``none``).
"""

from __future__ import annotations

import ctypes
import enum
import os
import time
from collections.abc import Callable
from typing import Any


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorStreamCaptureUnsupported = 900


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


_ERROR_TEXT = {
    cudaError_t.cudaSuccess: b"no error",
    cudaError_t.cudaErrorInvalidValue: b"invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: b"out of memory",
    cudaError_t.cudaErrorNoDevice: b"no CUDA-capable device is detected",
    cudaError_t.cudaErrorInvalidResourceHandle: b"invalid resource handle",
    cudaError_t.cudaErrorIllegalState: b"the operation cannot be performed in the present state",
    cudaError_t.cudaErrorStreamCaptureUnsupported: b"operation not permitted when stream is capturing",
}
OK = cudaError_t.cudaSuccess
DRIVER_VERSION = 13000  # CUDA 13.0, as cudaDriverGetVersion encodes it
TOTAL_MEMORY = 80 << 30


def _device() -> tuple[str, int, int] | None:
    spec = os.environ.get("FAKE_CUDA_DEVICE", "NVIDIA H100 80GB HBM3;9.0")
    if spec == "none":
        return None
    name, cc = spec.split(";")
    major, minor = cc.split(".")
    return name, int(major), int(minor)


class cudaDeviceProp:
    def __init__(self, name: str, major: int, minor: int) -> None:
        self.name = name.encode().ljust(256, b"\x00")  # a fixed char[256], as cuda-python returns it
        self.major, self.minor = major, minor
        self.totalGlobalMem = TOTAL_MEMORY


def cudaGetErrorString(error: cudaError_t) -> tuple[cudaError_t, bytes]:
    return OK, _ERROR_TEXT.get(error, b"unknown error")


def cudaGetDeviceCount() -> tuple[cudaError_t, int]:
    return (OK, 1) if _device() else (cudaError_t.cudaErrorNoDevice, 0)


def cudaGetDeviceProperties(device: int) -> tuple[cudaError_t, cudaDeviceProp | None]:
    found = _device()
    if found is None or device != 0:
        return cudaError_t.cudaErrorNoDevice if found is None else cudaError_t.cudaErrorInvalidValue, None
    return OK, cudaDeviceProp(*found)


def cudaDriverGetVersion() -> tuple[cudaError_t, int]:
    return OK, DRIVER_VERSION


def cudaRuntimeGetVersion() -> tuple[cudaError_t, int]:
    return OK, DRIVER_VERSION


# ---- memory: device allocations are host buffers, kept here by address ---------------------------
_allocations: dict[int, ctypes.Array[ctypes.c_char]] = {}


def cudaMalloc(size: int) -> tuple[cudaError_t, int]:
    if _device() is None:
        return cudaError_t.cudaErrorNoDevice, 0
    if size <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    buffer = ctypes.create_string_buffer(size)
    _allocations[ctypes.addressof(buffer)] = buffer
    return OK, ctypes.addressof(buffer)


def cudaFree(ptr: int) -> tuple[cudaError_t]:
    return (OK,) if _allocations.pop(int(ptr), None) is not None else (cudaError_t.cudaErrorInvalidValue,)


def cudaMemGetInfo() -> tuple[cudaError_t, int, int]:
    used = sum(len(b) for b in _allocations.values())
    return OK, TOTAL_MEMORY - used, TOTAL_MEMORY


def is_device_range(ptr: int, size: int) -> bool:
    """Whether ``size`` bytes from ``ptr`` lie inside one device allocation."""
    return any(start <= ptr and ptr + size <= start + len(buf) for start, buf in _allocations.items())


# ---- streams, events, graphs ---------------------------------------------------------------------
class cudaStream_t:
    _next = 0x7F0000

    def __init__(self) -> None:
        cudaStream_t._next += 0x100
        self._handle = cudaStream_t._next
        self.capture: list[Callable[[], None]] | None = None  # the work recorded while capturing

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:
        return self._handle


class cudaEvent_t:
    def __init__(self) -> None:
        self.time: float | None = None


class cudaGraph_t:
    def __init__(self, work: list[Callable[[], None]]) -> None:
        self.work = work


class cudaGraphExec_t(cudaGraph_t):
    pass


_streams: dict[int, cudaStream_t] = {}


def stream_work(stream: Any, work: Callable[[], None]) -> cudaError_t:
    """Run ``work`` on ``stream`` (a cudaStream_t or its handle): now, or into the graph being captured.

    What a kernel launch is to CUDA: the fake TensorRT's enqueue comes through here.
    """
    handle = int(stream)
    if handle == 0:  # the legacy default stream
        work()
        return OK
    found = _streams.get(handle)
    if found is None:
        return cudaError_t.cudaErrorInvalidResourceHandle
    if found.capture is not None:
        found.capture.append(work)
    else:
        work()
    return OK


def cudaStreamCreate() -> tuple[cudaError_t, cudaStream_t | None]:
    if _device() is None:
        return cudaError_t.cudaErrorNoDevice, None
    stream = cudaStream_t()
    _streams[int(stream)] = stream
    return OK, stream


def cudaStreamDestroy(stream: cudaStream_t) -> tuple[cudaError_t]:
    return (OK,) if _streams.pop(int(stream), None) is not None else (cudaError_t.cudaErrorInvalidResourceHandle,)


def cudaStreamSynchronize(stream: Any) -> tuple[cudaError_t]:
    found = _streams.get(int(stream))
    if int(stream) != 0 and found is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    if found is not None and found.capture is not None:
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
    return (OK,)  # the work already ran


def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple[cudaError_t]:
    device_side = {
        cudaMemcpyKind.cudaMemcpyHostToDevice: (dst,),
        cudaMemcpyKind.cudaMemcpyDeviceToHost: (src,),
        cudaMemcpyKind.cudaMemcpyDeviceToDevice: (dst, src),
    }.get(cudaMemcpyKind(kind), ())
    if any(not is_device_range(int(p), count) for p in device_side):
        return (cudaError_t.cudaErrorInvalidValue,)
    return (stream_work(stream, lambda: ctypes.memmove(int(dst), int(src), count)),)


def cudaEventCreate() -> tuple[cudaError_t, cudaEvent_t]:
    return OK, cudaEvent_t()


def cudaEventRecord(event: cudaEvent_t, stream: Any) -> tuple[cudaError_t]:
    def stamp() -> None:
        event.time = time.perf_counter()

    return (stream_work(stream, stamp),)


def cudaEventElapsedTime(start: cudaEvent_t, end: cudaEvent_t) -> tuple[cudaError_t, float]:
    if start.time is None or end.time is None:
        return cudaError_t.cudaErrorInvalidResourceHandle, 0.0
    return OK, (end.time - start.time) * 1e3


def cudaStreamBeginCapture(stream: cudaStream_t, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:
    found = _streams.get(int(stream))
    if found is None:  # the legacy default stream cannot be captured
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
    if found.capture is not None:
        return (cudaError_t.cudaErrorIllegalState,)
    found.capture = []
    return (OK,)


def cudaStreamEndCapture(stream: cudaStream_t) -> tuple[cudaError_t, cudaGraph_t | None]:
    found = _streams.get(int(stream))
    if found is None or found.capture is None:
        return cudaError_t.cudaErrorIllegalState, None
    graph = cudaGraph_t(found.capture)
    found.capture = None
    return OK, graph


def cudaGraphInstantiate(graph: cudaGraph_t, flags: int) -> tuple[cudaError_t, cudaGraphExec_t]:
    return OK, cudaGraphExec_t(list(graph.work))


def cudaGraphLaunch(graph_exec: cudaGraphExec_t, stream: Any) -> tuple[cudaError_t]:
    def replay() -> None:
        for work in graph_exec.work:
            work()

    return (stream_work(stream, replay),)
