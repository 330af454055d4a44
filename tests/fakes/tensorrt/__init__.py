"""A fake ``tensorrt`` for the tests, written from the TensorRT Python API reference (see ../README.md).

It covers what slim2deploy calls, with the documented behaviour: ``Builder`` creates networks,
configs and optimisation profiles; ``OnnxParser`` really reads the ONNX file (with the ``onnx``
package) and reports one ``ParserError`` per node it cannot import; ``build_serialized_network``
returns None after logging an error when the network and config cannot make an engine; a
serialized engine only deserializes in the same TensorRT release and GPU architecture; an
execution context runs the ONNX graph on ONNX Runtime over the fake CUDA's memory. Failures go to
the logger, as in TensorRT, and are signalled by None/False/-1 return values, not exceptions.

The version is ``FAKE_TENSORRT_VERSION`` (default 10.13.0.35): TensorRT 10 has the
STRONGLY_TYPED network flag (bit 1); in TensorRT 11 every network is strongly typed and the
flag, kept for compatibility, is ignored (its value is 0). As in TensorRT, the classes live in
submodules and this package re-exports them.
"""

from ._builder import Builder, IBuilderConfig, IOptimizationProfile, ITimingCache
from ._parser import UNSUPPORTED_OPS, INetworkDefinition, ITensor, OnnxParser, ParserError
from ._runtime import ICudaEngine, IExecutionContext, Runtime, describe_engine
from ._types import (
    DataType,
    Dims,
    ErrorCode,
    IHostMemory,
    ILogger,
    Logger,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    TensorIOMode,
    __version__,
    float16,
    float32,
    int8,
    int32,
    int64,
    nptype,
    volume,
)

__all__ = [
    "UNSUPPORTED_OPS",
    "Builder",
    "DataType",
    "Dims",
    "ErrorCode",
    "IBuilderConfig",
    "ICudaEngine",
    "IExecutionContext",
    "IHostMemory",
    "ILogger",
    "INetworkDefinition",
    "IOptimizationProfile",
    "ITensor",
    "ITimingCache",
    "Logger",
    "MemoryPoolType",
    "NetworkDefinitionCreationFlag",
    "OnnxParser",
    "ParserError",
    "Runtime",
    "TensorIOMode",
    "__version__",
    "describe_engine",
    "float16",
    "float32",
    "int8",
    "int32",
    "int64",
    "nptype",
    "volume",
]
