"""What a benchmark measured, as dataclasses that round-trip through JSON (``slim2deploy.benchmark/1``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (90, 95, 99)


@dataclass
class LatencyStats:
    """Latency of one batch size in milliseconds; throughput in samples per second (batch / mean)."""

    batch: int
    iterations: int
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    std_ms: float
    throughput: float

    @classmethod
    def from_samples(cls, batch: int, times_ms: Sequence[float]) -> LatencyStats:
        t = np.asarray(times_ms, dtype=np.float64)
        if t.size == 0:
            raise ValueError("no timings")
        p90, p95, p99 = (float(np.percentile(t, q)) for q in PERCENTILES)
        mean = float(t.mean())
        return cls(
            batch=batch,
            iterations=int(t.size),
            min_ms=float(t.min()),
            mean_ms=mean,
            median_ms=float(np.median(t)),
            p90_ms=p90,
            p95_ms=p95,
            p99_ms=p99,
            max_ms=float(t.max()),
            std_ms=float(t.std()),
            throughput=batch * 1000.0 / mean,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStats:
        return cls(**d)


@dataclass
class BatchResult:
    """One model at one batch size: end to end (host in, host out) and, where known, device compute."""

    batch: int
    latency: LatencyStats
    compute: LatencyStats | None
    round_medians_ms: list[float]

    @property
    def spread_pct(self) -> float:
        """Range of the per-round medians relative to the overall median (run-to-run noise)."""
        r = self.round_medians_ms
        return 100.0 * (max(r) - min(r)) / self.latency.median_ms if len(r) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "latency": self.latency.to_dict(),
            "compute": self.compute.to_dict() if self.compute else None,
            "round_medians_ms": list(self.round_medians_ms),
            "spread_pct": self.spread_pct,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchResult:
        return cls(
            batch=int(d["batch"]),
            latency=LatencyStats.from_dict(d["latency"]),
            compute=LatencyStats.from_dict(d["compute"]) if d.get("compute") else None,
            round_medians_ms=[float(v) for v in d["round_medians_ms"]],
        )


@dataclass
class ModelSize:
    """Size and memory of one model; ``memory`` values are bytes."""

    params: int | None
    macs: int | None  # multiply-accumulates per sample (FLOPs ~= 2 x MACs)
    file_bytes: int
    cost_source: str  # where params/MACs came from: torch, onnx graph, sidecar json, engine manifest, none
    memory: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSize:
        return cls(**d)


@dataclass
class ModelResult:
    name: str
    path: str
    runner: dict[str, Any]
    size: ModelSize
    batches: list[BatchResult]
    skipped: dict[int, str] = field(default_factory=dict)  # batch -> why it was not measured

    def at(self, batch: int) -> BatchResult | None:
        return next((b for b in self.batches if b.batch == batch), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "runner": self.runner,
            "size": self.size.to_dict(),
            "batches": [b.to_dict() for b in self.batches],
            "skipped": {str(k): v for k, v in self.skipped.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelResult:
        return cls(
            name=d["name"],
            path=d["path"],
            runner=dict(d["runner"]),
            size=ModelSize.from_dict(d["size"]),
            batches=[BatchResult.from_dict(b) for b in d["batches"]],
            skipped={int(k): v for k, v in d.get("skipped", {}).items()},
        )


@dataclass
class Speedup:
    """One model against the baseline at one batch size (median latencies)."""

    model: str
    batch: int
    speedup: float  # baseline latency / model latency
    latency_reduction: float  # 1 - model / baseline
    macs_ratio: float | None  # model MACs / baseline MACs
    efficiency: float | None  # latency reduction / MACs reduction: 1.0 = every MAC removed paid off

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Speedup:
        return cls(**d)


@dataclass
class Comparison:
    environment: dict[str, Any]
    settings: dict[str, Any]
    models: list[ModelResult]
    baseline: str | None
    speedups: list[Speedup]

    def model(self, name: str) -> ModelResult:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "slim2deploy.benchmark/1",
            "environment": self.environment,
            "settings": self.settings,
            "baseline": self.baseline,
            "models": [m.to_dict() for m in self.models],
            "speedups": [s.to_dict() for s in self.speedups],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Comparison:
        return cls(
            environment=dict(d["environment"]),
            settings=dict(d["settings"]),
            models=[ModelResult.from_dict(m) for m in d["models"]],
            baseline=d.get("baseline"),
            speedups=[Speedup.from_dict(s) for s in d["speedups"]],
        )
