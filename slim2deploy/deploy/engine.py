"""TensorRT engines from ONNX, with a manifest that ties each engine to its GPU and TensorRT.

Precision is whatever the ONNX graph says (fp32, an fp16 graph, or explicit Q/DQ int8): the
network is created strongly typed and no FP16/INT8 builder flags are set. TensorRT 10.1
deprecated the INT8 calibrators and TensorRT 11 removed the precision flags, so this is the
one way that works on both. TensorRT 10 needs the STRONGLY_TYPED creation flag; in TensorRT
11 every network is strongly typed and the flag is gone.

Written from the TensorRT Python API reference (Builder, IBuilderConfig, OnnxParser, Runtime,
ICudaEngine) and type-checked against tensorrt-stubs 10.13; it has not run against a real
TensorRT here. Everything that decides something (flags by version, manifest checks, the
``--engine`` policy, parser error text) is a pure function tested without TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slim2deploy.base.environment import tensorrt_version
from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_write_bytes, atomic_write_text, sha256_file
from slim2deploy.base.formats import read_json
from slim2deploy.deploy.cuda import cuda_device_info
from slim2deploy.deploy.export import PRECISION_KEY
from slim2deploy.deploy.onnx_info import onnx_costs

if TYPE_CHECKING:
    import tensorrt as trt

MANIFEST_FORMAT = "slim2deploy.engine/1"
ENGINE_POLICIES = ("auto", "require", "off")


@dataclass
class EngineOptions:
    """How TensorRT compiles an engine; the batch profile comes from ``--batch``."""

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


@dataclass
class EngineManifest:
    """What an ``.engine`` was built from and for; stored next to it as ``.engine.json``."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    input_name: str
    profile: dict[str, list[int]]  # {"min": shape, "opt": shape, "max": shape}
    onnx_sha256: str
    onnx_path: str
    engine_sha256: str
    # the field names are the .engine.json format (slim2deploy.engine/1): "build" is TensorRT's
    # builder here, not the slim2deploy build pipeline
    build_options: dict[str, Any]
    build_time_s: float
    built_at: str
    params: int | None = None
    macs: int | None = None
    host: dict[str, str] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineManifest:
        if d.get("format") != MANIFEST_FORMAT:
            raise SlimError(f"not a slim2deploy engine manifest (format {d.get('format')!r}, want {MANIFEST_FORMAT})")
        known = {f.name: f for f in fields(cls)}
        missing = [
            name for name, f in known.items() if name not in d and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise SlimError(f"engine manifest lacks {', '.join(missing)}; rebuild the engine")
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def batch_range(self) -> tuple[int, int]:
        return int(self.profile["min"][0]), int(self.profile["max"][0])


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (-1 marks a dynamic dimension)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def manifest_path(engine_path: str | os.PathLike[str]) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_manifest(engine_path: str | os.PathLike[str]) -> EngineManifest | None:
    path = manifest_path(engine_path)
    if not path.exists():
        return None
    return EngineManifest.from_dict(read_json(path, "engine manifest", advice="rebuild the engine"))


def _release(version: str) -> tuple[int, ...]:
    """``10.13.0.35`` -> (10, 13, 0): engines are tied to major.minor.patch, not the build number."""
    parts = [int(p) for p in version.split(".")[:3] if p.isdigit()]
    return tuple(parts)


def manifest_mismatches(manifest: EngineManifest, env: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(problems that stop the engine from loading, warnings) for running ``manifest`` in ``env``.

    ``env`` holds the running ``tensorrt_version``, ``gpu_name`` and ``compute_capability``
    (see ``current_env``); a value of None is unknown and not checked.
    """
    problems: list[str] = []
    notes: list[str] = []
    trt_now = env.get("tensorrt_version")
    if trt_now and _release(trt_now) != _release(manifest.tensorrt_version):
        problems.append(
            f"it was built with TensorRT {manifest.tensorrt_version} and this is TensorRT {trt_now}; "
            "serialized engines only load in the TensorRT release that built them"
        )
    cc_now = env.get("compute_capability")
    if cc_now and cc_now != manifest.compute_capability:
        problems.append(
            f"it was built for compute capability {manifest.compute_capability} ({manifest.gpu_name}) and this "
            f"GPU is {cc_now} ({env.get('gpu_name') or 'unknown'}); engines hold kernels for one GPU architecture"
        )
    gpu_now = env.get("gpu_name")
    if gpu_now and cc_now == manifest.compute_capability and gpu_now != manifest.gpu_name:
        notes.append(
            f"engine was tuned on {manifest.gpu_name}, running on {gpu_now} (same architecture): it runs, "
            "but its kernels were timed on the other GPU; rebuild here for representative latency"
        )
    return problems, notes


def explain_mismatch(engine_path: str | os.PathLike[str], problems: list[str]) -> str:
    return (
        f"cannot use {engine_path}: "
        + "; ".join(problems)
        + ". Rebuild it on this machine from its ONNX file (slim2deploy build ... --engine require)"
    )


def current_env() -> dict[str, str | None]:
    """The running TensorRT version and GPU (None where unknown)."""
    gpu = cuda_device_info() or {}
    return {
        "tensorrt_version": tensorrt_version(),
        "gpu_name": gpu.get("gpu_name"),
        "compute_capability": gpu.get("compute_capability"),
    }


# ---------------------------------------------------------------------------------------------
# --engine auto|require|off
# ---------------------------------------------------------------------------------------------
def engine_available() -> tuple[bool, str]:
    """Whether TensorRT engines can be built here, and a one-line reason."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed (pip install tensorrt on the GPU machine)"
    if not hasattr(trt, "Builder"):
        # tensorrt-stubs (and PyPI's download-only placeholder) leave an empty 'tensorrt' package
        return False, "only a placeholder 'tensorrt' package is installed, not the TensorRT library"

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
        raise SlimError(f"--engine must be one of {', '.join(ENGINE_POLICIES)}, got {policy!r}")
    if policy == "off":
        return False, "TensorRT engines: off (--engine off)"
    ok, reason = available if available is not None else engine_available()
    if ok:
        return True, f"TensorRT engines: compiling with {reason}"
    if policy == "require":
        raise SlimError(f"--engine require: cannot compile TensorRT engines here: {reason}")
    return False, f"TensorRT engines: skipped, {reason} (--engine off silences this)"


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
def network_flags(tensorrt_version: str, strongly_typed_bit: int | None) -> int:
    """Network creation flags: STRONGLY_TYPED on TensorRT 10, nothing on 11+ (always strongly typed)."""
    release = _release(tensorrt_version)
    if not release or release[0] < 10:
        raise SlimError(
            f"TensorRT {tensorrt_version} is too old: slim2deploy needs TensorRT 10 or newer (strongly typed networks)"
        )
    if release[0] >= 11:
        return 0
    if strongly_typed_bit is None:
        raise SlimError(f"TensorRT {tensorrt_version} lacks NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    return 1 << strongly_typed_bit


def parser_error_message(onnx_path: str | os.PathLike[str], errors: list[dict[str, Any]]) -> str:
    """One message listing every ONNX parser error with its node."""
    lines = []
    for e in errors:
        where = f"node {e.get('node')}"
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


def onnx_precision(onnx_path: str | os.PathLike[str]) -> str:
    """The graph's precision: slim2deploy's own tag, else ``int8`` (Q/DQ nodes), ``fp16`` or ``fp32``."""
    try:
        import onnx
    except ImportError:
        return "unknown"

    model = onnx.load(str(onnx_path), load_external_data=False)
    tagged = {p.key: p.value for p in model.metadata_props}.get(PRECISION_KEY)
    if tagged:  # written by slim2deploy's own export and precision stages
        return tagged
    graph = model.graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        return "int8"
    fp16 = onnx.TensorProto.FLOAT16
    if any(t.data_type == fp16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == fp16 for v in [*graph.input, *graph.output, *graph.value_info]
    ):
        return "fp16"
    if any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in graph.node):
        return "fp16"
    return "fp32"


class _Logger:
    """The TensorRT logger, created once: TensorRT wants a single logger per process."""

    instance: trt.ILogger | None = None

    @classmethod
    def get(cls) -> trt.ILogger:
        import tensorrt as trt

        if cls.instance is None:
            cls.instance = trt.Logger(trt.Logger.WARNING)
        return cls.instance


def _timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    data = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        warnings.warn(f"timing cache {path} was made for another GPU or TensorRT; starting a new one", stacklevel=3)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


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
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(network_flags(trt.__version__, None if flag is None else int(flag)))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves a side .onnx.data weights file next to the model
    if not parser.parse_from_file(str(onnx_path)):
        raise SlimError(parser_error_message(onnx_path, _parser_errors(parser)))
    if network.num_inputs != 1:
        raise SlimError(f"{onnx_path.name} has {network.num_inputs} inputs; slim2deploy builds single-input models")
    inp = network.get_input(0)
    dims = list(dims_tuple(inp.shape))
    if any(d < 0 for d in dims[1:]):
        raise SlimError(f"{onnx_path.name}: only the batch dimension may be dynamic, input shape is {dims}")
    lo, opt, hi = options.profile()
    if dims[0] >= 0 and (lo, hi) != (dims[0], dims[0]):
        raise SlimError(
            f"{onnx_path.name} has a fixed batch of {dims[0]} but the profile asks for {lo}..{hi}; "
            "export it with a dynamic batch (the default) or build with --batch {dims[0]}"
        )
    shapes = {name: [b, *dims[1:]] for name, b in (("min", lo), ("opt", opt), ("max", hi))}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.opt_level
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    _timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SlimError(
            f"TensorRT failed to build an engine from {onnx_path.name}; see its log above "
            "(a larger --workspace or a lower batch may help)"
        )
    data = bytes(serialized)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    gpu = cuda_device_info() or {}

    costs = onnx_costs(onnx_path)
    manifest = EngineManifest(
        tensorrt_version=trt.__version__,
        gpu_name=str(gpu.get("gpu_name", "unknown")),
        compute_capability=str(gpu.get("compute_capability", "unknown")),
        precision=onnx_precision(onnx_path),
        input_name=inp.name,
        profile=shapes,
        onnx_sha256=sha256_file(onnx_path),
        onnx_path=str(onnx_path),
        engine_sha256=hashlib.sha256(data).hexdigest(),
        build_options=options.to_dict(),
        build_time_s=round(time.perf_counter() - started, 3),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        params=costs.get("params"),
        macs=costs.get("macs"),
        host={"hostname": platform.node(), "driver": str(gpu.get("cuda_driver_api", ""))},
    )
    atomic_write_bytes(engine_path, data)
    atomic_write_text(manifest_path(engine_path), json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadedEngine:
    engine: trt.ICudaEngine
    runtime: trt.Runtime  # kept alive as long as the engine
    manifest: EngineManifest | None


def check_engine_file(engine_path: Path, data: bytes, env: dict[str, str | None]) -> EngineManifest | None:
    """The engine's manifest after checking it fits ``data`` and ``env``; SlimError explains why not."""
    manifest = read_manifest(engine_path)
    if manifest is None:
        warnings.warn(
            f"{engine_path} has no {manifest_path(engine_path).name}; its TensorRT version and GPU are not checked",
            stacklevel=3,
        )
        return None
    if hashlib.sha256(data).hexdigest() != manifest.engine_sha256:
        raise SlimError(f"{engine_path} does not match its manifest (the engine was replaced or damaged); rebuild it")
    problems, notes = manifest_mismatches(manifest, env)
    if problems:
        raise SlimError(explain_mismatch(engine_path, problems))
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return manifest


def load_engine(engine_path: str | os.PathLike[str], check: bool = True) -> LoadedEngine:
    """Deserialize an engine after checking its manifest against this GPU and TensorRT."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise SlimError(f"cannot load {engine_path}: TensorRT is not installed (pip install tensorrt)") from exc

    engine_path = Path(engine_path)
    if not engine_path.exists():
        raise SlimError(f"no such engine: {engine_path}")
    data = engine_path.read_bytes()
    manifest = check_engine_file(engine_path, data, current_env()) if check else read_manifest(engine_path)
    runtime = trt.Runtime(_Logger.get())
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise SlimError(
            f"TensorRT {trt.__version__} could not deserialize {engine_path}; it is damaged or was built by "
            "another TensorRT version; rebuild it here"
        )
    return LoadedEngine(engine, runtime, manifest)
