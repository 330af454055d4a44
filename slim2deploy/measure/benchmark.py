"""Latency, throughput, size and memory of models, baseline beside slim, in one run.

The method follows trtexec and Polygraphy: warm up for a fixed time, then many timed
iterations over a few rotated input sets, each call ending with the output on the host (so a
GPU is synchronised), reported as min/mean/median/p90/p95/p99/max and samples/s. Models given
together are measured interleaved: every round runs each model for a slice of the iterations,
with the order rotated per round, so drifting clocks or a noisy neighbour hit all of them
alike; the spread of the per-round medians shows how much that noise was.

Nothing here imports torch (only the torch runner does, for checkpoints), so
``bench/latency.py`` runs on a GPU box with numpy and a runtime only.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import atomic_path, atomic_write_text
from slim2deploy.deploy.cuda import cuda_device_info
from slim2deploy.deploy.onnx_info import onnx_costs
from slim2deploy.runtime.runners import OrtRunner, Runner, TorchRunner, TrtRunner, open_runner

PERCENTILES = (90, 95, 99)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# size
# ---------------------------------------------------------------------------------------------
def _file_bytes(path: Path) -> int:
    side = path.with_name(path.name + ".data")  # the dynamo exporter's external weights
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)


def _sidecar_costs(path: Path) -> dict[str, int]:
    """``<model>.json`` next to the model (an engine's manifest is one), if it records params/MACs."""
    side = path.with_name(path.name + ".json")
    if not side.exists():
        return {}
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: int(data[k]) for k in ("params", "macs") if isinstance(data.get(k), int)}


def model_size(runner: Runner) -> ModelSize:
    """Params/MACs from the best source the runner's file type allows, and its file size."""
    path = runner.path
    costs: dict[str, int] = {}
    source = "none"
    if isinstance(runner, TorchRunner) and runner.params is not None:
        costs, source = {"params": runner.params, "macs": runner.macs or 0}, "torch"
    elif isinstance(runner, OrtRunner):
        costs = onnx_costs(path)
        source = "onnx graph" if costs else "none"
    if not costs:
        costs = _sidecar_costs(path)
        if costs:
            source = "engine manifest" if isinstance(runner, TrtRunner) else "sidecar json"
    return ModelSize(
        params=costs.get("params"),
        macs=costs.get("macs"),
        file_bytes=_file_bytes(path),
        cost_source=source,
        memory=runner.memory(),
    )


_RSS_SCRIPT = r"""
import json, resource, sys


def peak_bytes():
    # VmHWM belongs to this address space; ru_maxrss would carry the parent's peak across fork+exec
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


import numpy as np
import onnxruntime as ort

path, batch, threads, level = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
base = peak_bytes()
opts = ort.SessionOptions()
opts.graph_optimization_level = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}[level]
if threads:
    opts.intra_op_num_threads = threads
sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
x = np.zeros([batch, *inp.shape[1:]], dtype=dtype)
for _ in range(3):
    sess.run(None, {inp.name: x})
print(json.dumps({"ort_peak_rss": peak_bytes(), "ort_runtime_only_rss": base}))
"""


