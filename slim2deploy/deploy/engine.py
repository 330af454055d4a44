"""TensorRT engines from ONNX, as a chain of small loaders, each one step (as Polygraphy's are).

``compile_engine`` runs parse -> profile -> config -> build -> manifest -> write; ``load_engine``
checks the manifest, then deserializes. Each step is a function of its own so that a fake
``tensorrt`` module in the tests can drive it, and a failure is one SlimError naming the step.

Precision is whatever the ONNX graph says (fp32, an fp16 graph, or explicit Q/DQ int8): the
network is created strongly typed and no FP16/INT8 builder flags are set. TensorRT 10.1
deprecated the INT8 calibrators and TensorRT 11 removed the precision flags, so this is the
one way that works on both. TensorRT 10 needs the STRONGLY_TYPED creation flag; in TensorRT
11 every network is strongly typed and the flag is ignored.

Written from the TensorRT Python API reference (Builder, IBuilderConfig, OnnxParser, Runtime,
ICudaEngine), type-checked against tensorrt-stubs 10.13 and run in the tests against a fake
``tensorrt`` written from the same reference (tests/fakes); no real TensorRT has run it here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_bytes, atomic_write_text, sha256_file
from slim2deploy.deploy.cuda import cuda_device_info
from slim2deploy.deploy.engine_manifest import (
    MANIFEST_FORMAT,
    EngineManifest,
    check_engine_file,
    current_env,
    explain_mismatch,
    manifest_mismatches,
    manifest_path,
    onnx_precision,
    read_manifest,
    release,
)
from slim2deploy.deploy.onnx_info import onnx_costs

if TYPE_CHECKING:
    import tensorrt as trt

# the manifest's names are part of this module's API: callers import them from here
__all__ = [
    "ENGINE_POLICIES",
    "MANIFEST_FORMAT",
    "EngineManifest",
    "EngineOptions",
    "LoadedEngine",
    "attach_timing_cache",
    "batch_profile",
    "build_serialized",
    "check_engine_file",
    "compile_engine",
    "current_env",
    "deserialize",
    "dims_tuple",
    "engine_available",
    "explain_mismatch",
    "input_profile",
    "load_engine",
    "make_config",
    "make_manifest",
    "manifest_mismatches",
    "manifest_path",
    "network_flags",
    "onnx_precision",
    "parse_network",
    "parser_error_message",
    "read_manifest",
    "resolve_engine_policy",
    "write_engine",
]

ENGINE_POLICIES = ("auto", "require", "off")
GPU_EXTRA = "pip install 'slim2deploy[gpu]' (tensorrt, cuda-python)"


@dataclass
class EngineOptions:
    """How TensorRT compiles an engine; the batch profile comes from ``engine_batch``."""

    min_batch: int = 1
    opt_batch: int | None = None  # None: the largest batch, where throughput matters most
    max_batch: int = 64
    workspace_mib: int = 1024
    opt_level: int = 3  # TensorRT's builder optimisation level, 0..5 (3 is TensorRT's default)
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        opt = self.opt_batch if self.opt_batch is not None else self.max_batch
        if not 1 <= self.min_batch <= opt <= self.max_batch:
            raise SlimError(
                f"engine batch profile must satisfy 1 <= min <= opt <= max, got "
                f"min={self.min_batch} opt={opt} max={self.max_batch}"
            )
        if not 0 <= self.opt_level <= 5:
            raise SlimError(f"builder optimisation level must be 0..5, got {self.opt_level}")
        if self.workspace_mib <= 0:
            raise SlimError(f"workspace must be a positive number of MiB, got {self.workspace_mib}")

    @classmethod
    def from_batches(cls, batches: list[int], **kwargs: Any) -> EngineOptions:
        """A profile covering every batch size in ``batches`` (opt = the largest)."""
        if not batches:
            raise SlimError("give at least one batch size for the engine profile")
        return cls(min_batch=min(batches), max_batch=max(batches), **kwargs)

    def profile(self) -> tuple[int, int, int]:
        opt = self.opt_batch if self.opt_batch is not None else self.max_batch
        return self.min_batch, opt, self.max_batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineOptions:
        return cls(**d)


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (-1 marks a dynamic dimension)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


# ---------------------------------------------------------------------------------------------
# --engine auto|require|off
# ---------------------------------------------------------------------------------------------
def engine_available() -> tuple[bool, str]:
    """Whether TensorRT engines can be built here, and a one-line reason."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, f"TensorRT is not installed here; on a GPU machine: {GPU_EXTRA}"
    if not hasattr(trt, "Builder"):
        # tensorrt-stubs (which `make` installs for mypy) and PyPI's download-only placeholder
        # both leave a 'tensorrt' package without the library
        return False, (
            "TensorRT is not installed here (the 'tensorrt' package present is type stubs or PyPI's "
            f"placeholder, without the library); on a GPU machine: {GPU_EXTRA}"
        )

    try:
        gpu = cuda_device_info()
    except SlimError as exc:
        return False, f"TensorRT {trt.__version__} is installed but the GPU is not usable ({exc})"
    if gpu is None:
        return False, (
            f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible (or cuda-python/pycuda is missing)"
        )
    return (
        True,
        f"TensorRT {trt.__version__} on {gpu['gpu_name']} (compute capability {gpu['compute_capability']})",
    )


