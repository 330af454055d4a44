"""The ``.engine.json`` manifest: what an engine was built from and for, and the checks on load.

A serialized TensorRT engine loads only in the TensorRT release that built it and holds kernels
for one GPU architecture. The manifest records both (plus the ONNX file's sha256, the profile,
the precision and the build options), so loading can explain a mismatch instead of failing
inside TensorRT. Nothing here needs TensorRT.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from slim2deploy.base.environment import tensorrt_version
from slim2deploy.base.errors import SlimError
from slim2deploy.base.formats import read_json
from slim2deploy.deploy.cuda import cuda_device_info
from slim2deploy.deploy.export import PRECISION_KEY

MANIFEST_FORMAT = "slim2deploy.engine/1"


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


def manifest_path(engine_path: str | os.PathLike[str]) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_manifest(engine_path: str | os.PathLike[str]) -> EngineManifest | None:
    path = manifest_path(engine_path)
    if not path.exists():
        return None
    return EngineManifest.from_dict(read_json(path, "engine manifest", advice="rebuild the engine"))


def release(version: str) -> tuple[int, ...]:
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
    if trt_now and release(trt_now) != release(manifest.tensorrt_version):
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
        + ". Rebuild it on this machine from its ONNX file ('slim2deploy build' with engines required)"
    )


def current_env() -> dict[str, str | None]:
    """The running TensorRT version and GPU (None where unknown)."""
    gpu = cuda_device_info() or {}
    return {
        "tensorrt_version": tensorrt_version(),
        "gpu_name": gpu.get("gpu_name"),
        "compute_capability": gpu.get("compute_capability"),
    }


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
