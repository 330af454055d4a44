"""The fake's runtime, engine and execution context (see __init__)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct
from typing import Any

import numpy as np
from cuda.bindings import runtime as cudart

from ._types import (
    ENGINE_MAGIC,
    RELEASE,
    DataType,
    Dims,
    IHostMemory,
    ILogger,
    TensorIOMode,
    __version__,
    as_dims,
    current_gpu,
    nptype,
    pack_engine,
    require_gpu,
    volume,
)


def describe_engine(data: Any) -> dict[str, Any] | None:
    """The header of an engine this fake serialized (for tests; TensorRT has no such call), else None."""
    data = bytes(data)
    if not data.startswith(ENGINE_MAGIC) or len(data) < len(ENGINE_MAGIC) + 8:
        return None
    (size,) = struct.unpack("<Q", data[len(ENGINE_MAGIC) : len(ENGINE_MAGIC) + 8])
    start = len(ENGINE_MAGIC) + 8
    try:
        header = json.loads(data[start : start + size])
    except ValueError:
        return None
    header["model"] = data[start + size :]
    return header


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        require_gpu(logger)
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        header = describe_engine(serialized_engine)
        gpu = current_gpu()
        if header is None or hashlib.sha256(header["model"]).hexdigest() != header["model_sha256"]:
            problem = "the data is not a serialized engine, or it is damaged"
        elif tuple(header["tensorrt"]) != RELEASE:
            built = ".".join(map(str, header["tensorrt"]))
            problem = f"the engine was built by TensorRT {built}, this is {__version__}"
        elif gpu is None or header["compute_capability"] != gpu[1]:
            problem = f"the engine holds kernels for compute capability {header['compute_capability']}"
        else:
            return ICudaEngine(header)
        self.logger.log(ILogger.ERROR, f"deserialize_cuda_engine: {problem}")
        return None


class ICudaEngine:
    def __init__(self, header: dict[str, Any]) -> None:
        self._header = header
        self._io = {t["name"]: t for t in header["io"]}
        self._names = [t["name"] for t in header["io"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    @property
    def device_memory_size_v2(self) -> int:
        return int(self._header["device_memory"])

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode(self._io[name]["mode"]) if name in self._io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self._io[name]["dtype"])

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._io[name]["shape"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if profile_index != 0 or self.get_tensor_mode(name) != TensorIOMode.INPUT:
            return []
        return [Dims(s) for s in self._io[name]["profile"]]

    def create_execution_context(self, strategy: Any = None) -> IExecutionContext:
        return IExecutionContext(self)

    def serialize(self) -> IHostMemory:
        return pack_engine({k: v for k, v in self._header.items() if k != "model"}, self._header["model"])


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._session: Any = None

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(as_dims(shape))
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return False
        lo, _opt, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        """An input's set shape; an output's, with dimensions named like a set input's resolved."""
        if name in self._shapes:
            return Dims(self._shapes[name])
        known = {}
        for input_name, shape in self._shapes.items():
            for dim_name, size in zip(self.engine._io[input_name]["dim_names"], shape, strict=True):
                if dim_name:
                    known[dim_name] = size
        info = self.engine._io[name]
        return Dims(known.get(n, d) if d < 0 else d for d, n in zip(info["shape"], info["dim_names"], strict=True))

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._io:
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        names = self.engine._names
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == TensorIOMode.INPUT]
        if any(n not in self._shapes for n in inputs) or any(n not in self._addresses for n in names):
            return False
        return cudart.stream_work(stream_handle, self._run) == cudart.cudaError_t.cudaSuccess

    def _device_array(self, name: str) -> np.ndarray:
        shape = tuple(self.get_tensor_shape(name))
        dtype = np.dtype(nptype(self.engine.get_tensor_dtype(name)))
        nbytes = volume(shape) * dtype.itemsize
        address = self._addresses[name]
        if not cudart.is_device_range(address, nbytes):
            raise RuntimeError(f"illegal memory access: tensor {name!r} at {address:#x} is not device memory")
        return np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype).reshape(shape)

    def _run(self) -> None:
        import onnxruntime as ort

        if self._session is None:
            self._session = ort.InferenceSession(self.engine._header["model"], providers=["CPUExecutionProvider"])
        feeds = {n: self._device_array(n).copy() for n in self._shapes}
        results = self._session.run(None, feeds)
        for output, value in zip(self._session.get_outputs(), results, strict=True):
            target = self._device_array(output.name)
            target[...] = value  # a view of the output's device memory