def resolve_engine_policy(policy: str, available: tuple[bool, str] | None = None) -> tuple[bool, str]:
    """Decide whether to build engines under ``--engine policy``; returns (build?, one-line message).

    ``require`` without TensorRT and a GPU raises SlimError. ``available`` defaults to
    ``engine_available()``.
    """
    if policy not in ENGINE_POLICIES:
        raise SlimError(f"`engine` must be one of {', '.join(ENGINE_POLICIES)}, got {policy!r}")
    if policy == "off":
        return False, "TensorRT engines: off (`engine=off`)"
    ok, reason = available if available is not None else engine_available()
    if ok:
        return True, f"TensorRT engines: compiling with {reason}"
    if policy == "require":
        raise SlimError(f"`engine=require`: cannot compile TensorRT engines here: {reason}")
    return False, f"TensorRT engines: skipped, {reason} (`engine=off` silences this)"


# ---------------------------------------------------------------------------------------------
# compile: parse -> profile -> config -> build -> manifest -> write
# ---------------------------------------------------------------------------------------------
def network_flags(tensorrt_version: str, strongly_typed_bit: int | None) -> int:
    """Network creation flags: STRONGLY_TYPED on TensorRT 10, nothing on 11+ (always strongly typed)."""
    found = release(tensorrt_version)
    if not found or found[0] < 10:
        raise SlimError(
            f"TensorRT {tensorrt_version} is too old: slim2deploy needs TensorRT 10 or newer (strongly typed networks)"
        )
    if found[0] >= 11:
        return 0
    if strongly_typed_bit is None:
        raise SlimError(f"TensorRT {tensorrt_version} lacks NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    return 1 << strongly_typed_bit


def parser_error_message(onnx_path: str | os.PathLike[str], errors: list[dict[str, Any]]) -> str:
    """One message listing every ONNX parser error with its node (node -1: the model as a whole)."""
    lines = []
    for e in errors:
        node = e.get("node")
        where = f"node {node}" if node is None or node >= 0 else "the model"
        if e.get("node_name"):
            where += f" {e['node_name']!r}"
        if e.get("operator"):
            where += f" ({e['operator']})"
        lines.append(f"{where}: {e.get('desc', '').strip()}")
    return (
        f"TensorRT cannot parse {onnx_path} ({len(errors)} error{'s' if len(errors) != 1 else ''}): "
        + "; ".join(lines)
        + ". Re-export with a supported opset or simplify the graph"
    )


def _parser_errors(parser: trt.OnnxParser) -> list[dict[str, Any]]:
    errors = []
    for i in range(parser.num_errors):
        err: Any = parser.get_error(i)
        errors.append(
            {
                "node": err.node(),
                # node_name / node_operator exist from TensorRT 10 on
                "node_name": err.node_name() if hasattr(err, "node_name") else "",
                "operator": err.node_operator() if hasattr(err, "node_operator") else "",
                "desc": err.desc(),
            }
        )
    return errors


class _Logger:
    """The TensorRT logger, created once: TensorRT wants a single logger per process."""

    instance: trt.ILogger | None = None

    @classmethod
    def get(cls) -> trt.ILogger:
        import tensorrt as trt

        if cls.instance is None:
            cls.instance = trt.Logger(trt.Logger.WARNING)
        return cls.instance


def parse_network(
    onnx_path: Path, builder: trt.Builder, logger: trt.ILogger
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Step 1: the ONNX file as a strongly typed network; one SlimError lists every parser error.

    The parser is returned with the network because it owns the weights the network points
    at: it must stay alive until the engine is built.
    """
    import tensorrt as trt

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(network_flags(trt.__version__, None if flag is None else int(flag)))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves a side .onnx.data weights file next to the model
    if not parser.parse_from_file(str(onnx_path)):
        raise SlimError(parser_error_message(onnx_path, _parser_errors(parser)))
    return network, parser


def batch_profile(dims: tuple[int, ...], options: EngineOptions, onnx_name: str) -> dict[str, list[int]]:
    """The min/opt/max input shapes for an input of ``dims`` (-1: dynamic) under ``options``."""
    if any(d < 0 for d in dims[1:]):
        raise SlimError(f"{onnx_name}: only the batch dimension may be dynamic, input shape is {list(dims)}")
    lo, opt, hi = options.profile()
    if dims[0] >= 0 and (lo, hi) != (dims[0], dims[0]):
        raise SlimError(
            f"{onnx_name} has a fixed batch of {dims[0]} but the profile asks for {lo}..{hi}; "
            f"export it with a dynamic batch (the default) or build with `engine_batch` {dims[0]}"
        )
    return {name: [b, *dims[1:]] for name, b in (("min", lo), ("opt", opt), ("max", hi))}


def input_profile(
    network: trt.INetworkDefinition, options: EngineOptions, onnx_name: str
) -> tuple[str, dict[str, list[int]]]:
    """Step 2: the network's one input and its min/opt/max shapes."""
    if network.num_inputs != 1:
        raise SlimError(f"{onnx_name} has {network.num_inputs} inputs; slim2deploy builds single-input models")
    inp = network.get_input(0)
    return inp.name, batch_profile(dims_tuple(inp.shape), options, onnx_name)


def attach_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    """The timing cache at ``path`` (a new one if absent, damaged, or made on another GPU or TensorRT)."""
    data = path.read_bytes() if path is not None and path.exists() else b""
    cache: trt.ITimingCache | None = config.create_timing_cache(data)  # None: data that is not a timing cache
    if cache is None or not config.set_timing_cache(cache, False):
        warnings.warn(
            f"timing cache {path} is damaged or was made for another GPU or TensorRT; starting a new one",
            stacklevel=3,
        )
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)


def make_config(
    builder: trt.Builder, input_name: str, shapes: dict[str, list[int]], options: EngineOptions
) -> trt.IBuilderConfig:
    """Step 3: the builder config: the batch profile, workspace, optimisation level, timing cache."""
    import tensorrt as trt

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    if config.add_optimization_profile(profile) < 0:
        raise SlimError(f"TensorRT rejected the shape profile {shapes} for input {input_name!r}; see its log above")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.opt_level
    attach_timing_cache(config, Path(options.timing_cache) if options.timing_cache else None)
    return config


def build_serialized(
    builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig, onnx_name: str
) -> bytes:
    """Step 4: the serialized engine."""
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SlimError(
            f"TensorRT failed to build an engine from {onnx_name}; see its log above "
            "(a larger `workspace_mib` or a lower batch may help)"
        )
    return bytes(serialized)


def make_manifest(
    onnx_path: Path, data: bytes, input_name: str, shapes: dict[str, list[int]], options: EngineOptions, seconds: float
) -> EngineManifest:
    """Step 5: the manifest of an engine built here from ``onnx_path``."""
    import tensorrt as trt

    gpu = cuda_device_info() or {}
    costs = onnx_costs(onnx_path)
    return EngineManifest(
        tensorrt_version=trt.__version__,
        gpu_name=str(gpu.get("gpu_name", "unknown")),
        compute_capability=str(gpu.get("compute_capability", "unknown")),
        precision=onnx_precision(onnx_path),
        input_name=input_name,
        profile=shapes,
        onnx_sha256=sha256_file(onnx_path),
        onnx_path=str(onnx_path),
        engine_sha256=hashlib.sha256(data).hexdigest(),
        build_options=options.to_dict(),
        build_time_s=round(seconds, 3),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        params=costs.get("params"),
        macs=costs.get("macs"),
        host={"hostname": platform.node(), "driver": str(gpu.get("cuda_driver_api", ""))},
    )


def write_engine(engine_path: Path, data: bytes, manifest: EngineManifest) -> None:
    """Step 6: the engine, then its manifest, each written atomically.

    Should the manifest write fail, the old manifest no longer matches the new engine's sha256
    and loading refuses the pair: never a manifest that vouches for the wrong engine.
    """
    atomic_write_bytes(engine_path, data)
    atomic_write_text(manifest_path(engine_path), json.dumps(manifest.to_dict(), indent=2) + "\n")


def compile_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    options: EngineOptions | None = None,
) -> EngineManifest:
    """Compile ``onnx_path`` with TensorRT into ``engine_path`` and its ``.engine.json``, both written atomically."""
    options = options or EngineOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.exists():
        raise SlimError(f"no such ONNX file: {onnx_path}")
    ok, reason = engine_available()
    if not ok:
        raise SlimError(f"cannot compile {engine_path.name}: {reason}")
    import tensorrt as trt  # only now: without the package, engine_available() gave the clean error

    started = time.perf_counter()
    logger = _Logger.get()
    builder = trt.Builder(logger)
    network, _parser = parse_network(onnx_path, builder, logger)  # _parser: alive until the build is done
    input_name, shapes = input_profile(network, options, onnx_path.name)
    config = make_config(builder, input_name, shapes, options)
    data = build_serialized(builder, network, config, onnx_path.name)
    if options.timing_cache:
        atomic_write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    manifest = make_manifest(onnx_path, data, input_name, shapes, options, time.perf_counter() - started)
    write_engine(engine_path, data, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# load: check the manifest -> deserialize
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadedEngine:
    engine: trt.ICudaEngine
    runtime: trt.Runtime  # kept alive as long as the engine
    manifest: EngineManifest | None


def deserialize(data: bytes, engine_path: Path) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """The engine in ``data`` and the runtime that must outlive it."""
    import tensorrt as trt

    runtime = trt.Runtime(_Logger.get())
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise SlimError(
            f"TensorRT {trt.__version__} could not deserialize {engine_path}; it is damaged or was built by "
            "another TensorRT version or for another GPU; rebuild it here"
        )
    return runtime, engine


def load_engine(engine_path: str | os.PathLike[str], check: bool = True) -> LoadedEngine:
    """Deserialize an engine after checking its manifest against this GPU and TensorRT."""
    engine_path = Path(engine_path)
    if not engine_path.exists():
        raise SlimError(f"no such engine: {engine_path}")
    ok, reason = engine_available()
    if not ok:
        raise SlimError(f"cannot load {engine_path}: {reason}")
    data = engine_path.read_bytes()
    manifest = check_engine_file(engine_path, data, current_env()) if check else read_manifest(engine_path)
    runtime, engine = deserialize(data, engine_path)
    return LoadedEngine(engine, runtime, manifest)
