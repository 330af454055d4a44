"""The fake's enums, Dims, logger and host memory, and the GPU it builds for (see __init__)."""

from __future__ import annotations

import enum
import json
import os
import struct
import sys
from typing import Any

import numpy as np
from cuda.bindings import runtime as cudart

__version__ = os.environ.get("FAKE_TENSORRT_VERSION", "10.13.0.35")
RELEASE = tuple(int(p) for p in __version__.split(".")[:3])
ENGINE_MAGIC = b"FAKETRT\x00"


# ---- logging ---------------------------------------------------------------------------------------
class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity: ILogger.Severity = ILogger.Severity.WARNING) -> None:
        self.min_severity = min_severity

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        if severity <= self.min_severity:
            print(f"[TRT] [{severity.name[0]}] {msg}", file=sys.stderr)


# ---- enums and Dims --------------------------------------------------------------------------------
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8

    @property
    def itemsize(self) -> int:
        return {0: 4, 1: 2, 2: 1, 3: 4, 4: 1, 5: 1, 6: 1, 7: 2, 8: 8}[int(self)]


float32, float16, int8, int32, int64 = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64
_NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}
FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL}
FROM_ONNX.update({2: DataType.UINT8, 7: DataType.INT64, 16: DataType.BF16})


def nptype(trt_type: DataType) -> type:
    if trt_type not in _NUMPY:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return _NUMPY[trt_type]


def volume(iterable: Any) -> int:
    return int(np.prod([int(d) for d in iterable], dtype=np.int64))


if RELEASE[0] >= 11:
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
else:
    NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag",
        {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3},
    )


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ErrorCode(enum.IntEnum):
    SUCCESS = 0
    INTERNAL_ERROR = 1
    MEM_ALLOC_FAILED = 2
    MODEL_DESERIALIZE_FAILED = 3
    INVALID_VALUE = 4
    INVALID_GRAPH = 5
    INVALID_NODE = 6
    UNSUPPORTED_GRAPH = 7
    UNSUPPORTED_NODE = 8


class Dims:
    """Behaves like a tuple of ints; TensorRT accepts a tuple or list wherever it takes Dims."""

    MAX_DIMS = 8

    def __init__(self, shape: Any = ()) -> None:
        self.as_dims = tuple(int(d) for d in shape)
        if len(self.as_dims) > self.MAX_DIMS:
            raise ValueError(f"Dims can hold at most {self.MAX_DIMS} dimensions")

    def __len__(self) -> int:
        return len(self.as_dims)

    def __getitem__(self, index: Any) -> Any:
        return self.as_dims[index]

    def __iter__(self) -> Any:
        return iter(self.as_dims)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dims | tuple | list) and tuple(other) == self.as_dims

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self.as_dims)


def as_dims(shape: Any) -> Dims:
    return shape if isinstance(shape, Dims) else Dims(shape)


class IHostMemory:
    """Library-owned bytes exposed through the buffer protocol."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    def __buffer__(self, flags: int) -> memoryview:
        return memoryview(self._data)

    def __bytes__(self) -> bytes:  # the buffer protocol of a Python class needs 3.12; bytes() on 3.11 uses this
        return self._data

    @property
    def nbytes(self) -> int:
        return len(self._data)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8


def current_gpu() -> tuple[str, str] | None:
    """(name, compute capability) of GPU 0 through the CUDA runtime, as TensorRT finds it."""
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    return props.name.rstrip(b"\x00").decode(), f"{props.major}.{props.minor}"


def require_gpu(logger: ILogger) -> tuple[str, str]:
    gpu = current_gpu()
    if gpu is None:
        logger.log(ILogger.ERROR, "CUDA initialization failure with error: 100 (no CUDA-capable device is detected)")
        raise TypeError("pybind11::init(): factory function returned nullptr")
    return gpu


def pack_engine(header: dict[str, Any], model: bytes) -> IHostMemory:
    """A fake serialized engine: magic, header length, the JSON header, the ONNX model."""
    packed = json.dumps(header).encode()
    return IHostMemory(ENGINE_MAGIC + struct.pack("<Q", len(packed)) + packed + model)
