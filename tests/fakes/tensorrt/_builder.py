"""The fake's builder, builder config, optimisation profile and timing cache (see __init__)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from cuda.bindings import runtime as cudart

from ._parser import INetworkDefinition
from ._types import (
    RELEASE,
    Dims,
    IHostMemory,
    ILogger,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    TensorIOMode,
    as_dims,
    current_gpu,
    pack_engine,
    require_gpu,
    volume,
)

CACHE_MAGIC = b"FAKETRTCACHE"
SCRATCH_PER_INPUT_BYTE = 4  # workspace a build needs: 4x the largest input batch (the fake's tactics)


class IOptimizationProfile:
    def __init__(self) -> None:
        self._shapes: dict[str, list[Dims]] = {}
        self._valid = True
        self.extra_memory_target = 1.0

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        shapes = [as_dims(min), as_dims(opt), as_dims(max)]
        ranks_agree = len({len(s) for s in shapes}) == 1
        if not ranks_agree or any(not 0 <= a <= b <= c for a, b, c in zip(*shapes, strict=True)):
            self._valid = False  # reported when the profile is added, as TensorRT does
        self._shapes[input] = shapes

    def get_shape(self, input: str) -> list[Dims]:
        return list(self._shapes.get(input, []))

    def __bool__(self) -> bool:
        return self._valid


class ITimingCache:
    def __init__(self, header: dict[str, Any], entries: dict[str, float]) -> None:
        self._header, self._entries = header, entries

    def serialize(self) -> IHostMemory:
        return IHostMemory(CACHE_MAGIC + json.dumps({"header": self._header, "entries": self._entries}).encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if input_cache._header != self._header and not ignore_mismatch:
            return False
        self._entries.update(input_cache._entries)
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


def _cache_header() -> dict[str, Any]:
    gpu = current_gpu()
    return {"tensorrt": list(RELEASE), "compute_capability": gpu[1] if gpu else None}


class IBuilderConfig:
    def __init__(self, logger: ILogger) -> None:
        self._logger = logger
        self._pools = {MemoryPoolType.WORKSPACE: cudart.TOTAL_MEMORY}
        self._profiles: list[IOptimizationProfile] = []
        self._cache: ITimingCache | None = None
        self.builder_optimization_level = 3
        self.avg_timing_iterations = 1
        self.flags = 0

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self._pools[MemoryPoolType(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pools.get(MemoryPoolType(pool), 0)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            self._logger.log(ILogger.ERROR, "IOptimizationProfile: min <= opt <= max does not hold for every dimension")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(_cache_header(), {})
        try:
            assert data.startswith(CACHE_MAGIC)
            found = json.loads(data[len(CACHE_MAGIC) :])
            return ITimingCache(found["header"], found["entries"])
        except (AssertionError, ValueError, KeyError):
            self._logger.log(ILogger.ERROR, "timing cache deserialization failed: the data is not a timing cache")
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if cache._header != _cache_header() and not ignore_mismatch:
            self._logger.log(ILogger.ERROR, "timing cache was created on another device or TensorRT version")
            return False
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        require_gpu(logger)
        self.logger = logger
        self.max_threads = os.cpu_count() or 1

    def create_network(self, flags: int = 0) -> INetworkDefinition | None:
        known = sum(1 << int(f) for f in NetworkDefinitionCreationFlag)
        if flags & ~known:
            self.logger.log(ILogger.ERROR, f"createNetworkV2: invalid network creation flags {flags:#x}")
            return None
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self.logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        gpu = current_gpu()
        problem = _build_problem(network, config) if gpu else "no CUDA device"
        if problem:
            self.logger.log(ILogger.ERROR, f"build_serialized_network: {problem}")
            return None
        assert gpu is not None
        profile = config._profiles[0] if config._profiles else None
        io = []
        for mode, tensors in ((TensorIOMode.INPUT, network._inputs), (TensorIOMode.OUTPUT, network._outputs)):
            for t in tensors:
                shapes = profile.get_shape(t.name) if profile and mode == TensorIOMode.INPUT else []
                io.append(
                    {
                        "name": t.name,
                        "mode": int(mode),
                        "dtype": int(t.dtype),
                        "shape": list(t.shape),
                        "dim_names": t._dim_names,
                        "profile": [list(s) for s in shapes] or [list(t.shape)] * 3,
                    }
                )
        cache = config._cache or ITimingCache(_cache_header(), {})
        for node in network._nodes:  # every layer is "timed" once per GPU and profile
            cache._entries.setdefault(f"{node.op_type}:{node.name}:{io[0]['profile']}", 0.01)
        header = {
            "tensorrt": list(RELEASE),
            "gpu_name": gpu[0],
            "compute_capability": gpu[1],
            "strongly_typed": RELEASE[0] >= 11 or network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED),
            "builder_optimization_level": config.builder_optimization_level,
            "workspace": config.get_memory_pool_limit(MemoryPoolType.WORKSPACE),
            "io": io,
            "device_memory": _scratch_bytes(network, profile),
            "model_sha256": hashlib.sha256(network._model).hexdigest(),
        }
        return pack_engine(header, network._model)


def _scratch_bytes(network: INetworkDefinition, profile: IOptimizationProfile | None) -> int:
    largest = 0
    for t in network._inputs:
        shape = profile.get_shape(t.name)[2] if profile and profile.get_shape(t.name) else t.shape
        largest = max(largest, volume(shape) * t.dtype.itemsize)
    return largest * SCRATCH_PER_INPUT_BYTE


def _build_problem(network: INetworkDefinition, config: IBuilderConfig) -> str | None:
    """Why the network and config cannot make an engine, or None."""
    if not network._inputs:
        return "the network has no inputs (was the ONNX model parsed?)"
    profile = config._profiles[0] if config._profiles else None
    for t in network._inputs:
        dynamic = any(d < 0 for d in t.shape)
        shapes = profile.get_shape(t.name) if profile else []
        if dynamic and not shapes:
            return f"input {t.name!r} has dynamic dimensions {t.shape} but no optimization profile sets its shape"
        if shapes and len(shapes[0]) != len(t.shape):
            return f"the profile of {t.name!r} has rank {len(shapes[0])}, the input has rank {len(t.shape)}"
        for axis, d in enumerate(t.shape):
            if shapes and d >= 0 and any(s[axis] != d for s in shapes):
                return f"the profile of {t.name!r} sets dimension {axis} to {[s[axis] for s in shapes]}, fixed at {d}"
    needed = _scratch_bytes(network, profile)
    if config.get_memory_pool_limit(MemoryPoolType.WORKSPACE) < needed:
        return f"no tactic fits the workspace: the layers need {needed} bytes of scratch memory"
    return None