def ort_peak_rss(path: str | os.PathLike[str], batch: int, threads: int = 0, opt_level: str = "all") -> dict[str, int]:
    """Peak resident memory of a fresh process that loads ``path`` in ONNX Runtime (CPU) and runs it.

    A separate process, so the number is the model's alone and not this process's history;
    ``ort_runtime_only_rss`` is the same process right after importing numpy and onnxruntime.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(batch), str(threads), opt_level],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SlimError(f"measuring ONNX Runtime memory of {path} failed: {tail[0]}")
    return {k: int(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi() -> dict[str, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    first = out.strip().splitlines()[:1]
    if not first:
        return {}
    parts = [p.strip() for p in first[0].split(",")]
    return dict(zip(("gpu_name", "driver", "compute_capability"), parts, strict=False))


def environment(threads: int | None = None) -> dict[str, Any]:
    """Where the numbers came from: host, CPU, GPU, driver, CUDA and library versions."""
    env: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads or 0,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "torch": _version("torch"),
        "tensorrt": _version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs"),
        "cuda_binding": _version("cuda-python", "cuda-bindings", "pycuda"),
    }
    gpu: dict[str, Any] = dict(_nvidia_smi())
    try:
        gpu = {**(cuda_device_info() or {}), **gpu}
    except SlimError:
        pass
    if "torch" in sys.modules and "gpu_name" not in gpu:  # only if something already paid for importing torch
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpu["gpu_name"] = torch.cuda.get_device_name(0)
            gpu["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    if "torch" in sys.modules:
        env["torch_cuda"] = getattr(sys.modules["torch"].version, "cuda", None)
    env["gpu"] = gpu or None
    return env


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.stem for p in paths]
    if len(set(names)) == len(names):
        return names
    names = [f"{p.parent.name}/{p.stem}" for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _timed(runner: Runner, inputs: list[np.ndarray], n: int, start: int) -> tuple[list[float], list[float]]:
    wall: list[float] = []
    device: list[float] = []
    for i in range(n):
        x = inputs[(start + i) % len(inputs)]
        t0 = time.perf_counter_ns()
        runner.infer(x)
        wall.append((time.perf_counter_ns() - t0) / 1e6)
        if runner.last_compute_ms is not None:
            device.append(runner.last_compute_ms)
    return wall, device


def _warm_up(runner: Runner, inputs: list[np.ndarray], seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    i = 0
    while True:  # at least two calls: the first one often allocates or captures a graph
        runner.infer(inputs[i % len(inputs)])
        i += 1
        if i >= 2 and time.perf_counter() >= deadline:
            return


def measure(
    runners: Sequence[Runner],
    batches: Sequence[int],
    *,
    warmup_s: float = 1.0,
    iterations: int = 100,
    rounds: int = 5,
    input_sets: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[tuple[list[BatchResult], dict[int, str]]]:
    """Interleaved timing of active runners; per runner (batch results, skipped batches)."""
    if iterations < rounds or rounds < 1:
        raise SlimError(f"need at least one iteration per round (iterations={iterations}, rounds={rounds})")
    per_round = math.ceil(iterations / rounds)
    rng = np.random.default_rng(seed)
    results: list[tuple[list[BatchResult], dict[int, str]]] = [([], {}) for _ in runners]
    for batch in batches:
        active = []
        for k, r in enumerate(runners):
            if r.supports_batch(batch):
                active.append(k)
            else:
                hi = r.info.max_batch
                results[k][1][batch] = f"outside the supported batch range {r.info.min_batch}..{hi}"
        if not active:
            continue
        if log:
            log(f"batch {batch}: warm-up {warmup_s:g} s, {rounds} rounds x {per_round} iterations per model")
        inputs: dict[int, list[np.ndarray]] = {}
        for k in active:
            info = runners[k].info
            shape = (batch, *info.sample_shape)
            inputs[k] = [rng.standard_normal(shape).astype(info.input_dtype) for _ in range(input_sets)]
            _warm_up(runners[k], inputs[k], warmup_s)
        wall: dict[int, list[float]] = {k: [] for k in active}
        device: dict[int, list[float]] = {k: [] for k in active}
        medians: dict[int, list[float]] = {k: [] for k in active}
        for rnd in range(rounds):
            order = active[rnd % len(active) :] + active[: rnd % len(active)]
            for k in order:
                w, d = _timed(runners[k], inputs[k], per_round, rnd * per_round)
                wall[k] += w
                device[k] += d
                medians[k].append(float(np.median(w)))
        for k in active:
            results[k][0].append(
                BatchResult(
                    batch=batch,
                    latency=LatencyStats.from_samples(batch, wall[k]),
                    compute=LatencyStats.from_samples(batch, device[k]) if len(device[k]) == len(wall[k]) else None,
                    round_medians_ms=medians[k],
                )
            )
    return results


def speedups(models: Sequence[ModelResult], baseline: ModelResult) -> list[Speedup]:
    out = []
    for m in models:
        if m is baseline:
            continue
        macs_ratio = None
        if m.size.macs and baseline.size.macs:
            macs_ratio = m.size.macs / baseline.size.macs
        for b in m.batches:
            base = baseline.at(b.batch)
            if base is None:
                continue
            speedup = base.latency.median_ms / b.latency.median_ms
            reduction = 1.0 - b.latency.median_ms / base.latency.median_ms
            efficiency = None
            if macs_ratio is not None and macs_ratio < 1.0:
                efficiency = reduction / (1.0 - macs_ratio)
            out.append(Speedup(m.name, b.batch, speedup, reduction, macs_ratio, efficiency))
    return out


def benchmark(
    paths: Sequence[str | os.PathLike[str]],
    *,
    baseline: str | os.PathLike[str] | None = None,
    batches: Sequence[int] = (1,),
    warmup_s: float = 1.0,
    iterations: int = 100,
    rounds: int = 5,
    input_sets: int = 3,
    names: Sequence[str] | None = None,
    measure_rss: bool = True,
    log: Callable[[str], None] | None = None,
    **runner_options: Any,
) -> Comparison:
    """Measure every model in ``paths`` (plus ``baseline``, placed first) interleaved.

    ``runner_options`` go to ``open_runner`` (device, threads, opt_level, precision,
    channels_last, cuda_graph, ...). Batches a model cannot run (an engine's profile) are
    recorded as skipped for that model.
    """
    all_paths = [Path(p) for p in paths]
    if baseline is not None:
        base_path = Path(baseline)
        all_paths = [base_path, *[p for p in all_paths if p.resolve() != base_path.resolve()]]
    if not all_paths:
        raise SlimError("give at least one model to benchmark")
    batches = sorted(set(int(b) for b in batches))
    if not batches or batches[0] < 1:
        raise SlimError(f"batch sizes must be positive integers, got {batches}")
    model_names = list(names) if names else _unique_names(all_paths)
    if len(model_names) != len(all_paths):
        raise SlimError(f"got {len(model_names)} names for {len(all_paths)} models")
    runners = [open_runner(p, **runner_options) for p in all_paths]
    try:
        for r in runners:
            r.activate()
        timings = measure(
            runners, batches, warmup_s=warmup_s, iterations=iterations, rounds=rounds, input_sets=input_sets, log=log
        )
        models = []
        for name, r, (batch_results, skipped) in zip(model_names, runners, timings, strict=True):
            size = model_size(r)
            if measure_rss and isinstance(r, OrtRunner) and batch_results:
                size.memory.update(ort_peak_rss(r.path, batch_results[-1].batch, r.threads or 0, r.opt_level))
            models.append(ModelResult(name, str(r.path), r.info.to_dict(), size, batch_results, skipped))
    finally:
        for r in runners:
            r.deactivate()
    base = models[0] if baseline is not None else None
    return Comparison(
        environment=environment(runner_options.get("threads")),
        settings={
            "batches": batches,
            "warmup_s": warmup_s,
            "iterations": iterations,
            "rounds": rounds,
            "input_sets": input_sets,
            "runner_options": {k: v for k, v in runner_options.items() if v is not None},
            "timing": "end to end: host input to host output; compute: device events around the engine alone",
        },
        models=models,
        baseline=base.name if base else None,
        speedups=speedups(models, base) if base else [],
    )


def compare(
    baseline_path: str | os.PathLike[str],
    slim_path: str | os.PathLike[str],
    batches: Sequence[int] = (1, 64),
    **kwargs: Any,
) -> Comparison:
    """Baseline against slim model, measured interleaved (``slim2deploy build`` uses this)."""
    kwargs.setdefault("names", ["baseline", "slim"])
    return benchmark([slim_path], baseline=baseline_path, batches=batches, **kwargs)


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _rows(c: Comparison) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    gains = {(s.model, s.batch): s for s in c.speedups}
    has_compute = any(b.compute for m in c.models for b in m.batches)
    head = ["model", "batch", "median ms", "mean ms", "min ms", "p90 ms", "p95 ms", "p99 ms", "max ms"]
    head += ["samples/s", "round spread"] + (["compute ms"] if has_compute else []) + ["speed-up"]
    rows = []
    for m in c.models:
        for b in m.batches:
            lat = b.latency
            row = [m.name, str(b.batch)] + [
                f"{v:.3f}"
                for v in (lat.median_ms, lat.mean_ms, lat.min_ms, lat.p90_ms, lat.p95_ms, lat.p99_ms, lat.max_ms)
            ]
            row += [f"{lat.throughput:.1f}", f"{b.spread_pct:.1f}%"]
            if has_compute:
                row.append(f"{b.compute.median_ms:.3f}" if b.compute else "-")
            s = gains.get((m.name, b.batch))
            row.append(f"{s.speedup:.2f}x" if s else ("1.00x (base)" if m.name == c.baseline else "-"))
            rows.append(row)
    size_head = ["model", "params", "MACs/sample", "MACs ratio", "file", "memory", "efficiency (batch)"]
    size_rows = []
    for m in c.models:
        ratios = [s for s in c.speedups if s.model == m.name]
        macs_ratio = ratios[0].macs_ratio if ratios else (1.0 if m.name == c.baseline else None)
        eff = ", ".join(f"{s.efficiency:.2f} ({s.batch})" for s in ratios if s.efficiency is not None) or "-"
        mem = ", ".join(f"{k} {_mib(v)}" for k, v in m.size.memory.items()) or "-"
        size_rows.append(
            [
                m.name,
                _si(m.size.params),
                _si(m.size.macs),
                "-" if macs_ratio is None else f"{macs_ratio:.3f}",
                _mib(m.size.file_bytes),
                mem,
                eff,
            ]
        )
    return head, rows, size_head, size_rows


def _env_line(c: Comparison) -> str:
    e = c.environment
    gpu = e.get("gpu") or {}
    device = gpu.get("gpu_name") or f"{e.get('cpu')} ({e.get('cpus_usable')} CPUs usable)"
    libs = ", ".join(f"{k} {e[k]}" for k in ("onnxruntime", "torch", "tensorrt") if e.get(k))
    runner = c.models[0].runner if c.models else {}
    return f"{device}; {libs}; {runner.get('backend', '?')} on {runner.get('device', '?')}"


def format_table(c: Comparison) -> str:
    """Plain-text tables for a terminal."""
    head, rows, size_head, size_rows = _rows(c)

    def render(h: list[str], rs: list[list[str]]) -> str:
        widths = [max(len(x) for x in col) for col in zip(h, *rs, strict=True)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [h, *rs]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    text = [_env_line(c), "", render(head, rows), "", render(size_head, size_rows)]
    for m in c.models:
        for batch, why in m.skipped.items():
            text.append(f"{m.name}: batch {batch} skipped, {why}")
    return "\n".join(text) + "\n"


def to_markdown(c: Comparison) -> str:
    head, rows, size_head, size_rows = _rows(c)

    def md(h: list[str], rs: list[list[str]]) -> str:
        lines = ["| " + " | ".join(h) + " |", "|" + "|".join("---" for _ in h) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rs])

    e = c.environment
    gpu = e.get("gpu") or {}
    env_rows = [
        ("GPU", gpu.get("gpu_name", "none")),
        ("driver / CUDA", f"{gpu.get('driver', '-')} / {gpu.get('cuda_runtime', e.get('torch_cuda') or '-')}"),
        ("CPU", f"{e.get('cpu')} ({e.get('cpus_usable')} usable of {e.get('cpu_count')})"),
        ("threads", str(e.get("threads") or "runtime default")),
        ("versions", ", ".join(f"{k} {e[k]}" for k in ("onnxruntime", "torch", "tensorrt", "numpy") if e.get(k))),
        ("python / OS", f"{e.get('python')} / {e.get('platform')}"),
    ]
    s = c.settings
    method = (
        f"warm-up {s['warmup_s']} s; {s['iterations']} iterations per batch in {s['rounds']} interleaved rounds; "
        f"{s['input_sets']} input sets rotated; latency is end to end (host in, host out); "
        "round spread = range of per-round medians / median; speed-up = baseline median / model median; "
        "efficiency = latency reduction / MACs reduction."
    )
    parts = [
        "## Latency",
        "",
        md(head, rows),
        "",
        "## Size and memory",
        "",
        md(size_head, size_rows),
        "",
        "## Environment",
        "",
        md(["", ""], [[k, v] for k, v in env_rows]),
        "",
        f"Method: {method}",
        "",
    ]
    return "\n".join(parts)


def plot(c: Comparison, path: str | os.PathLike[str]) -> Path:
    """Latency (median, bars from min to p99) and throughput against batch size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in c.models:
        if not m.batches:
            continue
        xs = [b.batch for b in m.batches]
        med = np.array([b.latency.median_ms for b in m.batches])
        lo = med - np.array([b.latency.min_ms for b in m.batches])
        hi = np.array([b.latency.p99_ms for b in m.batches]) - med
        ax_lat.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=m.name)
        ax_thr.plot(xs, [b.latency.throughput for b in m.batches], marker="o", label=m.name)
    batches = sorted({b.batch for m in c.models for b in m.batches})
    for ax, label in ((ax_lat, "latency per batch, ms (median; min..p99)"), (ax_thr, "throughput, samples/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(_env_line(c), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def write_json(c: Comparison, path: str | os.PathLike[str]) -> Path:
    atomic_write_text(path, json.dumps(c.to_dict(), indent=2) + "\n")
    return Path(path)


def write_markdown(c: Comparison, path: str | os.PathLike[str]) -> Path:
    atomic_write_text(path, to_markdown(c))
    return Path(path)


def write_reports(c: Comparison, out_dir: str | os.PathLike[str], stem: str = "benchmark") -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out_dir``."""
    out = Path(out_dir)
    return {
        "json": write_json(c, out / f"{stem}.json"),
        "markdown": write_markdown(c, out / f"{stem}.md"),
        "plot": plot(c, out / f"{stem}.png"),
    }
